#!/bin/sh
# After install and after removal: lets a running systemd see the new,
# changed or removed unit files. Enables nothing: the renewal timer is the
# administrator's to enable.
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi

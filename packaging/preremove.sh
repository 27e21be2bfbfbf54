#!/bin/sh
# On removal (not on upgrade) stops the renewal units and drops the links
# an administrator's "systemctl enable" made, so none points at a removed
# file. dpkg passes "remove", rpm the number of versions left (0).
set -e
case "$1" in
remove | 0) ;;
*) exit 0 ;;
esac
systemctl --no-reload disable acme-alpn-proxy-renew.timer >/dev/null 2>&1 || true
if [ -d /run/systemd/system ]; then
	systemctl stop acme-alpn-proxy-renew.timer acme-alpn-proxy-renew.service >/dev/null 2>&1 || true
fi

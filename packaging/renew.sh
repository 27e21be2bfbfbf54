#!/bin/sh
# Obtains or renews the certificate for $DOMAINS with lego's TLS-ALPN-01
# responder behind acme-alpn-proxy. Run by acme-alpn-proxy-renew.service
# with the settings of /etc/default/acme-alpn-proxy-renew (see
# acme-alpn-proxy(8)); refuses to run until they are filled in.
# ACME_ALPN_PROXY and LEGO name other binaries (tests).
set -eu

conf=/etc/default/acme-alpn-proxy-renew
proxy=${ACME_ALPN_PROXY:-/usr/sbin/acme-alpn-proxy}
lego=${LEGO:-/usr/bin/lego}

# Exit status 6 is what systemd shows as NOTCONFIGURED.
refuse() {
	echo "acme-alpn-proxy-renew: $*" >&2
	exit 6
}

[ -n "${DOMAINS:-}" ] || refuse "DOMAINS is empty: set the names to certify in $conf"
[ -n "${EMAIL:-}" ] || refuse "EMAIL is empty: set the ACME account's address in $conf"
case $EMAIL in
*@*) ;;
*) refuse "EMAIL=$EMAIL is not an e-mail address (set in $conf)" ;;
esac
[ -x "$lego" ] || refuse "$lego is missing: install lego (it answers the challenge)"

LEGO_PATH=${LEGO_PATH:-/var/lib/lego}
export LEGO_PATH
responder=${RESPONDER:-127.0.0.1:31443}

# DOMAINS, HOOK and the *_OPTIONS are split at blanks, never globbed.
set -f
set --
first=
for name in $(printf '%s\n' "$DOMAINS" | tr ',' ' '); do
	case $name in
	*'*'*) refuse "$name: TLS-ALPN-01 cannot validate a wildcard name (use DNS-01)" ;;
	esac
	first=${first:-$name}
	set -- "$@" --domains "$name"
done
[ -n "$first" ] || refuse "DOMAINS=$DOMAINS names no domain (set in $conf)"

# lego's run orders a new certificate every time; renew needs one to exist
# and orders only when fewer than RENEW_DAYS days are left.
if [ -e "$LEGO_PATH/certificates/$first.crt" ]; then
	set -- "$@" renew --days "${RENEW_DAYS:-30}"
	if [ -n "${HOOK:-}" ]; then set -- "$@" --renew-hook "$HOOK"; fi
else
	set -- "$@" run
	if [ -n "${HOOK:-}" ]; then set -- "$@" --run-hook "$HOOK"; fi
fi

# shellcheck disable=SC2086 # the *_OPTIONS are lists of words
exec "$proxy" -alpn "$responder" ${PROXY_OPTIONS:-} run -- \
	"$lego" --tls --tls.port "$responder" --email "$EMAIL" --accept-tos \
	${LEGO_OPTIONS:-} "$@"

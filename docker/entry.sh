#!/bin/sh
# Host entry point: our balancer in TCP mode, relaying :8443 to the VIP. Only one container
# can publish host port 8443, and the VIP moves to whichever balancer is active, so the
# host port follows the active balancer. TLS is end to end (client <-> balancer): the entry
# sees bytes. Each connection starts with a PROXY v2 header carrying the client's address,
# which the pair accepts from this container's address only (LB_ACCEPT_PROXY).
#
# A new client connection is kept while the VIP has no owner (a takeover, ~0.6 s): the
# entry tries the VIP up to ENTRY_TRIES times, each connect bounded by
# ENTRY_CONNECT_TIMEOUT s, ENTRY_RETRY_INTERVAL s apart. A try often fails at once while
# the VIP has no owner, so 12 tries keep a connection about 2 s at least (12 x 0.15 s
# plus the tries) and 12 x 0.3 + 11 x 0.15 = 5.25 s at most before it is closed. Connections already relayed to
# a balancer that dies are lost with it (as with keepalived). Its dashboard is :9000.
set -eu
wait_s="${CERT_WAIT_SECONDS:-120}"
while [ ! -s /certs/admin.token ]; do
    if [ "$wait_s" -le 0 ]; then
        echo "entry: /certs/admin.token missing (is the ca service done?)" >&2
        exit 1
    fi
    wait_s=$((wait_s - 1))
    sleep 1
done
exec python -m balancer \
    --mode tcp --listen "0.0.0.0:${ENTRY_PORT:-8443}" \
    --backend "${LB_VIP:-172.28.0.100}:443,name=vip,proxy_protocol=v2" \
    --attempts "${ENTRY_TRIES:-12}" \
    --timeout-connect "${ENTRY_CONNECT_TIMEOUT:-0.3}" \
    --retry-interval "${ENTRY_RETRY_INTERVAL:-0.15}" \
    --check-type tcp \
    --admin 0.0.0.0:9000 --admin-token-file /certs/admin.token \
    ${LB_ACCESS_LOG:+--access-log "$LB_ACCESS_LOG"} \
    "$@"

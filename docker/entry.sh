#!/bin/sh
# Host entry point: plain TCP relay from :8443 to the VIP. Only one container can publish
# host port 8443, and the VIP moves to whichever balancer is active, so the host port
# follows the active balancer. TLS is end-to-end (client <-> balancer); socat sees bytes.
#
# A new client connection is kept while the VIP has no owner (a takeover, ~0.6 s): socat
# tries the VIP up to ENTRY_TRIES times, each connect bounded by ENTRY_CONNECT_TIMEOUT s,
# ENTRY_RETRY_INTERVAL s apart, so at most 5 x 0.3 + 4 x 0.15 = 2.1 s by default before it
# closes the client connection. Connections already relayed to a balancer that dies are
# lost with it (as with keepalived). Interim: the balancer's TCP mode will replace socat.
set -eu
tries=${ENTRY_TRIES:-5}
exec socat -d "TCP-LISTEN:${ENTRY_PORT:-8443},fork,reuseaddr,max-children=${ENTRY_MAX_CONN:-512}" \
    "TCP:${LB_VIP:-172.28.0.100}:443,connect-timeout=${ENTRY_CONNECT_TIMEOUT:-0.3},retry=$((tries - 1)),interval=${ENTRY_RETRY_INTERVAL:-0.15}"

#!/bin/sh
# Host entry point: plain TCP relay from :8443 to the VIP. Only one container can publish
# host port 8443, and the VIP moves to whichever balancer is active, so the host port
# follows the active balancer. TLS is end-to-end (client <-> balancer); socat sees bytes.
set -eu
exec socat -d "TCP-LISTEN:${ENTRY_PORT:-8443},fork,reuseaddr,max-children=${ENTRY_MAX_CONN:-512}" \
    "TCP:${LB_VIP:-172.28.0.100}:443,connect-timeout=5"

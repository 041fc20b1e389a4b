#!/bin/sh
# Balancer pair member. All balancer flags live here; compose only sets the per-member
# values (LB_PEER, LB_PRIORITY) and shared ones (LB_VIP, LB_VIP_PREFIX). Scaled backend
# replicas are found by re-resolving the compose service name (--discover), and named
# backend-N by reverse DNS. `LB_ACCESS_LOG=- make up` turns the JSON access
# log on, to `docker-compose logs balancer-a`.
set -eu

# compose starts us after `ca` succeeded; the bounded wait covers runs without compose
# (docker run, restarts racing a re-run of ca).
wait_s="${CERT_WAIT_SECONDS:-120}"
for f in /certs/balancer.crt /certs/balancer.key /certs/pair.secret /certs/admin.token; do
    while [ ! -s "$f" ]; do
        if [ "$wait_s" -le 0 ]; then
            echo "balancer: $f missing (is the ca service done? see: docker-compose logs ca)" >&2
            exit 1
        fi
        wait_s=$((wait_s - 1))
        sleep 1
    done
done

: "${LB_PEER:?LB_PEER (peer host:port) must be set}"
: "${LB_PRIORITY:?LB_PRIORITY must be set}"
exec python -m balancer \
    --listen 0.0.0.0:443 \
    --tls-cert /certs/balancer.crt --tls-key /certs/balancer.key \
    --discover "${LB_DISCOVER:-backend:8080}" \
    --admin 0.0.0.0:9000 --admin-token-file /certs/admin.token \
    --bind-election 0.0.0.0:7946 --peer "$LB_PEER" --priority "$LB_PRIORITY" \
    --vip "${LB_VIP:-172.28.0.100}/${LB_VIP_PREFIX:-24}" --vip-interface eth0 \
    --secret-file /certs/pair.secret \
    --workers "${LB_WORKERS:-auto}" \
    ${LB_ACCESS_LOG:+--access-log "$LB_ACCESS_LOG"} \
    ${LB_ACCEPT_PROXY:+--accept-proxy "$LB_ACCEPT_PROXY"} \
    "$@"

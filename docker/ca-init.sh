#!/bin/sh
# One-shot `ca` service: create the CA once (key stays in /pki, the `ca-data` volume),
# issue the leaf certificates, then publish only what other services need to /certs.
set -eu

PKI="${PKI_DIR:-/pki}"
OUT="${CERTS_DIR:-/certs}"
VIP="${LB_VIP:-172.28.0.100}"
LB_UID=10001 # the image's non-root `lb` user (backends, entry, locust)

python -m ca init --dir "$PKI" # reuses an existing CA

# Leaf certificates are re-issued on every start: cheap, and SANs follow LB_VIP.
python -m ca issue --dir "$PKI" --name balancer --force \
    --dns localhost --ip 127.0.0.1 --ip "$VIP" \
    --dns balancer-a --dns balancer-b --dns lb.testbed
python -m ca issue --dir "$PKI" --name backend --force \
    --dns backend --dns localhost --ip 127.0.0.1

# Pair secret for balancer heartbeats and the admin API token: created once, kept with the
# CA. Neither is ever printed here (`make admin-token` shows the token on request).
for secret in pair.secret admin.token; do
    [ -f "$PKI/$secret" ] ||
        (umask 077 && python -c 'import secrets; print(secrets.token_hex(32))' >"$PKI/$secret")
done

# publish NAME MODE OWNER: copy then rename, so readers never see half a file.
publish() {
    cp "$PKI/$1" "$OUT/.$1.tmp"
    chmod "$2" "$OUT/.$1.tmp"
    chown "$3" "$OUT/.$1.tmp"
    mv -f "$OUT/.$1.tmp" "$OUT/$1"
}
publish ca.crt 0644 0:0
publish balancer.crt 0644 0:0
publish balancer.key 0600 0:0 # balancers run as root (for NET_ADMIN)
publish pair.secret 0600 0:0
publish admin.token 0600 0:0 # mutations on the balancers' admin API need it
publish backend.crt 0644 0:0
publish backend.key 0600 "$LB_UID:$LB_UID"
echo "ca: published $(ls "$OUT" | tr '\n' ' ')to $OUT"

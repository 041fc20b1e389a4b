#!/usr/bin/env bash
# Build a minimal Debian bookworm + Python base image without any container registry:
# debootstrap a rootfs from the host's apt mirror and `docker import` it.
#
#   tools/build-base-image.sh [TAG]        (default: lb-testbed/base:bookworm)
#
# Idempotent: exits at once when TAG already exists (FORCE=1 rebuilds).
# Bounded: debootstrap and apt steps run under `timeout`.
# The host CA bundle is copied into the image (not into the source tree) so that pip
# inside `docker build` can reach PyPI through TLS-intercepting egress proxies.
set -euo pipefail

TAG="${1:-lb-testbed/base:bookworm}"
SUITE="bookworm"
STEP_TIMEOUT="${STEP_TIMEOUT:-1200}" # seconds per long step
HOST_BUNDLE="/etc/ssl/certs/ca-certificates.crt"

# iproute2 + iputils-arping: VIP add/del and gratuitous ARP; tini: PID 1 signal
# handling; procps/curl: debugging; iptables: the compose impairment helper on kernels
# without sch_netem (NFQUEUE delay, statistic loss).
PACKAGES="python3,python3-venv,python-is-python3,ca-certificates,iproute2,iputils-arping"
PACKAGES+=",tini,procps,curl,iptables"

log() { printf 'build-base-image: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

command -v docker >/dev/null || die "docker not found"
if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    log "$TAG already exists (FORCE=1 to rebuild)"
    exit 0
fi
[[ "$(id -u)" == 0 ]] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install -y debootstrap)"
[[ -r "$HOST_BUNDLE" ]] || die "host CA bundle $HOST_BUNDLE not readable"

# First "URIs:" (deb822) or "deb URL" (one-line) entry for the main and security archives.
mirror_for() { # $1: regex the URL must match, $2: regex it must not match
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list)
    local f
    for f in "${files[@]}"; do
        [[ -r "$f" ]] || continue
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}
             /^deb[ \t]/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' "$f"
    done | grep -E "$1" | grep -vE "$2" | head -n1 || true
}
MIRROR="$(mirror_for '/debian/?$' 'security')"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SECURITY="$(mirror_for 'debian-security/?$' '^$')"
SECURITY="${SECURITY:-http://deb.debian.org/debian-security}"
log "mirror $MIRROR, security $SECURITY"

WORK="$(mktemp -d /var/tmp/lb-base.XXXXXX)"
ROOT="$WORK/rootfs"
cleanup() {
    mountpoint -q "$ROOT/proc" 2>/dev/null && umount -l "$ROOT/proc"
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$SECONDS
log "debootstrap $SUITE into $ROOT"
timeout "$STEP_TIMEOUT" debootstrap --variant=minbase --include="$PACKAGES" \
    "$SUITE" "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 ||
    {
        tail -n 30 "$WORK/debootstrap.log" >&2
        die "debootstrap failed"
    }

# Same suites as a stock Debian image, so `apt-get update` in a Dockerfile works.
rm -f "$ROOT/etc/apt/sources.list"
cat >"$ROOT/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $MIRROR
Suites: $SUITE $SUITE-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $SECURITY
Suites: $SUITE-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF

# debootstrap only sees the release suite: pull in point and security updates.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
mount -t proc proc "$ROOT/proc"
log "apt-get upgrade (security + updates)"
timeout "$STEP_TIMEOUT" chroot "$ROOT" /bin/sh -c \
    'export DEBIAN_FRONTEND=noninteractive; apt-get -qq update && apt-get -qq -y upgrade' \
    >"$WORK/upgrade.log" 2>&1 ||
    {
        tail -n 30 "$WORK/upgrade.log" >&2
        die "apt-get upgrade failed"
    }
umount -l "$ROOT/proc"

# Host CA bundle (may include egress-proxy CAs); the extra CA files too, so a later
# update-ca-certificates inside the image keeps them.
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi

# Keep the image small; docker provides resolv.conf/hosts/hostname at run time.
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/* "$ROOT"/var/cache/debconf/*-old \
    "$ROOT"/usr/share/doc/* "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* \
    "$ROOT"/var/log/*.log "$ROOT"/var/log/apt/* "$ROOT"/tmp/* "$ROOT"/var/tmp/*
find "$ROOT/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
: >"$ROOT/etc/resolv.conf"
: >"$ROOT/etc/hostname"
[[ -x "$ROOT/usr/bin/python" ]] || ln -sf python3 "$ROOT/usr/bin/python"

log "docker import $TAG"
tar --numeric-owner --xattrs -C "$ROOT" -c . |
    timeout "$STEP_TIMEOUT" docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
        --change 'CMD ["/bin/bash"]' \
        --message "lb-testbed base: debootstrap $SUITE minbase from $MIRROR" \
        - "$TAG" >/dev/null

size="$(docker image inspect --format '{{.Size}}' "$TAG")"
log "built $TAG in $((SECONDS - start))s, size $((size / 1024 / 1024)) MiB"

#!/bin/sh
# Scaled backend replicas get no fixed name from compose: use the container hostname.
set -eu
exec python -m backends --host 0.0.0.0 --port "${BACKEND_PORT:-8080}" \
    --name "${BACKEND_NAME:-$(hostname)}" "$@"

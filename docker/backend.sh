#!/bin/sh
# A backend replica names itself `backend-N`, N its compose replica number, from Docker's
# reverse DNS of its own address: the name the balancer's discovery gives the same
# address, so X-Backend, the dashboard, /api/state and the metrics agree. BACKEND_NAME
# overrides; without a DNS answer the name is the container hostname.
set -eu
name="${BACKEND_NAME:-$(python -m backends.naming "${BACKEND_SERVICE:-backend}")}"
echo "backend: named $name"
exec python -m backends --host 0.0.0.0 --port "${BACKEND_PORT:-8080}" --name "$name" "$@"

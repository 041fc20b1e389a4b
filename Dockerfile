# One image for every lb-testbed service (ca, backend, balancer, entry, locust).
#
#   docker build -t lb-testbed:latest .                          # needs a registry
#   tools/build-base-image.sh && docker build \
#     --build-arg BASE_IMAGE=lb-testbed/base:bookworm -t lb-testbed:latest .   # offline
#
# Only classic-builder syntax (no RUN --mount) so docker-compose 1.29 can build it too.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}
# lets `make image` prune the dangling images its rebuilds leave behind, and nothing else
LABEL org.lb-testbed.image="app"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# VIP tools (ip, arping), tini as PID 1 (the entry relay is our balancer in TCP mode) and
# iptables for the impairment helper on kernels without sch_netem. The local base has them;
# python:3.12-slim does not.
RUN set -eu; \
    if ! command -v ip >/dev/null || ! command -v arping >/dev/null \
        || ! command -v tini >/dev/null || ! command -v iptables >/dev/null; then \
        apt-get update; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            iproute2 iputils-arping tini iptables; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    groupadd --system --gid 10001 lb; \
    useradd --system --uid 10001 --gid lb --create-home --home-dir /home/lb \
        --shell /usr/sbin/nologin lb; \
    mkdir -p /app /pki /certs; \
    chmod 0700 /pki

# `python3` exists on both bases (/usr/local/bin on slim, /usr/bin on the local base).
RUN python3 -m venv /opt/venv && pip install --upgrade pip setuptools wheel

WORKDIR /app
# Metadata before the code layers: with the classic builder on slow storage drivers
# every instruction costs seconds, so a code edit should rebuild only the last steps.
ENTRYPOINT ["tini", "-g", "--"]
CMD ["python", "-m", "balancer", "--help"]

# Dependencies first, read from pyproject.toml, so code edits do not re-download them.
COPY pyproject.toml /app/
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
rs = p["dependencies"] + p["optional-dependencies"]["loadtest"]; \
print("\n".join(r for r in rs if not r.startswith(p["name"])))' > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt

COPY . /app/
RUN pip install --no-deps --no-build-isolation . \
    && rm -rf build *.egg-info \
    && chmod 0755 docker/*.sh \
    && python -c "import balancer, backends, ca, loadtest, harness"

# Service entrypoints (docker/*.sh) are used from /app/docker by compose.yaml.
USER lb

# lb-testbed: the two commands a user needs are `make up` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# no hyphen: Compose v1.29 and v2 then name containers, networks and volumes identically
COMPOSE_PROJECT_NAME ?= lbtestbed
export COMPOSE_PROJECT_NAME
IMAGE ?= lb-testbed:latest
BASE_TAG ?= lb-testbed/base:bookworm
BACKENDS ?= 3

.PHONY: venv test lint typecheck unit local up down bench bench-quick bench-failover drill soak \
	base-image image ca-cert clean subnet

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck unit

# make local [ALGORITHM=least-connections] [TLS=1] [PAIR=1]
local: $(STAMP)
	$(BIN)/python -m loadtest.local $(if $(ALGORITHM),--algorithm $(ALGORITHM)) \
		$(if $(TLS),--tls) $(if $(PAIR),--pair)

# Balancer vs HAProxy vs a naive aiohttp proxy, same backends, same run.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --duration 3 --warmup 1

# Our election vs keepalived in network namespaces (root), same run.
bench-failover: $(STAMP)
	$(BIN)/python -m bench.failover

# make drill SCENARIO=kill-backend [LOCAL=1] [EXPECT='failover_s<=1.0 ...'] [NO_EXPECT=1]
# writes out/drill-SCENARIO.{json,md,png}; exit 1 when an expectation is false
drill: $(STAMP)
	mkdir -p out
	$(BIN)/python -m loadtest.drill $(or $(SCENARIO),kill-backend) $(if $(LOCAL),--local) \
		$(foreach e,$(EXPECT),--expect '$(e)') $(if $(NO_EXPECT),--no-expect) \
		--json out/drill-$(or $(SCENARIO),kill-backend).json \
		--md out/drill-$(or $(SCENARIO),kill-backend).md \
		--plot out/drill-$(or $(SCENARIO),kill-backend).png

# make soak [SOAK_MINUTES=10]
soak: $(STAMP)
	mkdir -p out
	$(BIN)/python -m loadtest.soak --minutes $(or $(SOAK_MINUTES),10) --json out/soak.json \
		--plot out/soak.png

# The Dockerfile defaults to python:3.12-slim; with no registry, build a Debian base locally.
base-image:
	tools/build-base-image.sh $(BASE_TAG)

image:
	@base="$(BASE_IMAGE)"; \
	if [ -z "$$base" ]; then \
	  if docker image inspect python:3.12-slim >/dev/null 2>&1 \
	     || timeout 60 docker pull -q python:3.12-slim >/dev/null 2>&1; then base=python:3.12-slim; \
	  else tools/build-base-image.sh $(BASE_TAG) && base=$(BASE_TAG); fi; \
	fi; \
	echo "base image: $$base"; \
	docker build --build-arg BASE_IMAGE=$$base -t $(IMAGE) .
	docker image prune -f --filter label=org.lb-testbed.image=app >/dev/null

# make up [LB_SUBNET=172.29.0.0/24]: with no LB_SUBNET, a free /24 is chosen (see tools/choose_subnet.py)
up: subnet image
	@vars="$$(tools/choose_subnet.py)" || exit 2; export $$vars; \
	echo "network    $$LB_SUBNET (VIP $$LB_VIP, balancer-a $$LB_IP_A, balancer-b $$LB_IP_B)"; \
	$(COMPOSE) up -d --no-build --scale backend=$(BACKENDS)
	@echo "service    https://localhost:8443   (make ca-cert, then curl --cacert pki/ca.crt)"
	@echo "dashboards http://localhost:9001 (balancer-a)  http://localhost:9002 (balancer-b)"
	@echo "locust     http://localhost:8089"

# fails at once, before the image build, when LB_SUBNET is held by another network
subnet:
	@tools/choose_subnet.py >/dev/null

# make down [V=1] also removes the volumes (the CA and its certificates)
down:
	$(COMPOSE) down --remove-orphans $(if $(V),-v)

ca-cert:
	mkdir -p pki
	$(COMPOSE) run --rm -T --no-deps ca cat /certs/ca.crt > pki/ca.crt.tmp && mv pki/ca.crt.tmp pki/ca.crt
	@echo "wrote pki/ca.crt"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

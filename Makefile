# lb-testbed: the two commands a user needs are `make up` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
COMPOSE ?= $(shell docker compose version >/dev/null 2>&1 && echo "docker compose" || echo docker-compose)
# no hyphen: Compose v1.29 and v2 then name containers, networks and volumes identically
COMPOSE_PROJECT_NAME ?= lbtestbed
export COMPOSE_PROJECT_NAME
# make up LOCUST_MASTER_BIND=ADDR publishes the Locust master's port 5557 on ADDR (workers
# on other hosts join there); COMPOSE_FILE works the same in docker-compose 1.29 and v2
ifneq ($(LOCUST_MASTER_BIND),)
COMPOSE_FILE := compose.yaml:docker/compose.locust-master.yaml
export COMPOSE_FILE
export LOCUST_MASTER_BIND
endif
IMAGE ?= lb-testbed:latest
BASE_TAG ?= lb-testbed/base:bookworm
BACKENDS ?= 3

.PHONY: venv test lint typecheck unit local up down bench bench-quick bench-failover drill soak \
	base-image image ca-cert admin-token clean subnet

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

# make local [ALGORITHM=least-connections] [TLS=1] [PAIR=1] [MODE=tcp [TCP_PORT=8081]]
#            [LISTEN_PORT=8080] [ADMIN_PORTS=9000 | with PAIR=1: 9001,9002] [BACKEND_PORTS=9101,9102,9103]
#            [ELECTION_PORTS=7946,7947]  (UDP, PAIR=1 only)
local: $(STAMP)
	$(BIN)/python -m loadtest.local $(if $(ALGORITHM),--algorithm $(ALGORITHM)) \
		$(if $(MODE),--mode $(MODE)) $(if $(TCP_PORT),--tcp-port $(TCP_PORT)) \
		$(if $(TLS),--tls) $(if $(PAIR),--pair) $(if $(LISTEN_PORT),--listen-port $(LISTEN_PORT)) \
		$(if $(ADMIN_PORTS),--admin-ports $(ADMIN_PORTS)) \
		$(if $(BACKEND_PORTS),--backend-ports $(BACKEND_PORTS)) \
		$(if $(ELECTION_PORTS),--election-ports $(ELECTION_PORTS))

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

# make soak [SOAK_MINUTES=10]; make soak CHAOS=1 [SOAK_MINUTES=60] [SEED=1]
soak: $(STAMP)
	mkdir -p out
ifdef CHAOS
	$(BIN)/python -m loadtest.soak --chaos --minutes $(or $(SOAK_MINUTES),60) \
		--seed $(or $(SEED),1) --json out/chaos.json --md out/chaos.md --plot out/chaos.png
else
	$(BIN)/python -m loadtest.soak --minutes $(or $(SOAK_MINUTES),10) --json out/soak.json \
		--plot out/soak.png
endif

# The Dockerfile defaults to python:3.12-slim; with no registry, build a Debian base locally.
base-image:
	tools/build-base-image.sh $(BASE_TAG)

image:
	@base="$(BASE_IMAGE)"; \
	if [ -z "$$base" ]; then \
	  if docker image inspect python:3.12-slim >/dev/null 2>&1 \
	     || timeout 60 docker pull -q python:3.12-slim >/dev/null 2>&1; then base=python:3.12-slim; \
	  else tools/build-base-image.sh $(BASE_TAG) || exit 1; base=$(BASE_TAG); fi; \
	fi; \
	echo "base image: $$base"; \
	docker build --build-arg BASE_IMAGE=$$base -t $(IMAGE) .
	docker image prune -f --filter label=org.lb-testbed.image=app >/dev/null

# make up [LB_SUBNET=172.29.0.0/24]: with no LB_SUBNET, a free /24 is chosen (see tools/choose_subnet.py)
up: subnet image
	@vars="$$(tools/choose_subnet.py)" || exit 2; export $$vars; \
	echo "network    $$LB_SUBNET (VIP $$LB_VIP, balancer-a $$LB_IP_A, balancer-b $$LB_IP_B, entry $$LB_IP_ENTRY)"; \
	$(COMPOSE) up -d --no-build --scale backend=$(BACKENDS)
	@echo "service    https://localhost:8443   (make ca-cert, then curl --cacert pki/ca.crt)"
	@echo "dashboards http://localhost:9001 (balancer-a)  http://localhost:9002 (balancer-b)  http://localhost:9003 (entry)"
	@echo "           reads are open; drain/maint/algorithm need the token: make admin-token"
	@echo "locust     http://localhost:8089"
	@$(if $(LOCUST_MASTER_BIND),echo "locust     workers join at $(LOCUST_MASTER_BIND):5557 (--worker --master-host THIS_HOST)")

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

# prints the balancers' admin token (made by the ca service) to stdout only: never a file
admin-token:
	@docker volume inspect $(COMPOSE_PROJECT_NAME)_certs >/dev/null 2>&1 \
	  || { echo "admin-token: no stack $(COMPOSE_PROJECT_NAME) yet: run make up first" >&2; exit 1; }
	@$(COMPOSE) run --rm -T --no-deps ca sh -c 'cat /certs/admin.token 2>/dev/null \
	  || { echo "admin-token: not made yet: run make up (the ca service makes it)" >&2; exit 1; }'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The two commands that matter: `make run` (the embedded default) and `make test`.
# Both install what they need on a fresh machine.
SHELL := /bin/bash
UV := uv
PYTEST_ARGS ?=

.PHONY: install run token test test-unit lint catalog up down bench rebuild check simulate clean faults soak

install:
	@command -v $(UV) >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check "uv==0.13.9"
	@$(UV) sync --frozen --quiet

run: install  ## embedded: one process, SQLite, in-process bus, on 127.0.0.1:8000
	$(UV) run --frozen python -m services.runtime --host 127.0.0.1 --port 8000 --seed-sample-region --print-tokens

token: install  ## a token from the local issuer: make token ROLE=crew VEHICLE=nx-120-07 (or FACILITY=, SITE=)
	@$(UV) run --frozen python -m libs.auth.issuer --role $(ROLE) $(if $(VEHICLE),--vehicle $(VEHICLE),) $(if $(FACILITY),--facility $(FACILITY),) $(if $(SITE),--site $(SITE),) $(if $(SUBJECT),--subject $(SUBJECT),)

lint: install
	$(UV) run --frozen ruff check libs services sim tests bench deploy
	$(UV) run --frozen mypy --strict libs services sim deploy

test-unit: install
	$(UV) run --frozen pytest tests/unit $(PYTEST_ARGS)

test: install lint  ## every tier, PostgreSQL and Kafka started (and stopped) by the project's scripts
	@start=$$(date +%s); \
	CI=$${CI:-} bash deploy/local/with-infra.sh $(UV) run --frozen pytest -p no:cacheprovider -ra $(PYTEST_ARGS); \
	status=$$?; echo "make test: $$(( $$(date +%s) - start )) s, exit $$status"; exit $$status

# The fault tests run in `make test` at CI scale; these run them alone and write their report
# where the README cites it. They start their own PostgreSQL, brokers and services (.run/faults).
FAULTS_SCALE ?= ci
faults: install  ## the fault tests alone (FAULTS_SCALE=ci|soak), report in docs/faults/<scale>.md
	@start=$$(date +%s); \
	CLOSEDLOOP_FAULTS_SCALE=$(FAULTS_SCALE) CLOSEDLOOP_FAULTS_REPORT=docs/faults/$(FAULTS_SCALE) \
	  $(UV) run --frozen pytest tests/faults -p no:cacheprovider -ra $(PYTEST_ARGS); \
	status=$$?; echo "make faults ($(FAULTS_SCALE)): $$(( $$(date +%s) - start )) s, exit $$status"; exit $$status

soak: install  ## the fault tests at full scale: more simulated load, more and repeated faults (docs/faults/soak.md)
	$(MAKE) faults FAULTS_SCALE=soak

catalog: install  ## the event catalogue as JSON Schema and AsyncAPI, in docs/events/
	$(UV) run --frozen python -m libs.events.catalogue docs/events

bench: install  ## every bench/bench_*.py (or BENCH="bench_x ..."), PostgreSQL and Kafka up
	bash deploy/local/with-infra.sh $(UV) run --frozen python -m bench $(BENCH)

rebuild: install  ## the projection's read models rebuilt beside the live ones, then switched (ORDER=seq|store, WORKERS=n)
	$(UV) run --frozen python -m services.projection.rebuild $(if $(ORDER),--order $(ORDER),) $(if $(WORKERS),--workers $(WORKERS),)

check: install  ## the invariant checker over the stores of MODE (embedded: DATA_DIR; distributed: `make up`'s)
	CLOSEDLOOP_PG_URL="$${CLOSEDLOOP_PG_URL:-postgresql+asyncpg://closedloop@127.0.0.1:$${CLOSEDLOOP_PG_PORT:-55432}/{service}}" \
	$(UV) run --frozen python -m services.invariants $(if $(MODE),--mode $(MODE),) \
	  $(if $(DATA_DIR),--data-dir $(DATA_DIR),) $(CHECK_ARGS)

simulate: install  ## a simulated day: TRANSFERS=50000 SPEED=max SEED=1; URL=http://... (make run) or TARGET=distributed (make up); else its own embedded app
	$(UV) run --frozen python -m sim $(if $(TRANSFERS),--transfers $(TRANSFERS),) $(if $(SPEED),--speed $(SPEED),) $(if $(SEED),--seed $(SEED),) $(if $(URL),--url $(URL),) $(if $(filter distributed,$(TARGET)),--distributed,) $(if $(JSON),--json $(JSON),)

# SCALE=city: three Kafka brokers (topics replicated 3 times, min.insync.replicas 2) and two
# replicas of each service behind deploy/local/balancer.py on 8001-8004.
CITY := $(filter city,$(SCALE))
up: install  ## distributed: PostgreSQL, Kafka, and each service as its own process (8001-8004); SCALE=city
	@[[ -z "$(SCALE)" || "$(SCALE)" == city ]] || { echo "SCALE must be city (or unset)" >&2; exit 2; }
	bash deploy/local/postgres.sh start
	bash deploy/local/kafka.sh start $(if $(CITY),--nodes 3,$(if $(NODES),--nodes $(NODES),))
	bash deploy/local/services.sh start $(if $(CITY),--replicas 2,)

down:
	-bash deploy/local/services.sh stop
	-bash deploy/local/kafka.sh stop
	-bash deploy/local/postgres.sh stop

clean: down
	rm -rf .run

# Developer shortcuts; each is one command you can also run by hand.
PY ?= .venv/bin/python

.PHONY: venv gen verify-gen fmt lint test bench up
venv:
	python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]'
gen:
	$(PY) scripts/gen_protos.py
verify-gen:
	$(PY) scripts/gen_protos.py --check
fmt:
	$(PY) -m ruff format .
lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .
test:
	$(PY) -m pytest
bench:
	$(PY) -m bench
up:
	.venv/bin/muster up

# The PostgreSQL high-availability tests (README "PostgreSQL high availability"): a failover driven by
# hand, PgBouncer in transaction mode, and Patroni failing over by itself. A missing peer (Debian's
# postgresql, pgbouncer, patroni, etcd-server) fails here instead of skipping.
.PHONY: ha
ha:
	MUSTER_REQUIRE_POSTGRES_PEERS=1 $(PY) -m pytest -q -s tests/integration/test_failover.py \
		tests/integration/test_pgbouncer.py tests/integration/test_patroni.py

# A long fault-injection run with the history checkers (tests/chaos/README.md): make chaos DURATION=10m SEED=42
DURATION ?= 10m
SEED ?=
.PHONY: chaos
chaos:
	$(PY) -m tests.chaos --seconds $(DURATION) $(if $(SEED),--seed $(SEED))

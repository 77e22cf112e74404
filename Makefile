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

# A long fault-injection run with the history checkers (tests/chaos/README.md): make chaos DURATION=10m SEED=42
DURATION ?= 10m
SEED ?=
.PHONY: chaos
chaos:
	$(PY) -m tests.chaos --seconds $(DURATION) $(if $(SEED),--seed $(SEED))

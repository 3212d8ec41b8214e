# eventdispatch: every target installs what it needs first, so a fresh machine needs only make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ED     := $(BIN)/eventdispatch

.PHONY: help setup stack-up stack-down stack-status demo test unit integration lint format clean
.PHONY: bench chaos

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(ED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(ED)

setup: $(ED)  ## create .venv and install the package with its dev tools

stack-up: $(ED)  ## start Pulsar, MongoDB (or FerretDB) and Redis on loopback, installing them on first use
	$(ED) stack up

stack-down: $(ED)  ## stop the services this checkout started
	$(ED) stack down

stack-status: $(ED)  ## show what runs where
	$(ED) stack status

demo: stack-up  ## dispatch an example script to 50 simulated devices and show the outcome
	bash scripts/demo.sh

lint: $(ED)  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

unit: $(ED)  ## the fast tests: pure code, no services
	$(BIN)/pytest tests/unit

integration: stack-up  ## the tests against the real services
	$(BIN)/pytest tests/integration

test: lint stack-up  ## everything CI runs: lint, unit and integration tests on the real services
	$(BIN)/pytest

chaos: $(ED)  ## 20,000 executions on a private stack while workers, Redis and the broker crash (15-25 min; not part of test)
	$(BIN)/python -m tests.chaos --executions 20000 --devices 2000 --workers 2

bench: stack-up  ## measure throughput, latency, timers, fan-out and projections (30-45 min; not in test)
	$(ED) bench

format: $(ED)  ## rewrite the code in the house style
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean: stack-down  ## stop the stack and remove its data and the venv
	rm -rf .stack $(VENV)

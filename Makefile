# `make demo`, `make test` (what CI runs) and `make test-fast` (everyday work). Each creates .venv when missing
# and installs the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint build-toy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowalign train configs/toy/digits_flow_grpo.yaml monitor.every=10

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	bash scripts/test_setup.sh
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow" tests

build-toy: $(STAMP)
	$(BIN)/flowalign toy build

clean:
	rm -rf $(VENV) outputs runs

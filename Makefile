# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# This machine's pip config lists local indexes; it warns once per package for the ones it skips.
QUIET_PIP := { grep -v 'is ignored: it is neither a file nor a directory' || true; }

.PHONY: run test install install-dev browser clean

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

# The report test renders report.html in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The nightly job: data, a trained and gated model, and reports on the real WM-811K lots.
REAL_LOTS ?= ../shared/data/wm811k/unlabeled_lots.parquet

run: install
	$(BIN)/waferseg generate --compare-real $(REAL_LOTS)
	$(BIN)/waferseg train
	$(BIN)/waferseg infer $(REAL_LOTS) --out reports/lots

test: install-dev browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) data/synthetic reports .pytest_cache

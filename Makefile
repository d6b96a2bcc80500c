# The README's two commands: `make run` and `make test`. Both create (or reuse)
# .venv, install what is missing, and need nothing but Python 3.11 beforehand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

.PHONY: install run search stack-up stack-down stack-status test test-slow test-all lint data serve-model repro push pull promote ui prefect-server worker serve bench

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade "pip>=24"
	$(PY) -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[dev]"
	@touch $(STAMP)

data/raw/digits.csv: | $(STAMP)
	$(PY) -m distilflow demo-data --out $@
	dvc add -q $@

data: data/raw/digits.csv

run: install data
	$(PY) -m distilflow run $(ARGS)

# an Optuna study over params.yaml's search.space; the pick is registered as @challenger (ARGS="--set ...")
search: install data
	$(PY) -m distilflow search $(ARGS)

# the team stack (README "Running as a team"): PostgreSQL, MLflow and Prefect servers on it, Dask; then
# `source .stack/env` and every command runs against it (ARGS="--workers 4", "--host 10.0.0.5")
stack-up: install
	$(PY) -m stack up $(ARGS)

stack-down: install
	$(PY) -m stack down $(ARGS)

stack-status: install
	$(PY) -m stack status $(ARGS)

# `make test`: format, lint and import-layering checks, then every test but the long end-to-end ones
# (< 10 min on 2 cores); CI (.ci/run) runs `make test` and `make test-slow`
test: install lint
	$(PY) -m pytest -m "not slow" $(ARGS)

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# the long tests, two files at a time: most of their time is spent waiting on servers and subprocesses
SLOW_WORKERS ?= 2
test-slow: install
	$(PY) -m pytest -m slow -n $(SLOW_WORKERS) --dist loadfile $(ARGS)

test-all: install
	$(PY) -m pytest $(ARGS)

repro: install data
	dvc repro

# DISTILFLOW_DVC_REMOTE=<url> points push/pull at another remote (saved in .dvc/config.local)
push pull: install data
	@if [ -n "$$DISTILFLOW_DVC_REMOTE" ]; then dvc remote add --local --force --default env "$$DISTILFLOW_DVC_REMOTE"; fi
	dvc $@

# Benchmarks (bench/README.md): ~25 min on 2 cores; ARGS="--quick" for ~5 min, ARGS="--only training"
bench: install
	$(PY) -m bench $(ARGS)

promote: install
	$(PY) -m distilflow promote $(ARGS)

# The MLflow UI on loopback, over the embedded store, opened in its model-training view
ui: install
	@echo "MLflow UI: http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlartifacts --host 127.0.0.1 --port 5000

# The champion over HTTP on loopback: POST raw rows to http://127.0.0.1:5001/invocations
serve-model: install
	$(PY) -m distilflow serve-model $(ARGS)

# Scheduled runs: a local Prefect server (UI at http://127.0.0.1:4200), then in another terminal `make worker`
prefect-server: install
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

worker: install
	PREFECT_API_URL=http://127.0.0.1:4200/api $(VENV)/bin/prefect work-pool create distilflow --type process --overwrite
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m distilflow deploy
	PREFECT_API_URL=http://127.0.0.1:4200/api $(VENV)/bin/prefect worker start --pool distilflow

# The same two deployments served from one process, without a worker
serve: install
	PREFECT_API_URL=http://127.0.0.1:4200/api $(PY) -m distilflow serve

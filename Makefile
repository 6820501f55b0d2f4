# Two commands on a fresh machine: `make demo` and `make test` (both create .venv themselves).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export MLFLOW_TRACKING_URI ?= sqlite:///mlflow.db
# A dead tracking server costs seconds, not MLflow's default ~4 minutes of retries (`mlflow run` reads these too).
export MLFLOW_HTTP_REQUEST_MAX_RETRIES ?= 2
export MLFLOW_HTTP_REQUEST_TIMEOUT ?= 10
export MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR ?= 1
# Keep CPU runs on the two cores a developer machine has, and quiet. A trainer's explicit
# `-P num_threads` (torch.set_num_threads) wins over this default.
export OMP_NUM_THREADS ?= 2
export PYTHONUNBUFFERED := 1
# `mlflow run --env-manager local` runs `python -m ...`: it must be this venv's python.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup demo test test-slow test-all ui server benchmarks mlproject clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on this machine's disk (a bare `torch` pulls a CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: setup
	@# A dead tracking server: our one line, not `mlflow run`'s traceback.
	$(PY) -c 'import sys; from tracking.cli import exit_on_input_error; from tracking.store import configure_tracking; sys.exit(exit_on_input_error(lambda: configure_tracking() and 0))'
	$(VENV)/bin/mlflow run . -e pipeline --env-manager local --experiment-name pipeline

# Everything but the tests marked slow (over ~30 s each); `.ci/run` runs both targets.
test: setup
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: setup
	$(PY) -m pytest -q -m slow --durations=15

test-all: setup
	$(PY) -m pytest -q --durations=15

ui: setup
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port 5000

benchmarks: setup
	$(PY) benchmarks/bench_forecasters.py --out benchmarks/forecasters.md
	$(PY) benchmarks/bench_mlflow_overhead.py

# Team tracking server: mlflow server on PostgreSQL (initialised under .mlflow-server/ on first use),
# artifacts served from .mlflow-server/artifacts, on 127.0.0.1:5000. Ctrl-C stops it and PostgreSQL.
server: setup
	scripts/mlflow_server.sh

mlproject: setup
	$(PY) -m mlflow_projects.mlproject_spec

clean:
	rm -rf mlruns mlartifacts mlflow.db optuna.db outputs

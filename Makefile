# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

# The demo installs what running needs (with ONNX: each registered version carries an ONNX
# export); the tests add the dev extra (pytest, ruff, Ray Tune, psycopg, the deploy linters).
# On a machine without a GPU, install the CPU wheels of torch first (README).
$(RUNTIME): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[onnx]'
	touch $(RUNTIME)

$(DEV): $(RUNTIME)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV)

demo: $(RUNTIME)
	$(BIN)/prunesearch run examples/digits.yaml

test: $(DEV)
	$(BIN)/ruff check orchestrator search_space workers tests benchmarks examples
	$(BIN)/ruff format --check orchestrator search_space workers tests benchmarks examples
	$(BIN)/python -m pytest -q --durations=25 tests

lint: $(DEV)
	$(BIN)/ruff check orchestrator search_space workers tests benchmarks examples
	$(BIN)/ruff format --check orchestrator search_space workers tests benchmarks examples

bench: $(DEV)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .prunesearch mlruns mlartifacts
	rm -f mlflow.db* optuna.db*  # each store with its -wal, -shm and -journal files

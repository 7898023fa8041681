# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prunesearch run examples/digits.yaml

test: $(STAMP)
	$(BIN)/ruff check orchestrator search_space workers tests benchmarks examples
	$(BIN)/ruff format --check orchestrator search_space workers tests benchmarks examples
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check orchestrator search_space workers tests benchmarks examples
	$(BIN)/ruff format --check orchestrator search_space workers tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) .prunesearch mlflow.db optuna.db mlruns

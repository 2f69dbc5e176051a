# The two commands a new machine needs: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment on first use; nothing else has to be installed or started.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench schema clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/vapora demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# pytest's exit code 5 (no tests collected) fails here like any other non-zero exit.
test: lint
	$(BIN)/python -m events.schema --check
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python -m bench

schema: $(BIN)/.installed
	$(BIN)/python -m events.schema

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

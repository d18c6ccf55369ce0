# Set-up and the two everyday commands. Everything runs inside .venv, created on first use.
# torch is pinned to the CPU build that installs from the local wheel cache (a bare `torch`
# would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint setup clean

$(BIN)/eqaudit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $(BIN)/eqaudit

setup: $(BIN)/eqaudit

demo: setup  ## audit the bundled demo model; writes reports/demo/
	$(BIN)/eqaudit demo

test: setup  ## the whole test suite
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

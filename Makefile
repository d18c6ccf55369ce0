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

# Triton, for the tests that run the GPU comparison kernel in Triton's CPU interpreter (CUDA
# builds of torch bring their own; without it those tests skip, saying so).
TRITON_SPEC ?= triton==3.9.0
$(VENV)/.test-deps: $(BIN)/eqaudit
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install --quiet "$(TRITON_SPEC)" \
		|| echo "warning: could not install $(TRITON_SPEC); the Triton kernel tests will skip"
	touch $@

test: setup $(VENV)/.test-deps  ## the whole test suite
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

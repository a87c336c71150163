# Loom: `make train` runs the quickstart recipe, `make test` the test suite.
# Both create .venv and install Loom into it when needed.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loom-installed
RECIPE ?= recipes/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: install train test test-all bench clean

install: $(STAMP)

# torch first: a bare `torch` requirement pulls a multi-GB CUDA build, so on
# machines without an NVIDIA GPU install the CPU build (local wheel or
# PyTorch's CPU index) before Loom's own requirements.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    $(PY) -m pip install "torch>=2.5"; \
	  else \
	    $(PY) -m pip install "torch==2.13.0" || \
	    $(PY) -m pip install torch --index-url https://download.pytorch.org/whl/cpu; \
	  fi; \
	fi
	$(PY) -m pip install -e ".[dev,tb]"
	@touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/loom train $(RECIPE)

# Default tier: everything not marked slow (CI runs this). pytest runs as its
# console script, not `python -m pytest`, which would put the checkout on
# sys.path: tests import the installed `loom` package only.
test: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -m "not slow" -q $(PYTEST_ARGS)

# Every tier, including the slow multi-process and end-to-end tests.
test-all: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/mixers.py

clean:
	rm -rf $(VENV) runs .pytest_cache

# Quick start:  make bench   (benchmark on this machine)   |   make test   (the test suite)
# Both create ./.venv and install what they need on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines install this torch; an already installed torch (e.g. a CUDA build) is kept.
TORCH_SPEC ?= torch==2.13.0
# The Triton CPU interpreter (kernel tests without a GPU) needs numpy < 2.4 with triton 3.6.
TRITON_SPEC ?= triton==3.6.0 numpy<2.4

.PHONY: install bench test check lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q $(foreach s,$(TRITON_SPEC),"$(s)")
	$(BIN)/pip install -q -e ".[dev,hf]"
	touch $@

# moba bench draws plot.png with matplotlib: the plot extra
$(VENV)/.installed-plot: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[plot]"
	touch $@

install: $(VENV)/.installed

bench: $(VENV)/.installed-plot
	$(BIN)/moba bench

check: install
	$(BIN)/moba check

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) bench_out runs

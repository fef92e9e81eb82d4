# Two commands for a fresh clone: `make demo` (set up + run the whole pipeline on the built-in demo data) and
# `make test` (set up + run the test suite). Both create and use the local virtualenv $(VENV).
PYTHON ?= python3
VENV ?= .venv
# torch/torchvision are installed first and explicitly so that pip does not pick an arbitrary build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEMO_DATA ?= data/demo
DEMO_RUNS ?= runs/demo
SEED ?= 0
BIN := $(VENV)/bin
export OMP_NUM_THREADS ?= 2

.PHONY: install test test-slow test-all demo demo-data clean-demo

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-all: install
	$(BIN)/python -m pytest -q -m ''

demo-data: install
	$(BIN)/python -m common.demo_data --out $(DEMO_DATA) --seed $(SEED)

demo: demo-data
	bash scripts/demo.sh $(DEMO_DATA) $(DEMO_RUNS)

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_RUNS)

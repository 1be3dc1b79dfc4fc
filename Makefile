# Two entry points: `make demo` runs the whole job on synthetic data, `make test` runs the suite.
# Each creates .venv when missing and installs what it needs; the install is pinned by constraints.txt.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev,onnx,serve,crf,hub,timm,tensorboard]'
	touch $@ $(VENV)/.demo-installed

.PHONY: demo test lint bench clean
demo: $(VENV)/.demo-installed
	$(BIN)/pixelwise demo --out demo_out

test: $(VENV)/.test-installed
	$(BIN)/ruff check pixelwise tests benchmarks
	$(BIN)/ruff format --check pixelwise tests benchmarks
	$(BIN)/python -m pytest

lint: $(VENV)/.test-installed
	$(BIN)/ruff check pixelwise tests benchmarks
	$(BIN)/ruff format --check pixelwise tests benchmarks

$(VENV)/.bench-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python benchmarks/speed.py
	$(BIN)/python benchmarks/metrics.py

clean:
	rm -rf $(VENV) demo_out

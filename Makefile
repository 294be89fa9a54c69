# recbench — set-up, tests and benchmarks. Everything runs in a local virtual environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned so that every stored row ran on one version. pip takes it from the configured
# indexes, so which build arrives depends on them: PyPI's Linux x86_64 wheel of torch 2.13.0 is the
# CUDA build (several GB); a machine whose pip config has a local CPU wheel (2.13.0+cpu) gets that.
#   CPU build from PyTorch's index:  make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   CUDA build for your driver:      make install TORCH_INDEX=https://download.pytorch.org/whl/cu126
#                                    (cu118, cu126, cu128, ...: see pytorch.org/get-started)
#   a torch you already have in the system Python (any >= 2.9, e.g. a cluster's CUDA build):
#                                    make install TORCH_SPEC='torch>=2.9' VENV_FLAGS=--system-site-packages
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
VENV_FLAGS ?=
# dev brings pytest, ruff and tensorboard (the tests run a TensorBoard bench).
EXTRAS ?= faiss-cpu,dev
DATASET ?= synthetic
MODELS ?=
SEEDS ?= 1
PROFILE ?= quick
# Where `make bench` writes rows: a git-ignored local directory by default; RESULTS_DIR=results
# stores them into the reference leaderboard (an explicit choice).
RESULTS_DIR ?= runs/results
# Checkpoints and logs of `make bench` (resumable runs live here).
WORK_DIR ?= runs/bench
export RECBENCH_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install test test-slow test-data test-full bench leaderboard lint gpu-prepare gpu-bench gpu-import

install:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" "$(TORCH_SPEC)"

test:
	$(PY) -m pytest -q -n auto --dist worksteal

test-slow:
	$(PY) -m pytest -q -n auto --dist worksteal -m "slow and not gpu and not data"

test-data:
	$(PY) -m pytest -q -m data

test-full:
	$(PY) -m pytest -q -n auto --dist worksteal -m "not gpu"

bench:
	RECBENCH_RESULTS_DIR=$(RESULTS_DIR) $(VENV)/bin/recbench bench --work_dir $(WORK_DIR) --dataset $(DATASET) --profile $(PROFILE) --seeds $(SEEDS) $(if $(MODELS),--models $(MODELS),)

leaderboard:
	$(VENV)/bin/recbench leaderboard

lint:
	$(VENV)/bin/ruff check recbench datamodules baselines benchmark tests examples

# The paper profile on a lent GPU (README, "Running the paper profile on a GPU"): `make gpu-prepare`
# here builds .whl/ and .carry/; `make gpu-bench` (= `bash benchmark/gpu/run.sh`) is the device call's
# command, with carry [".whl", ".carry"]; `make gpu-import FILES=<files_at>` stores the rows it returns.
GPU_PLAN ?=
GPU_MARGIN_MIB ?=
GPU_RESULTS_DIR ?= results
gpu-prepare:
	$(PY) -m benchmark.gpu.prepare $(if $(GPU_PLAN),--plan '$(GPU_PLAN)',) $(if $(GPU_MARGIN_MIB),--margin-mib $(GPU_MARGIN_MIB),)

gpu-bench:
	bash benchmark/gpu/run.sh

gpu-import:
	$(if $(FILES),,$(error FILES=<the folder the device tool copied $$OUT into> is required))
	$(PY) -m benchmark.gpu.import_rows $(FILES) --results-dir $(GPU_RESULTS_DIR)

# embedcache: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned for CI and fresh machines (these two install from the build machine's disk);
# pyproject keeps its own ranges loose for users who bring their own torch.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/extract/demo.yaml
ARGS ?=

.DEFAULT_GOAL := help
TRAIN_CONFIG ?= configs/train/demo.yaml
SWEEP ?= configs/sweep/demo.yaml
SYNTH ?= configs/synthesize/pacs-contrastive.yaml
TEST_WORKERS ?= 2
.PHONY: help install extract inspect train sweep report test bench clean clean-runs clean-stores synthesize

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-13s %s\n", $$1, $$2}'
	@echo "  variables: CONFIG=configs/extract/<name>.yaml  TRAIN_CONFIG=configs/train/<name>.yaml  SWEEP=configs/sweep/<name>.yaml"
	@echo "             SYNTH=configs/synthesize/<name>.yaml  SWEEP_DIR=sweeps/<name>  STORE=path  ARGS='--set k=v'  TEST_WORKERS=2"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[offline,test,ray,serve]'
	touch $@

install: $(VENV)/.installed ## create .venv and install embedcache with its extras: offline teacher, test tools, ray, serve

extract: $(VENV)/.installed ## extract a store (CONFIG=..., default: the synthetic demo; ARGS for --set/--out)
	$(VENV)/bin/embedcache extract --config $(CONFIG) $(ARGS)

inspect: $(VENV)/.installed ## summarise a store (STORE=stores/demo.zarr)
	$(VENV)/bin/embedcache inspect $(or $(STORE),stores/demo.zarr)

train: $(VENV)/.installed ## train a student from a store (TRAIN_CONFIG=..., default: demo; ARGS for --set)
	$(VENV)/bin/embedcache train --config $(TRAIN_CONFIG) $(ARGS)

sweep: $(VENV)/.installed ## run a sweep (SWEEP=..., default: the demo over stores/demo.zarr, made first), then print its table
	$(if $(filter configs/sweep/demo.yaml demo,$(SWEEP)),$(VENV)/bin/embedcache extract --config configs/extract/demo.yaml --no-progress)
	$(VENV)/bin/embedcache sweep $(SWEEP) $(ARGS)

synthesize: $(VENV)/.installed ## synthesise a store from class names (SYNTH=configs/synthesize/<name>.yaml; ARGS for --set/--out)
	$(VENV)/bin/embedcache synthesize --config $(SYNTH) $(ARGS)

report: $(VENV)/.installed ## markdown tables and plots of a sweep (SWEEP_DIR=sweeps/demo)
	$(VENV)/bin/embedcache report $(or $(SWEEP_DIR),sweeps/demo)

test: $(VENV)/.installed ## run the test suite (CPU, no network; TEST_WORKERS=2 pytest-xdist processes, 0 for one)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: $(VENV)/.installed ## run the benchmarks under bench/ (tables printed, JSON in bench/results/)
	$(PY) bench/extract.py
	$(PY) bench/train.py
	$(PY) bench/evaluate.py
	$(VENV)/bin/embedcache extract --config configs/extract/demo.yaml --no-progress
	$(PY) bench/sweep.py
	$(PY) bench/pack.py
	$(PY) bench/remote.py
	$(PY) bench/synthesize.py

clean: ## remove caches only: .pytest_cache, __pycache__ (keeps stores, runs, sweeps, bench/results and .venv)
	rm -rf .pytest_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +

clean-runs: ## remove trained runs and their results: runs/ sweeps/ report/ results.parquet (compute to redo!)
	rm -rf runs sweeps report results.parquet

clean-stores: ## remove extracted stores: stores/ (the teacher's work: an hour or more to redo for PACS)
	rm -rf stores

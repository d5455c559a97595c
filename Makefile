# vpt-bench workflow targets; `make help` lists them. Every default lives in the Python entry points: a variable
# given on the command line becomes the flag of the same name (DATA_ROOT=x -> --data-root=x, WANDB=1 -> --wandb=1),
# and an entry point that has no such flag says so. `python -m benchmark.<entry> -h` lists each one's flags.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The one torch pin: pyproject.toml's, installed first so pip takes the wheels from the machine's local cache.
TORCH_PINS = $(shell grep -oE '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"')

flag = --$(shell echo '$(1)' | tr 'A-Z_' 'a-z-')="$($(1))"
ARGS = $(strip $(foreach v,$(filter-out PYTHON_SYS,$(.VARIABLES)),$(if $(filter command line,$(origin $(v))),$(call flag,$(v)))))

.PHONY: help install data bench grid fig3 zoo report sweep-config params perf gpu-check pretrain prepare splits test \
	test-slow mutation lint format clean evaluate leaderboard

help: ## Show the targets and the methods
	@grep -hE '^[a-z0-9 -]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-13s %s\n", $$1, $$2}'
	@if [ -x $(PY) ]; then $(PY) -m benchmark.params --list-methods; fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create or reuse .venv with the suite (editable) and its dev tools

data: ## Fashion-MNIST from Debian (dataset-fashion-mnist) for the embedded default, when missing
	@test -f $(FMNIST) || (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && \
		apt-get install -y -q dataset-fashion-mnist)) >/dev/null || { echo "run: sudo apt-get install dataset-fashion-mnist"; exit 1; }

bench: install data ## One run: make bench METHOD=vpt_deep FRACTION=0.1 [DATASET= DATA_ROOT= RECIPE=quick|paper|<file.yaml>|selected:<results> BACKBONE= WEIGHTS= BACKBONE_ARGS="k=v" METHOD_ARGS="k=v" ...]
	$(PY) -m benchmark.run $(ARGS)

grid: install data ## A resumable grid: make grid METHODS=a,b FRACTIONS=0.1,1 (or SHOTS=1,2,4) SEEDS=0,1 DATASETS= [OPTIONS="k=v1,v2" SEARCH=1 SHARD=i/n JOBS=2]
	$(PY) -m benchmark.grid $(ARGS)

fig3 zoo leaderboard: install data ## fig3: the embedded Fig. 3; zoo: every method at 100%; leaderboard: every method, one search budget [SEARCH=halving DATASETS=vtab-1k DRY_RUN=1]; then the report
	$(PY) -m benchmark.grid --$@ $(ARGS) || [ $$? -eq 1 ]  # 1: some runs failed; the report draws the rest
	$(if $(filter 1,$(DRY_RUN)),,$(PY) -m benchmark.report --$@ $(filter --results=% --results-dir=% --wandb=% --recipe=% --epochs=% --perf=%,$(ARGS)))

report: install ## Fig. 3, parameter plot and tables from the results -> results/figures [DATASETS= METHODS= RECIPE= EPOCHS= WANDB=1 LEADERBOARD=1 PERF=]
	$(PY) -m benchmark.report $(ARGS)
evaluate: install ## Re-score a run from its checkpoint: make evaluate RUN=<result.json> [DATASET= DATA_ROOT= EXTRA_TEST= EXPORT=merged]
	$(PY) -m benchmark.evaluate $(ARGS)
sweep-config: install ## The W&B sweep YAML of a grid (the grid's variables) -> results/sweep.yaml
	$(PY) -m benchmark.sweep $(ARGS)
params: install ## Tuned-parameter counts per method [BACKBONE=vit_base_patch16_224 NUM_CLASSES=200 METHOD_ARGS=]
	$(PY) -m benchmark.params $(ARGS)
perf: install data ## Cost per method -> results/perf.csv [BACKBONE= METHODS= BATCH_SIZE= PRECISION= COMPILE=1 REPEATS=] [LOADER_BENCHMARK=1]
	$(PY) -m benchmark.perf $(ARGS)
gpu-check: install ## On one GPU in <= 8 min: every method's img/s and memory, the loader, one run -> results/gpu_check.csv (CPU: tiny)
	$(PY) -m benchmark.gpu_check $(ARGS)
pretrain: install data ## Re-pretrain the embedded backbone on Fashion-MNIST (writes results/embedded/)
	OMP_NUM_THREADS=1 $(PY) -m benchmark.pretrain $(ARGS)
prepare: install ## FGVC JSON splits from an original release: make prepare DATASET=cub RAW=<dir> [DATA_ROOT=<out>]
	$(PY) -m benchmark.prepare $(ARGS)
splits: install ## FGVC train_<p>.json fraction files: make splits DATASET=cub DATA_ROOT=<dir> [FRACTIONS=]
	$(PY) -m benchmark.splits $(ARGS)

test: install data ## The fast test suite (slow tests excluded)
	$(PY) -m pytest -m "not slow" -q -n 2  # two one-thread workers (tests/conftest.py): the two cores
test-slow: install data ## The slow tests only
	$(PY) -m pytest -m slow -q
mutation: install data ## Planted one-line bugs against the fast suite [JOBS=1 CHANGED=1: only the changed modules' mutants]
	$(PY) tests/mutation/run.py $(ARGS)

lint: install ## ruff check
	$(PY) -m ruff check backbones methods datamodules benchmark tests
format: install ## ruff format + import order
	$(PY) -m ruff check --fix --select I backbones methods datamodules benchmark tests
	$(PY) -m ruff format backbones methods datamodules benchmark tests
clean: ## Remove run outputs (keeps .venv and the committed reference results)
	rm -rf results/runs results/logs results/splits results/cache results/claims results/summary.csv

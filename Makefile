# vpt-bench — every target installs what it needs; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

# Run variables (empty = the recipe's / embedded default's value).
METHOD ?= vpt_deep
FRACTION ?= 0.1
DATASET ?=
SEED ?=
BACKBONE ?=
WEIGHTS ?=
EPOCHS ?=
BATCH_SIZE ?=
LR ?=
WD ?=
RECIPE ?=
DATA_ROOT ?=
RAW ?=
FRACTIONS ?=
TRAIN_ON ?=
NUM_WORKERS ?=
METHOD_ARGS ?=
PARTIAL_K ?=
MLP_K ?=
LORA_RANK ?=
PRECISION ?=
COMPILE ?= 0
CHECKPOINTING ?= 0
METHODS ?=
IMG_SIZE ?=
STEPS ?=
WARMUP ?=
REPEATS ?=
WANDB ?= 0
FORCE ?= 0
TAG ?=
RESULTS ?= results
# Scaling out: one run over DEVICES x NUM_NODES processes (STRATEGY=ddp); a grid's part SHARD=i/n (i from 0).
DEVICES ?=
NUM_NODES ?=
STRATEGY ?=
SHARD ?=
JOBS ?=

opt = $(if $(strip $(2)),$(1) $(2))
# $(call method_arg,METHOD_NAME,VALUE,OPTION): --method-arg OPTION=VALUE when METHOD is METHOD_NAME and VALUE is set
method_arg = $(if $(and $(filter $(1),$(METHOD)),$(strip $(2))),--method-arg $(3)=$(strip $(2)))
# Options of every run, whether one (bench) or a grid of them (grid, fig3, sweep-config).
RUN_OPTIONS = $(call opt,--backbone,$(BACKBONE)) \
	$(call opt,--weights,$(WEIGHTS)) $(call opt,--epochs,$(EPOCHS)) $(call opt,--batch-size,$(BATCH_SIZE)) \
	$(call opt,--lr,$(LR)) $(call opt,--weight-decay,$(WD)) $(call opt,--recipe,$(RECIPE)) \
	$(call opt,--data-root,$(DATA_ROOT)) $(call opt,--results-dir,$(RESULTS)) \
	$(call opt,--train-on,$(TRAIN_ON)) $(call opt,--num-workers,$(NUM_WORKERS)) \
	$(foreach a,$(METHOD_ARGS),--method-arg $(a)) \
	$(call opt,--precision,$(PRECISION)) $(if $(filter 1,$(COMPILE)),--compile) \
	$(call opt,--devices,$(DEVICES)) $(call opt,--num-nodes,$(NUM_NODES)) $(call opt,--strategy,$(STRATEGY)) \
	$(if $(filter 1,$(CHECKPOINTING)),--checkpointing) \
	$(if $(filter 1,$(WANDB)),--wandb) $(if $(filter 1,$(FORCE)),--force)
RUN_ARGS = --method $(METHOD) --fraction $(FRACTION) \
	$(call opt,--dataset,$(DATASET)) $(call opt,--seed,$(SEED)) $(call opt,--tag,$(TAG)) \
	$(call method_arg,partial_k,$(PARTIAL_K),k) $(call method_arg,mlp_k,$(MLP_K),k) \
	$(call method_arg,lora,$(LORA_RANK),rank) $(RUN_OPTIONS)

# Grid variables: comma (or quoted space) lists; empty METHODS/FRACTIONS = the paper's six methods / five fractions.
SEEDS ?= 0
DATASETS ?= digits,fashion_heldout
SEARCH ?= 0
SEARCH_LRS ?=
SEARCH_WDS ?=
PAPER_METHODS := full,linear,bias,adapter,vpt_shallow,vpt_deep
PAPER_FRACTIONS := 0.1,0.2,0.4,0.8,1.0
EMBEDDED_DATASETS := digits,fashion_heldout
EMBEDDED_BACKBONE := vit_embedded_p7_28
SEARCH_ARGS = $(if $(filter 1,$(SEARCH)),--search) $(if $(strip $(SEARCH_LRS)),--search-lrs "$(SEARCH_LRS)") \
	$(if $(strip $(SEARCH_WDS)),--search-wds "$(SEARCH_WDS)")
GRID_ARGS = --methods "$(or $(METHODS),$(PAPER_METHODS))" --fractions "$(or $(FRACTIONS),$(PAPER_FRACTIONS))" \
	--seeds "$(SEEDS)" --datasets "$(DATASETS)" $(SEARCH_ARGS) $(RUN_OPTIONS)
# The report filters only by what was set on the command line; by default it shows every dataset and method.
cli_opt = $(if $(filter command line,$(origin $(2))),$(1) "$($(2))")
REPORT_ARGS = --results-dir $(RESULTS) $(call cli_opt,--datasets,DATASETS) $(call cli_opt,--methods,METHODS) \
	$(call opt,--backbone,$(BACKBONE)) $(if $(filter 1,$(WANDB)),--wandb)

.PHONY: help install data bench pretrain params prepare splits test test-slow lint perf perf-cache perf-search grid fig3 report sweep-config clean

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'
	@echo "Variables: METHOD FRACTION DATASET SEED BACKBONE WEIGHTS EPOCHS BATCH_SIZE LR WD RECIPE DATA_ROOT RAW FRACTIONS TRAIN_ON NUM_WORKERS METHOD_ARGS PARTIAL_K MLP_K LORA_RANK PRECISION COMPILE CHECKPOINTING METHODS IMG_SIZE STEPS WARMUP REPEATS WANDB FORCE TAG DEVICES NUM_NODES STRATEGY SHARD JOBS"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	# torch first, pinned: pip takes these from the machine's local wheel cache (no 3 GB download).
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## Create/reuse .venv and install the suite (editable) with dev tools

data: ## Install the offline upstream dataset (Debian dataset-fashion-mnist) when missing
	@if [ ! -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
		else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; fi; fi

bench: install data ## One run: make bench METHOD=vpt_deep FRACTION=0.1 [DATASET= SEED= BACKBONE= WEIGHTS= EPOCHS= DEVICES=2 STRATEGY=ddp ...]
	$(PY) -m benchmark.run $(RUN_ARGS)

pretrain: install data ## Re-pretrain the embedded backbone on Fashion-MNIST (writes results/embedded/)
	OMP_NUM_THREADS=1 $(PY) -m benchmark.pretrain

params: install ## Parameter counts per method: make params BACKBONE=vit_base_patch16_224
	$(PY) -m benchmark.params --backbone $(or $(BACKBONE),vit_base_patch16_224) --num-classes 200 --csv \
		$(call opt,--partial-k,$(PARTIAL_K)) $(call opt,--mlp-k,$(MLP_K)) $(call opt,--lora-rank,$(LORA_RANK))

grid: install data ## Grid of runs, resumable: make grid [METHODS=a,b FRACTIONS=0.1,1.0 SEEDS=0,1 DATASETS=digits SEARCH=1 WANDB=1 EPOCHS= SHARD=i/n JOBS=2 ...]
	$(PY) -m benchmark.grid $(GRID_ARGS) $(if $(strip $(SHARD)),--shard=$(strip $(SHARD))) $(call opt,--jobs,$(JOBS))

# Exit status 1 = some runs failed (recorded in their JSON): the report still draws every finished run.
# Two runs at a time by default (JOBS=): the small model trains faster as 2 x 1 thread than 1 x 2 threads.
fig3: install data ## Fig. 3 of the embedded default: 6 methods x 5 fractions on digits + fashion_heldout, then the report [JOBS=2]
	$(PY) -m benchmark.grid --methods $(PAPER_METHODS) --fractions $(PAPER_FRACTIONS) --seeds "$(SEEDS)" \
		--datasets $(EMBEDDED_DATASETS) $(SEARCH_ARGS) $(RUN_OPTIONS) \
		$(if $(filter 1,$(SEARCH)),$(call opt,--jobs,$(JOBS)),--jobs $(or $(JOBS),2)) || [ $$? -eq 1 ]
	$(PY) -m benchmark.report --results-dir $(RESULTS) --datasets $(EMBEDDED_DATASETS) \
		--methods $(PAPER_METHODS) --backbone $(or $(BACKBONE),$(EMBEDDED_BACKBONE)) $(if $(filter 1,$(WANDB)),--wandb)

report: install ## Fig. 3, parameter plot, Table 1 -> results/figures [DATASETS= METHODS= BACKBONE= WANDB=1]
	$(PY) -m benchmark.report $(REPORT_ARGS)

sweep-config: install ## W&B sweep YAML of a grid -> results/sweep.yaml (same variables as grid), for `wandb agent`
	$(PY) -m benchmark.sweep $(GRID_ARGS) --out $(RESULTS)/sweep.yaml

test: install data ## Fast test suite (slow tests excluded)
	$(PY) -m pytest -m "not slow" -q

test-slow: install data ## Slow tests only
	$(PY) -m pytest -m slow -q

lint: install ## Ruff lint
	$(PY) -m ruff check methods datamodules benchmark tests

prepare: install ## FGVC JSON splits from an original release: make prepare DATASET=cub RAW=<dir> [DATA_ROOT=<out>]
	@test -n "$(DATASET)" -a -n "$(RAW)" || { echo "usage: make prepare DATASET=cub|nabirds|flowers|dogs|cars RAW=<dir> [DATA_ROOT=<out>] [FORCE=1]"; exit 2; }
	$(PY) -m benchmark.prepare --dataset $(DATASET) --raw "$(RAW)" $(call opt,--out,$(DATA_ROOT)) \
		$(call opt,--seed,$(SEED)) $(if $(filter 1,$(FORCE)),--force)

splits: install ## Write FGVC train_<p>.json fraction files: make splits DATASET=cub DATA_ROOT=<dir> [FRACTIONS="0.1 0.2"]
	@test -n "$(DATASET)" -a -n "$(DATA_ROOT)" || { echo "usage: make splits DATASET=<fgvc name> DATA_ROOT=<dir> [FRACTIONS=\"0.1 0.2 0.4 0.8\"] [SEED=0] [FORCE=1]"; exit 2; }
	$(PY) -m benchmark.splits --dataset $(DATASET) --data-root "$(DATA_ROOT)" --fractions $(FRACTIONS) \
		$(call opt,--seed,$(SEED)) $(if $(filter 1,$(FORCE)),--force)

PERF_ARGS = $(call opt,--backbone,$(BACKBONE)) $(call opt,--methods,$(METHODS)) \
	$(call opt,--batch-size,$(BATCH_SIZE)) $(call opt,--img-size,$(IMG_SIZE)) $(call opt,--precision,$(PRECISION)) \
	$(call opt,--steps,$(STEPS)) $(call opt,--warmup,$(WARMUP)) $(call opt,--repeats,$(REPEATS)) $(foreach a,$(METHOD_ARGS),--method-arg $(a)) \
	$(if $(filter 1,$(COMPILE)),--compile) $(if $(filter 1,$(CHECKPOINTING)),--checkpointing)

perf: install ## Cost per method -> results/perf.csv + figure [BACKBONE= METHODS=full,vpt_deep BATCH_SIZE= IMG_SIZE= PRECISION=bf16-mixed COMPILE=1 CHECKPOINTING=1 STEPS= WARMUP= REPEATS=]
	$(PY) -m benchmark.perf $(PERF_ARGS)

perf-cache: install data ## Linear probe end to end, with vs without the feature cache [EPOCHS=100 FRACTIONS=0.1,1.0 REPEATS=]
	$(PY) -m benchmark.perf --feature-cache-benchmark $(call opt,--epochs,$(EPOCHS)) $(call opt,--repeats,$(REPEATS)) $(if $(strip $(FRACTIONS)),--fractions "$(FRACTIONS)")

perf-search: install data ## Linear probe: the 40-point lr x wd grid in one pass vs one run and 40 runs [FRACTIONS=0.1,1.0 REPEATS=3 EPOCHS= RECIPE=]
	$(PY) -m benchmark.perf --linear-search $(call opt,--epochs,$(EPOCHS)) $(call opt,--recipe,$(RECIPE)) $(call opt,--repeats,$(REPEATS)) $(if $(strip $(FRACTIONS)),--fractions "$(FRACTIONS)")

clean: ## Remove run outputs (keeps .venv and committed reference results)
	rm -rf results/runs results/logs results/splits results/cache results/summary.csv

# One entry point for people and CI. `make install` builds .venv from requirements.lock, the exact
# version of every package for Python 3.11 (`make lock` refreshes it from pyproject.toml). torch
# and torchvision go in first: an unpinned torch is a multi-GB download, and other torchvision
# builds fail to import beside it.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
CONDA_ENV := workflow/envs/bayestune.yaml
TORCH_PINS := $(shell grep -E '^torch(vision)?==' $(LOCK) | cut -d' ' -f1)
export PATH := $(abspath $(BIN)):$(PATH)

# Task data: the local GLUE/SuperGLUE copy beside the repository when there is one (and
# $BAYESTUNE_GLUE_DIR is unset), else the Hugging Face Hub.
LOCAL_GLUE := ../shared/data/glue_superglue
ifeq ($(BAYESTUNE_GLUE_DIR),)
ifneq ($(wildcard $(LOCAL_GLUE)/cola/train.jsonl),)
export BAYESTUNE_GLUE_DIR := $(abspath $(LOCAL_GLUE))
endif
endif
ifeq ($(BAYESTUNE_GLUE_DIR),)
GLUE_SOURCE := --config glue_dir=hub
HUB_CHECK := import urllib.request as r; r.urlopen('https://huggingface.co', timeout=15)
OFFLINE_HELP := error: the Hugging Face Hub is unreachable (offline?). Set BAYESTUNE_GLUE_DIR \
	to a folder laid out as <task>/{train,val,test}.jsonl, or connect and rerun.
define check_glue_source
	@echo "No GLUE/SuperGLUE copy at $(LOCAL_GLUE) or \$$BAYESTUNE_GLUE_DIR: using the Hub."
	@$(BIN)/python -c "$(HUB_CHECK)" 2>/dev/null || { echo "$(OFFLINE_HELP)" >&2; exit 1; }
endef
endif

.PHONY: install lock test lint demo cpu reproduce sweep-cpu paper report bench clean-demo gpu-carry \
	gpu-jobs gpu-evidence

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	@$(PYTHON) -c "import sys; sys.exit(sys.version_info[:2] != (3, 11))" \
	|| { echo "error: $(LOCK) is for Python 3.11: make PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# Re-resolve the lock from pyproject.toml (with the extras `install` uses; needs PyPI), then write
# its pins into the workflow's conda environment. Pins still allowed by pyproject.toml are kept:
# `make lock PIP_COMPILE_FLAGS=--upgrade` moves every package to its newest release.
PIP_COMPILE_FLAGS ?=
lock: install
	$(BIN)/pip install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" $(BIN)/pip-compile --quiet $(PIP_COMPILE_FLAGS) \
		--extra workflow --extra offline --extra dev --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --annotation-style line \
		--output-file $(LOCK) pyproject.toml
	$(MAKE) --no-print-directory $(CONDA_ENV)

$(CONDA_ENV): $(LOCK)
	{ echo "# The workflow's software environment (snakemake --software-deployment-method conda)."; \
	  echo "# Written by make lock from $(LOCK), for Python 3.11: do not edit by hand."; \
	  echo "channels: [conda-forge, nodefaults]"; \
	  echo "dependencies:"; echo "  - python=3.11"; echo "  - pip"; echo "  - pip:"; \
	  grep -E '^[A-Za-z0-9]' $(LOCK) | cut -d' ' -f1 | sed 's/^/      - /'; } > $@

# ruff, then Snakemake's own linter (it fails on any lint).
lint: install
	$(BIN)/ruff check src tests
	$(BIN)/snakemake --lint

# -rs prints why a test was skipped (the SLURM test needs root and apt-get or Debian's slurm
# packages; where it runs it prints the jobs it submitted and its wall time).
# Two test processes, each test file in one of them (files share fixtures, e.g. a prepared
# workflow copy); TEST_WORKERS=0 runs them all in this process.
TEST_WORKERS ?= 2
test: install lint
	$(BIN)/pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=15

demo: install
	$(check_glue_source)
	$(BIN)/snakemake --cores all --configfile config/demo.yaml $(GLUE_SOURCE)

cpu: install
	$(check_glue_source)
	$(BIN)/snakemake --cores all --configfile config/cpu.yaml $(GLUE_SOURCE)

# Does BayesTune reproduce? The paper's stage 1 at its length on a 1-layer MiniLM (CoLA), then
# stage 2 under the fair protocol (config/reproduce.yaml), the `cold` chain and the chain with
# lambda on its own scale beside it (config/reproduce_cold.yaml, config/reproduce_lambda.yaml),
# what the chains rank by (results/reproduce/analysis/), every chain's stage 2 side by side
# with paired differences (results/reproduce/all_chains/), and the paper's chain against a
# uniform random 0.5% of every scalar (config/reproduce_uniform.yaml,
# results/reproduce/uniform_null/), and the rows of every chain, the uniform draw and full
# fine-tuning again with stage 2 twice as long, on the same chains
# (config/reproduce_long*.yaml, results/reproduce_long/all_chains/).
# The two long chains first, one per core, so that no core idles at the end.
reproduce: install
	$(check_glue_source)
	@start=$$(date +%s); \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce.yaml $(GLUE_SOURCE) --until sample && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_cold.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_lambda.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_uniform.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_long.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_long_cold.yaml $(GLUE_SOURCE) && \
	$(BIN)/snakemake --cores 2 --configfile config/reproduce_long_lambda.yaml $(GLUE_SOURCE) && \
	$(BIN)/bayestune compare-chains results/reproduce results/reproduce_cold \
		results/reproduce_lambda --task cola --out-dir results/reproduce/analysis && \
	$(BIN)/bayestune report --benchmark glue --label-presets --reference "bayestune (reference)" \
		--metrics $$(find results/reproduce results/reproduce_cold results/reproduce_lambda \
		-path '*/finetune/*' -name metrics.json | sort) --out-dir results/reproduce/all_chains && \
	$(BIN)/bayestune report --benchmark glue --metrics \
		$$(find results/reproduce/finetune/bayestune results/reproduce_uniform/finetune \
		-name metrics.json | sort) --out-dir results/reproduce/uniform_null && \
	$(BIN)/bayestune report --benchmark glue --label-presets --reference "bayestune (reference)" \
		--metrics $$(find results/reproduce_long results/reproduce_long_cold \
		results/reproduce_long_lambda -path '*/finetune/*' -name metrics.json | sort) \
		--out-dir results/reproduce_long/all_chains && \
	echo "make reproduce: $$(( $$(date +%s) - start )) s on $$(nproc) cores" \
		| tee results/reproduce/wall_time.txt

# Stage-1 settings for cpu.yaml, scored on the validation split only (hours on 2 cores; minutes
# with --device cuda --workers 12 on a GPU: docs/RESULTS.md).
sweep-cpu: install
	$(check_glue_source)
	$(BIN)/snakemake --cores all --configfile config/cpu.yaml $(GLUE_SOURCE) --until prepare
	$(BIN)/bayestune sweep --config config/cpu.yaml --grid config/sweeps/cpu_sampler.yaml \
		--out results/cpu/sweep/sweep_val.csv --workers 2

paper: install
	$(BIN)/snakemake --cores all results/glue_table.csv

# One HTML page with every table and figure of a finished run, e.g. after `make demo`:
# make report (-> results/demo_report.html); make report CONFIG=config/cpu.yaml
CONFIG ?= config/demo.yaml
report: install
	$(BIN)/snakemake --configfile $(CONFIG) \
		--report results/$(notdir $(basename $(CONFIG)))_report.html

# GPU evidence (docs/RESULTS.md, "GPU evidence"). Here, with Snakemake: `make gpu-carry` writes MiniLM
# in fp16 with its tokenizer to .carry/minilm (45 MB, ignored by git: it travels as a carried
# path) and `make gpu-jobs` renders config/gpu.yaml's jobs into config/gpu_jobs.json (committed).
# On the GPU machine (python3 with torch, no Snakemake, no network): `make gpu-evidence`
# (scripts/gpu_evidence.sh) runs that list, GPU_SLOTS jobs at once on the one GPU, compares each
# task's chains, times the bench and copies tables, figures, per-job times, the chains' logs and
# diagnostics and the device's name into docs/results/gpu/. `make gpu-evidence SMOKE=1` renders
# and runs the same path at toy size on the CPU (config/gpu_smoke.yaml, results/gpu_smoke/),
# without the bench.
PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_SLOTS ?= 14
ifeq ($(SMOKE),1)
GPU_CONFIG := config/gpu_smoke.yaml
GPU_JOBS := results/gpu_smoke/jobs.json
GPU_RESULTS := results/gpu_smoke
EVIDENCE := results/gpu_smoke/evidence
GPU_SLOTS := 2
BENCH_MODEL :=
else
BENCH_MODEL := .carry/minilm
GPU_CONFIG := config/gpu.yaml
GPU_JOBS := config/gpu_jobs.json
GPU_RESULTS := results/gpu
EVIDENCE := docs/results/gpu
endif

gpu-carry: .carry/minilm/model.safetensors

# CARRY_MODEL: the model written there (the tests carry a tiny encoder of MiniLM's family).
CARRY_MODEL ?= minilm
.carry/minilm/model.safetensors:
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bayestune carry-model --model $(CARRY_MODEL) --out .carry/minilm

gpu-jobs: gpu-carry
	PYTHONPATH=src$${PYTHONPATH:+:$$PYTHONPATH} $(PY) -m bayestune render-jobs --configfile $(GPU_CONFIG) --out $(GPU_JOBS)

ifeq ($(SMOKE),1)
gpu-evidence: gpu-jobs
endif
gpu-evidence:
	GPU_JOBS=$(GPU_JOBS) GPU_RESULTS=$(GPU_RESULTS) EVIDENCE=$(EVIDENCE) GPU_SLOTS=$(GPU_SLOTS) \
		BENCH_MODEL=$(BENCH_MODEL) PY=$(PY) \
		BAYESTUNE_GLUE_DIR=$${BAYESTUNE_GLUE_DIR:-$(abspath $(LOCAL_GLUE))} \
		bash scripts/gpu_evidence.sh

bench: install
	$(BIN)/bayestune bench --out results/bench/bench.json

clean-demo:
	rm -rf results/demo data/demo

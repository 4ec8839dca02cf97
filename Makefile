# t2v-slurm: every user-facing command. `make help` lists them.
# Training settings pass straight through as the baseline's variables: make submit STEPS=5000 BS=4 ...
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?=
ARGS ?=
RUN ?=
# The demo's knobs (CPU, a few minutes).
DEMO_CONFIG ?= configs/demo.yaml

.DEFAULT_GOAL := help
export CONFIG

.PHONY: help install test test-fast test-slow demo-data demo embed cache train sample submit status logs cancel \
        report bench gpu-check cache-submit slurm-deps browser-deps slurm-up slurm-down clean

help: ## list every target with one line each
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-11s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project (CPU torch 2.13.0 only where no torch is present)
$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PY) -m venv --system-site-packages $(VENV)
	@# On the cluster the container's CUDA torch is visible through --system-site-packages and is kept.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"
	@touch $@

slurm-deps: ## install Slurm + munge from Debian (root; used by the Slurm integration tests)
	@command -v slurmctld >/dev/null && command -v munged >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; \
	  else echo "slurm-deps: not root; Slurm integration tests will be skipped"; fi; }

browser-deps: ## install Debian's chromium + chromedriver (root; the run page's real-browser test)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null; \
	  else echo "browser-deps: not root; the run page's browser test will be skipped"; fi; }

test: install slurm-deps browser-deps ## run the whole suite: fast unit tests and slow end-to-end tests (CPU training, real Slurm)
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q $(ARGS)

test-fast: install ## run the fast unit tests only
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m "not slow" $(ARGS)

test-slow: install slurm-deps browser-deps ## run the slow end-to-end tests only
	HF_HUB_OFFLINE=1 $(PYTHON) -m pytest -q -m slow $(ARGS)

demo-data: install ## write the synthetic demo dataset to demo/data (offline, deterministic)
	$(PYTHON) -m t2v.data demo --out demo/data

embed: install ## cache caption embeddings for CONFIG's manifest (runs the frozen text encoder once)
	$(PYTHON) -m t2v.text embed $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

cache: install ## pre-decode CONFIG's clips into the memory-mapped clip cache
	$(PYTHON) -m t2v.data cache $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

demo: demo-data ## the main job on the demo data: caches, trains a small model on CPU, samples, reports, judges (about 4 min)
	$(PYTHON) -m t2v.data cache --config $(DEMO_CONFIG) $(ARGS)
	$(PYTHON) -m t2v.text embed --config $(DEMO_CONFIG) $(ARGS)
	$(PYTHON) -m t2v.train --config $(DEMO_CONFIG) $(ARGS)
	$(PYTHON) -m t2v.sample --ckpt demo/run --out demo/run/samples/final --steps 25 \
	  --prompt "a red circle moving right" --prompt "a green square moving up" \
	  --prompt "a blue triangle moving left" --prompt "a yellow circle moving down"
	$(PYTHON) tools/demo_check.py demo/run
	$(PYTHON) tools/report.py demo/run
	@echo; echo "demo done: checkpoints in demo/run/, samples in demo/run/samples/final/, report in demo/run/report/summary.md"

train: install ## train in the foreground (CONFIG=..., env vars, ARGS="train.steps=100 ...")
	$(PYTHON) -m t2v.train $(if $(CONFIG),--config $(CONFIG)) $(ARGS)

sample: install ## sample from a checkpoint: make sample CKPT=runs/x/ckpt_000200.pt PROMPT="a red circle"
	$(PYTHON) -m t2v.sample --ckpt "$(CKPT)" --prompt "$(PROMPT)" $(ARGS)

submit: install ## submit training to Slurm: make submit STEPS=5000 [PROFILE= PARTITION= GPUS= NODES= TIME= DRY_RUN=1 EVAL=1]
	$(PYTHON) -m jobs.submit $(ARGS)

cache-submit: install ## build a cache on Slurm as a job array: make cache-submit SHARDS=8 [KIND=clips|latents|text CONFIG= PROFILE= DRY_RUN=1]
	$(PYTHON) -m jobs.cache_submit $(ARGS)

status: install ## my runs: queue state, restarts, last step and loss
	$(PYTHON) -m jobs.status $(ARGS)

logs: install ## follow a run's log across requeues: make logs RUN=<run dir or job id>
	$(PYTHON) -m jobs.status --follow "$(RUN)"

cancel: install ## cancel a run: make cancel RUN=<run dir or job id>
	$(PYTHON) -m jobs.status --cancel "$(RUN)"

report: install ## loss curves, throughput, checkpoint inventory: make report RUN=<run dir> [RUN2 ...]
	$(PYTHON) tools/report.py $(RUN) $(ARGS)

bench: install ## benchmarks: throughput vs diffusers and video-diffusion-pytorch, data loading, cached text, preemption cost
	$(PYTHON) -m pip install -q -e ".[bench]"
	@# a peer UNet; --no-deps: its declared requirements would replace torch (pyproject.toml says why)
	-$(PYTHON) -m pip install -q --no-deps video-diffusion-pytorch einops-exts rotary-embedding-torch
	$(PYTHON) bench/run.py $(ARGS)

gpu-check: install ## on a GPU node: bf16/fp16 training, SIGUSR1 + resume, compile, sampling, GPU bench (< 8 min)
	$(PYTHON) tools/gpu_check.py $(ARGS)

slurm-up: slurm-deps ## start the test Slurm (tests/slurm/testbed.sh): one node, or NODES=2 for tn1 + tn2 (root)
	NODES=$(or $(NODES),1) bash tests/slurm/testbed.sh up

slurm-down: ## stop the test Slurm (NODES=2: the two-node one)
	NODES=$(or $(NODES),1) bash tests/slurm/testbed.sh down

clean: ## remove caches and build leftovers (keeps .venv, runs and demo data)
	rm -rf .pytest_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Every target sets up its own virtual environment (.venv) on first use; pip's cache makes re-creation fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST := $(BIN)/python -m pytest
# pytest-xdist workers: a 2-core CI runner spends much of a server test waiting on its `sglang serve`;
# tests sharing a server or a module-scoped fixture run on one worker (xdist groups, tests/conftest.py).
# Not 3: a third worker's servers oversubscribe the cores (measured: 28.5 min instead of 19.5; the
# multi-rank gloo servers of test_parallel_served 3x slower). WORKERS=0: one process.
WORKERS ?= 2
XDIST := $(if $(filter 0,$(WORKERS)),-p no:xdist,-n $(WORKERS) --dist loadgroup)

.PHONY: setup demo lint test test-fast fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

## Serve the embedded trained tiny checkpoint with plain `sglang serve` and stream one GSM8K chat request.
demo: setup
	$(BIN)/step35 demo

## Ruff with the small rule set in pyproject.toml (unused names and arguments, ambiguous names).
lint: setup
	$(BIN)/ruff check .

## The whole CI suite: lint, then unit, kernels under TRITON_INTERPRET, servers on CPU (--durations: where
## the time goes).
test: setup lint
	$(PYTEST) -q -ra $(XDIST) --durations=25 tests

## Unit tests only (no `sglang serve` processes).
test-fast: setup
	$(PYTEST) -q -ra $(XDIST) -m "not server" tests

## Long parser fuzzing run (>= 10,000 cases); not part of `make test`.
fuzz: setup
	$(BIN)/python tests/fuzz_parsers.py --cases 10000

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# bench and gsm8k are also directory names: without .PHONY make would call them up to date.
.PHONY: bench gsm8k train-tiny tiny-eval mtp-bench gpu-check bench-agent kv-capacity
TRAINED_OUT ?= build/tiny-trained
MTP_ARGS ?=
SCALE ?=
BENCH_ARGS ?=
NUM_QUESTIONS ?= 50
HOST ?=
PORT ?= 30000
GSM8K_ARGS ?=
DEVICE ?=
GPU_CHECK_ARGS ?=
AGENT_ARGS ?=

## Serving benchmark: the seed's low/medium/high bench_serving scenarios, our model vs SGLang's built-in
## on the same checkpoint (tiny on CPU, scaled to a few minutes). SCALE=1 for the full sizes; BENCH_ARGS
## for more (e.g. BENCH_ARGS="--base-url http://host:30000 --tokenizer stepfun-ai/Step-3.5-Flash").
bench: setup
	$(BIN)/python bench/serving.py $(if $(SCALE),--scale $(SCALE)) $(BENCH_ARGS)

## GSM8K few-shot (SGLang's few_shot_gsm8k on the shipped test set). Default: the trained tiny checkpoint on CPU;
## HOST=... [PORT=30000] evaluates a running deployment. NUM_QUESTIONS=50 by default.
gsm8k: setup
	$(BIN)/python bench/gsm8k.py --num-questions $(NUM_QUESTIONS) $(if $(HOST),--host $(HOST) --port $(PORT)) $(GSM8K_ARGS)

## Re-run the recipe of the embedded trained checkpoint (`step35 train-tiny`, ~30 min on 2 cores) into
## TRAINED_OUT, then measure it through `sglang serve` (bench/tiny_eval.py: think closed, `#### N`, tool calls).
train-tiny: setup
	$(BIN)/step35 train-tiny $(TRAINED_OUT)
	$(BIN)/python bench/tiny_eval.py --model $(TRAINED_OUT)

## The same measurement on the embedded trained checkpoint.
tiny-eval: setup
	$(BIN)/python bench/tiny_eval.py

## MTP accept length and tok/s, no spec vs MTP-1 vs MTP-3 (default: the trained tiny checkpoint on CPU).
mtp-bench: setup
	$(BIN)/python bench/mtp.py $(MTP_ARGS)

## Ops per decoder layer in one decode token, ours vs SGLang's built-in (torch.profiler on CPU at
## Step-3.5-Flash's width, 16 experts built; bench/ops_per_layer.py, ~4 min, ~3 GB). OPS_ARGS for more.
bench-ops: setup
	$(BIN)/python bench/ops_per_layer.py $(OPS_ARGS)

## Agent sessions (bench/agent_sessions.py, docs/benchmarks.md section 7): concurrent sessions x turns with tool
## calls; per turn the cached share of the prompt (--enable-cache-report) and TTFT, for the hybrid SWA pool at the
## planned ratio, at SGLang's 0.8, one pool and with SGLang's session radix cache; steady and parked sessions.
## Default: the trained tiny checkpoint on CPU; AGENT_ARGS for more (e.g. AGENT_ARGS="--base-url http://host:30000").
bench-agent: setup
	$(BIN)/python bench/agent_sessions.py $(AGENT_ARGS)

## Step-3.5-Flash KV tokens per GiB at SGLang's default vs the planned --swa-full-tokens-ratio, from SGLang's
## HybridSWAPoolConfigurator (bench/kv_capacity.py); prints and writes bench/out/kv_capacity.json.
kv-capacity: setup
	$(BIN)/python bench/kv_capacity.py

## One-GPU check of the GPU path on real-width layers (bench/gpu_check.py, docs/benchmarks.md): reference
## logprobs, built-in greedy, MTP-3, FP8, timing, roofline, kernels; 7 min budget on an H200 (checkpoint built
## into build/gpu-check on first use). DEVICE=cpu: the same script at tiny widths (harness smoke);
## GPU_CHECK_ARGS for more (e.g. GPU_CHECK_ARGS='--server-args="--tp 4 --ep 4"').
gpu-check: setup
	$(BIN)/python bench/gpu_check.py $(if $(DEVICE),--device $(DEVICE)) $(GPU_CHECK_ARGS)

# The GPU check for the borrowed GPU machine (docs/benchmarks.md "GPU check on the borrowed machine").
.PHONY: gpu-bundle gpu-check-here gpu-emulate
GPU_HERE_ARGS ?=

## Pack what travels to the borrowed GPU machine into build/gpu-bundle (SGLang 0.5.23's pure-Python sources
## from its wheel, the wheels its kernel modules need that the image lacks); checks tree + bundle <= 64 MiB
## and prints the device tool's run command and carry list.
gpu-bundle: setup
	$(BIN)/python scripts/prepare_gpu_bundle.py

## The check itself (bench/gpu_check_here.py): on that machine `python3 bench/gpu_check_here.py --bundle require`;
## here DEVICE=cpu runs it at tiny widths under the Triton interpreter. GPU_HERE_ARGS for more (e.g. --steps moe).
gpu-check-here: setup
	$(BIN)/python bench/gpu_check_here.py $(if $(DEVICE),--device $(DEVICE)) $(GPU_HERE_ARGS)

## Emulate that machine's image (Python 3.12 venv with torch 2.11.0, triton 3.6.0, transformers 5.17.0 from PyPI,
## only the image's packages, no SGLang) and run the tiny check from the bundle in it (large install: not in `make test`).
gpu-emulate: gpu-bundle
	$(BIN)/python scripts/gpu_emulate.py

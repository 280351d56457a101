"""Tensor, expert and pipeline parallel on CPU, served: `--tp 2 --ep 2` and `--pp-size 2 --tp 2` decode
the tokens of one rank, with logprobs within 1e-4 of one rank's and of the reference (fp32). One
module-scoped set of runs; the one-rank run is the session's shared tiny server (conftest `served_tiny`).

Two layouts cover the three kinds of split (each multi-rank server costs a minute of this 2-core
machine): `--pp-size 2 --tp 2` runs tensor parallel inside each pipeline stage, so its stage 1 holds
the MoE layers split by TP (no EP: every rank holds a slice of every expert), its attention heads and
KV heads split by 2, and the stage hand-off; `--tp 2 --ep 2` places whole experts per rank (EP). Plain
`--tp 2` and `--pp-size 2` are each a part of `--pp-size 2 --tp 2`.

SGLang 0.5.23 alone cannot start `--tp 2` on CPU: `init_model_parallel_group`
(sglang/srt/distributed/parallel_state.py) turns pynccl on for CPU groups and `PyNcclCommunicator`
(device_communicators/pynccl.py, `with torch.cuda.device(device)`) raises "Expected a cuda device, but
got: cpu"; and numa_utils.py asserts one NUMA node per rank. Our plugin forces gloo-only groups and
splits the cores between ranks, so plain `--tp 2` serves (measured max |Δlogprob| TP2 vs TP1: 1.9e-6).

The tiny model has 5 main layers: SGLang's even split (get_pp_indices) gives stage 0 layers 0-1 (the
dense ones, and the embedding) and stage 1 layers 2-4 (the MoE ones, the clamped last layer, norm and
lm_head), so the hand-off between stages carries a dense layer's output into the MoE range. The
in-process PP checks (stage construction, loading, the launch guard) are in test_pp_cpu.py.
"""

from __future__ import annotations

import os
import random

import pytest

from reference import Step35Reference
from reference.serving import assert_layouts_agree, generate, serve_parallel_layouts

pytestmark = pytest.mark.server

FP32_TOL = 1e-4
ONE_RANK = "one-rank"
TP_LAYOUTS = {"tp2-ep2": ["--tp", "2", "--ep", "2"]}
PP_LAYOUTS = {"pp2-tp2": ["--pp-size", "2", "--tp", "2"]}
RANKS = {ONE_RANK: 1, "tp2-ep2": 2, "pp2-tp2": 4}


def _omp_bind(ranks: int) -> str:
    """SGLANG_CPU_OMP_THREADS_BIND giving each of `ranks` ranks an equal share of our cores."""
    cores = sorted(os.sched_getaffinity(0))
    per = max(1, len(cores) // ranks)
    return "|".join(",".join(str(c) for c in (cores[r * per:(r + 1) * per] or cores[-1:])) for r in range(ranks))


@pytest.fixture(scope="module")
def runs(tiny_dir, served_tiny):
    """name -> (greedy response, server log) for one rank and every parallel layout, same prompt."""
    ref = Step35Reference(tiny_dir)
    V = int(ref.cfg["vocab_size"])
    rng = random.Random(4)
    # Longer than the sliding window (16): sliding layers run past it, on PP stage 1 on relayed states.
    prompt = [rng.randrange(20, V) for _ in range(40)]
    layouts = {**TP_LAYOUTS, **PP_LAYOUTS}
    # The plugin splits the cores between TP ranks only (platform.cpu.cpu_thread_binding); without an
    # explicit binding SGLang asserts one NUMA node per rank for the 2 PP ranks.
    served = serve_parallel_layouts(tiny_dir, layouts, prompt, 12, V,
                                    env_for=lambda name: {"SGLANG_CPU_OMP_THREADS_BIND": _omp_bind(RANKS[name])}
                                    if name in PP_LAYOUTS else {})  # fmt: skip
    served[ONE_RANK] = (generate(served_tiny, prompt, 12, V), served_tiny.log_text())
    return served, ref, prompt, V


def _subset(runs, names):
    served, ref, prompt, V = runs
    return {n: served[n] for n in (ONE_RANK, *names)}, ref, prompt, V


def test_tp2_ep2_logprobs_equal_one_rank_and_the_reference(runs):
    # heads 4 / 6 and 2 KV heads split by 2; 8 experts -> 4 whole experts per EP rank. The routed
    # clamp of the last layer triggers, so EP also covers the clamped expert path. Plain `sglang serve
    # --tp 2 [--ep 2]`: the plugin disables pynccl for CPU groups, splits the cores between the ranks,
    # and our MoE serves EP on CPU with its own expert loop.
    served, ref, prompt, V = _subset(runs, TP_LAYOUTS)
    assert_layouts_agree(served, ONE_RANK, ref, prompt, V, FP32_TOL)


def test_pp2_tp2_logprobs_equal_one_rank_and_the_reference(runs):
    served, ref, prompt, V = _subset(runs, PP_LAYOUTS)
    for name, (_, log) in served.items():
        # Two stages of two TP ranks really served (SGLang tags each scheduler's lines with its PP
        # and TP rank); without --ep the MoE layers of stage 1 split every expert between the TP ranks.
        assert ("PP1 TP1] Load weight end" in log) == (name == "pp2-tp2"), name
    assert_layouts_agree(served, ONE_RANK, ref, prompt, V, FP32_TOL)

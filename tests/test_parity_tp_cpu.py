"""Tensor and expert parallel on CPU: `--tp 2` and `--tp 2 --ep 2` logprobs equal `--tp 1` and the
reference (fp32, 1e-4).

SGLang 0.5.23 alone cannot start `--tp 2` on CPU: `init_model_parallel_group`
(sglang/srt/distributed/parallel_state.py) turns pynccl on for CPU groups and `PyNcclCommunicator`
(device_communicators/pynccl.py, `with torch.cuda.device(device)`) raises "Expected a cuda device, but
got: cpu"; and numa_utils.py asserts one NUMA node per rank. Our plugin forces gloo-only groups and
splits the cores between ranks, so plain `--tp 2` serves (measured max |Δlogprob| TP2 vs TP1: 1.9e-6).
"""

from __future__ import annotations

import random

import pytest

from reference import Step35Reference
from reference.serving import assert_layouts_agree, serve_parallel_layouts
from sglang_step35.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.server

FP32_TOL = 1e-4
LAYOUTS = {"tp1": ["--tp", "1"], "tp2": ["--tp", "2"], "tp2-ep2": ["--tp", "2", "--ep", "2"]}


def test_tp2_and_ep2_logprobs_equal_tp1_and_the_reference(tmp_path):
    # heads 4 / 6 and 2 KV heads split by 2; 8 experts -> 4 whole experts per EP rank. The routed
    # clamp of the last layer triggers, so EP also covers the clamped expert path.
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0)
    ref = Step35Reference(ckpt)
    V = int(ref.cfg["vocab_size"])
    rng = random.Random(4)
    prompt = [rng.randrange(20, V) for _ in range(40)]
    # Plain `sglang serve --tp 2 [--ep 2]`: the plugin disables pynccl for CPU groups, splits the
    # cores between the ranks, and our MoE serves EP on CPU with its own expert loop.
    runs = serve_parallel_layouts(ckpt, LAYOUTS, prompt, 12, V)
    assert_layouts_agree(runs, "tp1", ref, prompt, V, FP32_TOL)

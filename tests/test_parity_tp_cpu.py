"""Tensor parallel on CPU: `--tp 2` logprobs equal `--tp 1` and the reference (fp32, 1e-4).

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
from reference.serving import CPU_ARGS, full_sequence, generate, max_abs_diff, served_logprobs
from sglang_step35.server import SGLangServer
from sglang_step35.tiny import write_tiny_checkpoint

pytestmark = pytest.mark.server

FP32_TOL = 1e-4

def test_tp2_logprobs_equal_tp1(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0)  # heads 4 / 6, 2 KV heads: all split by 2
    ref = Step35Reference(ckpt)
    V = int(ref.cfg["vocab_size"])
    rng = random.Random(4)
    prompt = [rng.randrange(20, V) for _ in range(40)]
    runs = {}
    for tp in (1, 2):
        # Plain `sglang serve --tp 2`: the plugin disables pynccl for CPU groups and splits the
        # cores between the ranks (SGLANG_CPU_OMP_THREADS_BIND).
        with SGLangServer(str(ckpt), [*CPU_ARGS, "--dtype", "float32", "--tp", str(tp)],
                          startup_timeout=400) as server:
            runs[tp] = generate(server, prompt, 12, V)
    assert runs[2]["output_ids"] == runs[1]["output_ids"]
    lp1, lp2 = served_logprobs(runs[1], V), served_logprobs(runs[2], V)
    diff = max_abs_diff(lp1, lp2)
    print(f"tp2 vs tp1 max |Δlogprob| {diff:.2e}")
    assert diff <= FP32_TOL
    assert max_abs_diff(lp2, ref.logprobs(full_sequence(prompt, runs[2])[:-1])) <= FP32_TOL

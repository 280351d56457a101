"""Tensor parallel on CPU: `--tp 2` logprobs equal `--tp 1` and the reference (fp32, 1e-4).

SGLang 0.5.23 cannot start `--tp 2` on CPU as shipped: `init_model_parallel_group`
(sglang/srt/distributed/parallel_state.py) turns pynccl on for CPU groups and `PyNcclCommunicator`
(device_communicators/pynccl.py, `with torch.cuda.device(device)`) raises "Expected a cuda device, but
got: cpu". With `use_pynccl=False` forced (a HookRegistry AROUND hook, installed here through a
sitecustomize on PYTHONPATH in the server's processes only) the gloo group works and our sharded model
serves (measured max |Δlogprob| TP2 vs TP1: 1.9e-6). Two extra server starts (~2 min), so opt-in:
STEP35_TP_CPU_TEST=1.
"""

from __future__ import annotations

import os
import random

import pytest

from reference import Step35Reference
from reference.serving import CPU_ARGS, full_sequence, generate, max_abs_diff, served_logprobs
from sglang_step35.server import SGLangServer
from sglang_step35.tiny import write_tiny_checkpoint

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(os.environ.get("STEP35_TP_CPU_TEST") != "1", reason="opt-in: STEP35_TP_CPU_TEST=1 (~2 min)"),
]

FP32_TOL = 1e-4

NO_PYNCCL_SITECUSTOMIZE = '''\
from sglang.srt.plugins.hook_registry import HookRegistry, HookType


def _no_pynccl(original, *args, **kwargs):
    # CPU process groups are gloo; pynccl would call torch.cuda.device(cpu) and raise.
    kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


HookRegistry.register("sglang.srt.distributed.parallel_state.init_model_parallel_group", _no_pynccl, HookType.AROUND)
'''


def test_tp2_logprobs_equal_tp1(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", seed=0)  # heads 4 / 6, 2 KV heads: all split by 2
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(NO_PYNCCL_SITECUSTOMIZE)
    ref = Step35Reference(ckpt)
    V = int(ref.cfg["vocab_size"])
    rng = random.Random(4)
    prompt = [rng.randrange(20, V) for _ in range(40)]
    runs = {}
    for tp in (1, 2):
        env = {"PYTHONPATH": str(hook_dir)}
        if tp == 2:  # one NUMA node here; SGLang otherwise asserts ranks <= NUMA nodes (numa_utils.py)
            env["SGLANG_CPU_OMP_THREADS_BIND"] = "0|1"
        with SGLangServer(str(ckpt), [*CPU_ARGS, "--dtype", "float32", "--tp", str(tp)], env=env,
                          startup_timeout=400) as server:
            runs[tp] = generate(server, prompt, 12, V)
    assert runs[2]["output_ids"] == runs[1]["output_ids"]
    lp1, lp2 = served_logprobs(runs[1], V), served_logprobs(runs[2], V)
    diff = max_abs_diff(lp1, lp2)
    print(f"tp2 vs tp1 max |Δlogprob| {diff:.2e}")
    assert diff <= FP32_TOL
    assert max_abs_diff(lp2, ref.logprobs(full_sequence(prompt, runs[2])[:-1])) <= FP32_TOL

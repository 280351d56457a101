"""Quantized checkpoints at launch: what would fail later in a scheduler, or not at all, is decided by
the launch policy through SGLang's own entry points (`load_plugins()`, `ServerArgs(...).resolve_once()`
in a fresh process, tests/launch_probe.py), before any model is built.

- compressed-tensors W8A8-INT8 on a GPU without `--quantization w8a8_int8`: SGLang 0.5.23's
  compressed-tensors INT8 fused-MoE scheme is NPU-only; the allow-list step refuses it by name with the
  flag that serves it. On a CPU, where our class dequantizes at load, it stays served.
- AWQ on a CPU: SGLang's AWQ config accepts float16 only (`get_supported_act_dtypes`), also on CPU; with
  no `--dtype` the CPU defaults pick float16, an explicit float16 is kept, an explicit bfloat16 refused
  by name with the fix.
- Quark MXFP4 on a CPU: SGLang's QuarkConfig (bf16 and fp16) is asked for its dtypes as SGLang's loader
  builds it, with the `packed_modules_mapping` the loader adds (without it: KeyError at launch).
- ModelOpt NVFP4 / MIXED_PRECISION on a CPU: the method is the one SGLang's ModelConfig resolves
  (`override_quantization_method`: modelopt_fp4 / modelopt_mixed), not the config's `quant_method`
  "modelopt" (ModelOptFp8Config refuses an NVFP4 config: ValueError at launch).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_step35.tiny import write_tiny_checkpoint
from test_quant_served import IN_PROCESS_ONLY, SERVER_DTYPE

PROBE = Path(__file__).parent / "launch_probe.py"


@pytest.fixture(scope="module")
def decisions(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch-quant")
    ct = write_tiny_checkpoint(root / "w8a8-int8-ct", seed=0, quant="w8a8-int8-ct")
    awq = write_tiny_checkpoint(root / "awq", seed=0, quant="awq")
    mxfp4 = write_tiny_checkpoint(root / "mxfp4", seed=0, quant="mxfp4")
    nvfp4 = write_tiny_checkpoint(root / "nvfp4", seed=0, quant="nvfp4")
    mixed = write_tiny_checkpoint(root / "modelopt-mixed", seed=0, quant="modelopt-mixed")
    nvfp4_ct = write_tiny_checkpoint(root / "nvfp4-ct", seed=0, quant="nvfp4-ct")
    cases = [
        {"name": "ct_gpu", "model_path": str(ct), "args": {}, "platform": "nvidia"},
        {"name": "ct_gpu_w8a8_int8", "model_path": str(ct), "args": {"quantization": "w8a8_int8"}, "platform": "nvidia"},
        {"name": "ct_cpu", "model_path": str(ct), "args": {}},
        {"name": "awq_cpu", "model_path": str(awq), "args": {}},
        {"name": "awq_cpu_float16", "model_path": str(awq), "args": {"dtype": "float16"}},
        {"name": "awq_cpu_bfloat16", "model_path": str(awq), "args": {"dtype": "bfloat16"}},
        {"name": "mxfp4_cpu", "model_path": str(mxfp4), "args": {}},
        {"name": "nvfp4_cpu", "model_path": str(nvfp4), "args": {}},
        {"name": "modelopt_mixed_cpu", "model_path": str(mixed), "args": {}},
        {"name": "nvfp4_ct_cpu", "model_path": str(nvfp4_ct), "args": {}},
        # The formats tests/test_quant_served.py does not start a server for (IN_PROCESS_ONLY), launched
        # with the flags its servers get.
        *({"name": f"served_{name}", "model_path": str(write_tiny_checkpoint(root / f"served-{name}", seed=0, quant=name)),
           "args": {"dtype": SERVER_DTYPE.get(name, "bfloat16")}} for name in IN_PROCESS_ONLY),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_STEP35", "SGLANG_EXTERNAL"))}
    r = subprocess.run([sys.executable, str(PROBE), json.dumps(cases)], capture_output=True, text=True, env=env,
                       timeout=600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("LAUNCH-DECISIONS ")]
    assert r.returncode == 0 and lines, r.stderr[-4000:]
    return json.loads(lines[-1].split(" ", 1)[1])


def test_compressed_tensors_int8_on_a_gpu_is_refused_at_launch_without_w8a8_int8(decisions):
    error = decisions["ct_gpu"]["error"] or ""
    assert "w8a8-int8 checkpoint: " in error and "implemented only for NPU" in error, error
    assert "--quantization w8a8_int8" in error
    assert "NPU" not in (decisions["ct_gpu_w8a8_int8"]["error"] or "")  # the flag that serves it passes


def test_compressed_tensors_int8_on_a_cpu_stays_served(decisions):
    assert decisions["ct_cpu"]["error"] is None and decisions["ct_cpu"]["device"] == "cpu"


def test_awq_on_a_cpu_gets_float16_unless_the_user_chose(decisions):
    assert (decisions["awq_cpu"]["error"], decisions["awq_cpu"]["dtype"]) == (None, "float16")
    assert (decisions["awq_cpu_float16"]["error"], decisions["awq_cpu_float16"]["dtype"]) == (None, "float16")
    error = decisions["awq_cpu_bfloat16"]["error"] or ""
    assert error.startswith("ValueError: --dtype bfloat16: SGLang's awq quantization method (AWQConfig) accepts "
                            "float16 only"), error
    assert "use --dtype float16, or leave --dtype unset" in error


@pytest.mark.parametrize("case", ["mxfp4_cpu", "nvfp4_cpu", "modelopt_mixed_cpu", "nvfp4_ct_cpu"])
def test_fp4_on_a_cpu_launches_in_its_config_dtype(decisions, case):
    assert decisions[case]["error"] is None, decisions[case]["error"]
    assert decisions[case]["dtype"] in ("auto", "bfloat16")  # the tiny's config dtype, accepted by the method


@pytest.mark.parametrize("name", list(IN_PROCESS_ONLY))
def test_formats_served_without_a_server_start_launch_on_a_cpu(decisions, name):
    """The launch half of tests/test_quant_served.py's IN_PROCESS_ONLY formats: `sglang serve --device
    cpu --dtype D` (D: what its servers are given) of the checkpoint passes SGLang's resolve_once and
    the launch policy, on CPU."""
    d = decisions[f"served_{name}"]
    assert d["error"] is None, d["error"]
    assert (d["device"], d["dtype"], d["attention_backend"]) == ("cpu", SERVER_DTYPE.get(name, "bfloat16"),
                                                                  "torch_native")

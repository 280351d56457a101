"""Plugin registration: entry point, idempotence, model-class switch, CPU support, parsers."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

from sglang_step35 import plugin

PROBE = """
import json, os, sys
from sglang_step35.plugin import register
register(); register()
from sglang.srt.parser.reasoning_parser import ReasoningParser
from sglang.srt.function_call.function_call_parser import FunctionCallParser
import torch, sgl_kernel
print(json.dumps({
    "model_pkg": os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE"),
    "cpu_engine": os.environ.get("SGLANG_USE_CPU_ENGINE"),
    "standin": getattr(sgl_kernel, "IS_SGLANG_STEP35_STANDIN", False),
    "op": torch.ops.sgl_kernel.assign_req_to_token_pool_cpu.__module__,
    "reasoning": ReasoningParser.DetectorMap["step3p5"].__module__,
    "tool": FunctionCallParser.ToolCallParserEnum["step3p5"].__module__,
}))
"""


def _probe(extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_EXTERNAL", "SGLANG_STEP35", "SGLANG_USE_CPU"))}
    env.update(extra_env or {})
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


def test_entry_point_points_at_register():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("step35") == "sglang_step35.plugin:register"


def test_register_installs_everything_once_per_process():
    info, log = _probe()
    assert (info["model_pkg"], info["cpu_engine"], info["standin"], info["op"]) == (
        "sglang_step35.models", "1", True, "sglang_step35.cpu.kernel_ops")
    assert info["reasoning"].startswith("sglang_step35.parsers")
    assert info["tool"].startswith("sglang_step35.parsers")
    lines = [line for line in log.splitlines() if "sglang-step35 0." in line and "active" in line]
    assert len(lines) == 1 and "sglang_step35.models.step3p5" in lines[0]


def test_builtin_switch_keeps_sglang_model_classes_but_everything_else():
    # Also when a parent process that ran register() passed its environment down.
    info, log = _probe({"SGLANG_STEP35_USE_BUILTIN_MODEL": "1", "SGLANG_EXTERNAL_MODEL_PACKAGE": "sglang_step35.models"})
    assert info["model_pkg"] is None
    assert info["standin"] and info["reasoning"].startswith("sglang_step35.parsers")
    assert "sglang.srt.models.step3p5 (built-in" in log


def test_cpu_defaults_fill_only_what_the_user_left_unset():
    args = SimpleNamespace(device=None, attention_backend=None, max_total_tokens=None, sleep_on_idle=False)
    plugin._cpu_server_defaults(args)
    assert (args.device, args.attention_backend, args.max_total_tokens) == ("cpu", "torch_native", 16384)
    assert args.sleep_on_idle
    user = SimpleNamespace(device="cpu", attention_backend="triton", max_total_tokens=4096)
    plugin._cpu_server_defaults(user)
    assert (user.attention_backend, user.max_total_tokens) == ("triton", 4096)


def _step_args(tmp_path, **kw):
    import json as _json

    from sglang_step35.config import read_config

    cfg = read_config()  # Step-3.5-Flash
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    base = dict(model_path=str(tmp_path), device=None, attention_backend=None, max_total_tokens=None,
                tp_size=4, ep_size=1, moe_runner_backend=None, moe_a2a_backend=None, quantization=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cpu_defaults_reach_step_models_only(tmp_path, monkeypatch):
    """On a GPU-less host another model keeps SGLang's own defaults (the CPU engine register()
    installs is all it needs); a Step-3.5 launch gets ours."""
    monkeypatch.setattr(plugin, "has_accelerator", lambda: False)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "unset-by-test")  # restored (removed) afterwards
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(plugin.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    unset = dict(device=None, attention_backend=None, max_total_tokens=None, sleep_on_idle=False, tp_size=2, pp_size=1)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    other = SimpleNamespace(model_path=str(llama), **unset)
    plugin.apply_server_policy(other)
    assert vars(other) == dict(model_path=str(llama), **unset)
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ
    (tmp_path / "step").mkdir()
    step = _step_args(tmp_path / "step", **unset)
    plugin.apply_server_policy(step)
    assert (step.device, step.attention_backend, step.max_total_tokens, step.sleep_on_idle) == (
        "cpu", "torch_native", 16384, True)
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"


def test_server_policy_on_amd_picks_aiter_and_switches_tp4_to_ep4(tmp_path, monkeypatch):
    from sglang_step35.attention import PlatformInfo

    monkeypatch.setattr(plugin, "has_accelerator", lambda: True)
    monkeypatch.setattr("sglang_step35.attention.detect_platform",
                        lambda: PlatformInfo(kind="amd", gcn_arch="gfx942", aiter_available=True))
    monkeypatch.setenv("SGLANG_USE_AITER_UNIFIED_ATTN", "unset-by-test")  # restored (removed) afterwards
    monkeypatch.delenv("SGLANG_USE_AITER_UNIFIED_ATTN")
    args = _step_args(tmp_path)
    plugin.apply_server_policy(args)
    assert args.attention_backend == "aiter"
    assert os.environ.get("SGLANG_USE_AITER_UNIFIED_ATTN") == "1"
    assert args.ep_size == 4  # N=320 per GPU is not runnable by AITER; whole experts per GPU are


def test_server_policy_refuses_a_backend_that_ignores_sliding_windows(tmp_path, monkeypatch):
    import pytest

    from sglang_step35.attention import PlatformInfo

    monkeypatch.setattr(plugin, "has_accelerator", lambda: True)
    monkeypatch.setattr("sglang_step35.attention.detect_platform",
                        lambda: PlatformInfo(kind="nvidia", compute_capability=(9, 0)))
    with pytest.raises(ValueError, match="flex_attention"):
        plugin.apply_server_policy(_step_args(tmp_path, attention_backend="flex_attention", ep_size=4))
    args = _step_args(tmp_path, ep_size=4)
    plugin.apply_server_policy(args)
    assert args.attention_backend == "fa3" and args.ep_size == 4


def test_server_policy_leaves_other_models_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(plugin, "has_accelerator", lambda: True)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    args = SimpleNamespace(model_path=str(tmp_path), attention_backend=None, tp_size=4, ep_size=1)
    plugin.apply_server_policy(args)
    assert args.attention_backend is None and args.ep_size == 1


def test_server_policy_refuses_prefill_and_decode_backends_of_different_window_conventions(tmp_path, monkeypatch):
    import pytest

    from sglang_step35.attention import PlatformInfo

    monkeypatch.setattr(plugin, "has_accelerator", lambda: True)
    monkeypatch.setattr("sglang_step35.attention.detect_platform",
                        lambda: PlatformInfo(kind="amd", gcn_arch="gfx942", aiter_available=True))
    mixed = _step_args(tmp_path, ep_size=4, prefill_attention_backend="aiter", decode_attention_backend="triton")
    with pytest.raises(ValueError, match="--prefill-attention-backend aiter and --decode-attention-backend triton"):
        plugin.apply_server_policy(mixed)
    same = _step_args(tmp_path, ep_size=4, prefill_attention_backend="triton", decode_attention_backend="triton")
    plugin.apply_server_policy(same)


def test_register_refuses_another_sglang_version_unless_allowed(monkeypatch):
    import pytest

    monkeypatch.delenv(plugin.ALLOW_VERSION_ENV, raising=False)
    plugin.check_sglang_version()  # the installed one is the supported one
    with pytest.raises(RuntimeError, match=r"supports SGLang 0\.5\.23 only; found 0\.5\.24\. Install sglang==0\.5\.23"):
        plugin.check_sglang_version("0.5.24")
    monkeypatch.setenv(plugin.ALLOW_VERSION_ENV, "1")
    plugin.check_sglang_version("0.5.24")  # a warning, not an error


def test_server_policy_refuses_pipeline_parallel_with_mtp_and_binds_cores_per_stage(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(plugin, "has_accelerator", lambda: False)
    # setenv first so that the value the policy writes is removed again afterwards (delenv of an
    # absent variable records nothing to restore): later servers in this process must not inherit it.
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "unset-by-test")
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(plugin.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    bad = _step_args(tmp_path, tp_size=1, pp_size=2, speculative_algorithm="EAGLE", speculative_num_steps=3)
    with pytest.raises(ValueError, match="--pp-size 2 with --speculative-algorithm EAGLE"):
        plugin.apply_server_policy(bad)
    ok = _step_args(tmp_path, tp_size=1, pp_size=2)
    plugin.apply_server_policy(ok)
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"  # one share per pipeline stage

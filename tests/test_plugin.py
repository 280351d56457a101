"""Plugin registration: entry point, idempotence, model-class switch, CPU support, parsers, version check
(the launch policy it installs: tests/test_launch_policy.py)."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

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


def test_register_refuses_another_sglang_version_unless_allowed(monkeypatch):
    import pytest

    monkeypatch.delenv(plugin.ALLOW_VERSION_ENV, raising=False)
    plugin.check_sglang_version()  # the installed one is the supported one
    with pytest.raises(RuntimeError, match=r"supports SGLang 0\.5\.23 only; found 0\.5\.24\. Install sglang==0\.5\.23"):
        plugin.check_sglang_version("0.5.24")
    monkeypatch.setenv(plugin.ALLOW_VERSION_ENV, "1")
    plugin.check_sglang_version("0.5.24")  # a warning, not an error

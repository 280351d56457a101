"""No partial install (issue #23, item 2): when `register()` cannot complete, the process stops.

SGLang's `load_plugins()` catches `Exception` from a plugin, logs it and goes on: before this fix a
version refusal or a broken registration step left SGLang serving its built-in Step-3.5 class with
none of our guards. Each case runs SGLang's own `load_plugins()` in a fresh process (every process
SGLang starts calls it first), then asks SGLang's model registry which class serves Step-3.5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = r"""
import importlib.metadata as md, os
fake = os.environ.get("PROBE_SGLANG_VERSION")
if fake:  # importlib.metadata reports another SGLang
    real = md.version
    md.version = lambda name: fake if name == "sglang" else real(name)
if os.environ.get("PROBE_BREAK_PARSERS"):  # a registration step fails (e.g. a moved parser table)
    import sglang_step35.parsers as parsers

    def broken():
        raise KeyError("ReasoningParser.DetectorMap moved (injected)")
    parsers.register_parsers = broken
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.models.registry import ModelRegistry
cls, _ = ModelRegistry.resolve_model_cls(["Step3p5ForCausalLM"])
print("RESOLVED", cls.__module__, flush=True)
"""


def _launch(**env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SGLANG_STEP35", "SGLANG_EXTERNAL", "PROBE_"))}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("case", ["other_sglang_version", "failing_registration_step"])
def test_a_failed_register_stops_the_process_with_its_error(case):
    if case == "other_sglang_version":
        r, cause = _launch(PROBE_SGLANG_VERSION="0.5.24"), "supports SGLang 0.5.23 only; found 0.5.24"
    else:
        r, cause = _launch(PROBE_BREAK_PARSERS="1"), "ReasoningParser.DetectorMap moved (injected)"
    assert r.returncode != 0, r.stdout[-2000:]
    assert "RESOLVED" not in r.stdout  # SGLang did not go on without us
    last = r.stderr.strip().splitlines()[-1]  # what the user sees last: the stop, naming the cause
    assert "sglang-step35" in last and "could not install itself" in last and cause in last, r.stderr[-3000:]


def test_the_version_escape_variable_serves_our_class_on_another_sglang():
    r = _launch(PROBE_SGLANG_VERSION="0.5.24", SGLANG_STEP35_ALLOW_SGLANG_VERSION="1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RESOLVED sglang_step35.models.step3p5" in r.stdout
    assert "supports SGLang 0.5.23 only; found 0.5.24" in r.stderr  # still said, as a warning

"""`step35 doctor`: the touchpoint list matches docs/integration.md, every touchpoint applies after
SGLang loads plugins, each "needed" probe follows the upstream behaviour it checks, the launch
decisions are the launch policy's, and `--json` parses."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_step35 import touchpoints
from sglang_step35.tiny import TRAINED_TINY_DIR

DOC = Path(__file__).parent.parent / "docs" / "integration.md"
FLASH = Path(__file__).resolve().parents[1] / "sglang_step35" / "data" / "step3p5_flash_config.json"
SECTIONS = (touchpoints.H, touchpoints.R, touchpoints.E, touchpoints.A)


def doc_rows():
    """(section, first code span of the first cell up to its first '(', second cell) of every table row."""
    rows, section = [], None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section = next((s for s in SECTIONS if line[3:].startswith(s)), None)
            continue
        if section is None or not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        span = re.search(r"`([^`]+)`", cells[0])
        if cells[0] in ("Target in SGLang 0.5.23", "What", "Variable", "Argument") or span is None:
            continue  # header rows; "—" rows (a warning, a refusal) install nothing
        rows.append((section, span.group(1).split("(")[0], cells[1]))
    return rows


def test_doc_rows_and_touchpoints_are_the_same_list():
    rows = doc_rows()
    keys = {(s, k) for s, k, _ in rows}
    # variables the environment table marks "read" install nothing (checked row by row below)
    env_read = {(s, k) for s, k, how in rows if s == touchpoints.E and how.startswith("read")}
    listed = {r for tp in touchpoints.TOUCHPOINTS for r in tp.doc_rows}
    read_only = set(touchpoints.READ_ONLY_ROWS)
    assert not listed & read_only
    # every touchpoint and read-only entry names a real row, and every row is one of the two
    assert listed - keys == set() and read_only - keys == set()
    assert keys - env_read - listed - read_only == set(), "docs/integration.md rows with no touchpoint in touchpoints.py"
    # the environment table says itself what is set and what is only read
    for section, key, set_or_read in rows:
        if section == touchpoints.E:
            assert ((section, key) in listed) == set_or_read.startswith("set"), key
        if section == touchpoints.H:  # every hook row is a hook touchpoint on that exact target
            assert any(tp.kind == "hook" and tp.target == key for tp in touchpoints.TOUCHPOINTS), key
    names = [tp.name for tp in touchpoints.TOUCHPOINTS]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def loaded():
    """Plugins loaded the way every SGLang process loads them (register(), then apply_hooks())."""
    from sglang_step35 import doctor

    state = doctor.load_plugins()
    assert state["ok"], state
    return state


def test_every_touchpoint_applies_after_sglang_loads_plugins(loaded):
    assert touchpoints.platform_scope() == "cpu"
    for tp in touchpoints.TOUCHPOINTS:
        st = touchpoints.status(tp, "cpu", check_needed=False)
        if tp.scope in ("all", "cpu"):
            assert st["applied"] is True, (tp.name, st["applied_detail"])
        else:  # AMD-only: reported as not applicable here, not as missing
            assert st["applied"] is None and "amd only" in st["applied_detail"]
    # the launch log line register() writes
    assert touchpoints.applied_summary("cpu").startswith(
        f"{sum(touchpoints.in_scope(t, 'cpu') for t in touchpoints.TOUCHPOINTS)}/")


def _needed(name):
    tp = next(t for t in touchpoints.TOUCHPOINTS if t.name == name)
    st = touchpoints.status(tp, "cpu")
    assert "probe failed" not in st["needed_detail"], st
    return st["needed"]


def test_needed_probes_follow_the_upstream_behaviour(loaded, monkeypatch):
    """Each probe says "needed" on SGLang 0.5.23 / transformers 5.19 and "not needed" once the
    upstream function it checks is faked as fixed."""
    import sglang.srt.plugins as plugins
    from sglang.srt.arg_groups import overrides
    from sglang.srt.distributed import parallel_state
    from sglang.srt.utils import common

    probed = ("gloo-only-groups", "registration-stops-process", "keep-cpu-spec-attention", "cpu-engine-env",
              "step3p5-autoconfig", "sgl-kernel-standin", "check-resolved-model")
    assert all(_needed(n) for n in probed)

    def pynccl_off_for_gloo(group_ranks, local_rank, backend, use_pynccl=None, **kw):
        return parallel_state.GroupCoordinator(use_pynccl=backend != "gloo" if use_pynccl is None else use_pynccl)

    def load_plugins_that_propagates():
        for _name, (fn, _dist) in plugins.load_plugins_by_group(plugins.GENERAL_PLUGINS_GROUP).items():
            fn()

    monkeypatch.setattr(parallel_state, "init_model_parallel_group", pynccl_off_for_gloo)
    monkeypatch.setattr(plugins, "load_plugins", load_plugins_that_propagates)
    monkeypatch.setattr(overrides, "_attention_backend_platform_fallbacks", lambda view: {})
    monkeypatch.setattr(common, "is_cpu", lambda: True)  # CPU engine on without the variable
    assert not any(_needed(n) for n in probed[:4])


def test_report_names_what_can_be_deleted_and_a_wrong_sglang(loaded, monkeypatch):
    from sglang.srt.distributed import parallel_state

    from sglang_step35 import doctor

    def pynccl_off_for_gloo(group_ranks, local_rank, backend, use_pynccl=None, **kw):
        return parallel_state.GroupCoordinator(use_pynccl=backend != "gloo" if use_pynccl is None else use_pynccl)

    monkeypatch.setattr(parallel_state, "init_model_parallel_group", pynccl_off_for_gloo)
    monkeypatch.setattr(doctor, "version", lambda dist: "0.5.99")
    text = doctor.format_report(doctor.report(None))
    assert "SGLang 0.5.99: NOT the supported 0.5.23" in text
    deletable = next(ln for ln in text.splitlines() if ln.startswith("not needed on this SGLang"))
    assert "gloo-only-groups" in deletable and "step3p5-autoconfig" not in deletable
    assert "launch policy for" not in text  # no command line, no decisions


def test_launch_decisions_are_the_policy_s(loaded, monkeypatch):
    from sglang.srt.server_args import ServerArgs

    from sglang_step35 import doctor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    env = dict(os.environ)
    d = doctor.launch_decisions(["--model-path", str(TRAINED_TINY_DIR)])
    assert d["error"] is None
    assert {k: v[1] for k, v in d["changed"].items() if k in ("device", "attention_backend", "max_total_tokens")} == {
        "device": "cpu", "attention_backend": "torch_native", "max_total_tokens": 16384}
    assert dict(os.environ) == env  # the report restores what the policy set
    # the same command line through SGLang's own entry point (ServerArgs.resolve_once runs the policy)
    resolved = ServerArgs(model_path=str(TRAINED_TINY_DIR))
    resolved.resolve_once()
    for field in ("device", "attention_backend", "max_total_tokens", "sleep_on_idle"):
        assert getattr(resolved, field) == d["changed"][field][1], field

    # each change is attributed to the step of the policy that made it, in the policy's order
    assert [s for s, _ in d["steps"]][:4] == ["read_config", "pipeline_parallel", "mtp", "platform_defaults"]
    assert set(dict(d["steps"])["platform_defaults"]) >= {"device", "attention_backend", "max_total_tokens"}

    mtp = doctor.launch_decisions(["--model-path", str(TRAINED_TINY_DIR), "--speculative-algorithm", "EAGLE",
                                   "--speculative-num-steps", "9"])
    assert mtp["error"].startswith("Step35MTPError: --speculative-num-steps 9 needs 9 MTP layers")
    assert mtp["refused_by"] == "mtp" and [s for s, _ in mtp["steps"]] == ["read_config", "pipeline_parallel"]

    bad = doctor.launch_decisions(["--model-path", str(TRAINED_TINY_DIR), "--no-such-flag"])
    assert "sglang serve rejects the command line" in bad["error"] and "--no-such-flag" in bad["error"]


def test_launch_decisions_on_a_faked_amd_node(loaded, tmp_path, monkeypatch):
    from sglang_step35 import doctor, platform

    monkeypatch.setattr(platform, "forced", platform.Platform(kind="amd", gcn_arch="gfx942", aiter_available=True))
    monkeypatch.delenv("SGLANG_USE_AITER_UNIFIED_ATTN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "config.json").write_text(FLASH.read_text())
    d = doctor.launch_decisions(["--model-path", str(tmp_path), "--tp-size", "4"])
    assert d["error"] is None
    assert d["changed"]["attention_backend"] == [None, "aiter"] and d["changed"]["ep_size"] == [1, 4]
    steps = dict(d["steps"])
    assert steps["attention"] == {"attention_backend": [None, "aiter"]} and steps["moe_layout"] == {"ep_size": [1, 4]}
    assert d["env"]["SGLANG_USE_AITER_UNIFIED_ATTN"] == "1"
    assert "SGLANG_USE_AITER_UNIFIED_ATTN" not in os.environ


def test_doctor_json_cli(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "doctor", "--json", "--", "--model-path",
                          str(TRAINED_TINY_DIR), "--speculative-algorithm", "EAGLE", "--speculative-num-steps", "9"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["sglang"] == {"installed": "0.5.23", "supported": "0.5.23", "ok": True}
    assert rep["platform"]["kind"] == "cpu" and rep["register"]["ok"]
    assert [t["name"] for t in rep["touchpoints"]] == [t.name for t in touchpoints.TOUCHPOINTS]
    by = {t["name"]: t for t in rep["touchpoints"]}
    assert by["step3p5-autoconfig"]["needed"] and "AmbiguousGlobalPerLayerAttributeError" in (
        by["step3p5-autoconfig"]["needed_detail"])
    assert rep["decisions"]["error"].startswith("Step35MTPError")
    assert "touchpoints for this cpu host in place" in out.stderr  # register()'s launch-log line

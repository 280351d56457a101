"""bench/gpu_check.py (`make gpu-check`): the driver's budgets and failure handling, and the whole
script end to end with `--device cpu` at tiny widths (a smoke of the harness, not a GPU claim)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402


def test_gpu_budget_is_seven_minutes_and_every_step_has_one():
    assert sum(p[3] for p in gpu_check.PARTS) <= 420
    assert {p[0] for p in gpu_check.PARTS} == set(gpu_check.STEPS)
    assert all(gpu_check.BUDGETS[s]["cuda"] > 0 for s in gpu_check.STEPS)
    # every part has its implementation
    for step, part, *_ in gpu_check.PARTS:
        assert callable(getattr(gpu_check.Check, f"part_{step}_{part}")), (step, part)
    assert all(callable(getattr(gpu_check.Check, f"check_{s}")) for s in gpu_check.STEPS)


def _args(tmp_path, **kw):
    ns = dict(device="cpu", ckpt_dir=str(tmp_path / "ckpt"), moe_layers=1, server_args="", mem_fraction=0.5,
              steps=list(gpu_check.STEPS), budget_scale=1.0, out=tmp_path)
    ns.update(kw)
    return argparse.Namespace(**ns)


def test_a_step_that_fails_or_overruns_says_why_and_the_rest_go_on(tmp_path, monkeypatch):
    """Parts replaced by stand-ins: one raises, one sleeps past its budget, one depends on a server
    that never started; every later part still runs and each status names its cause."""
    ran = []
    parts = [("build", "write", None, 5, 5), ("reference", "serve", "ours", 5, 5), ("timing", "ours", "ours", 5, 5),
             ("mtp", "plain", None, 1, 1), ("layers", "replay", None, 5, 5), ("kernels", "bench", None, 5, 5)]
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    check = gpu_check.Check(_args(tmp_path))
    (check.bf16_dir).mkdir(parents=True)
    (check.bf16_dir / "config.json").write_text("{}")

    def build(deadline):
        ran.append("build")
        return {"bytes": 1}

    def serve(deadline):  # a server start that fails
        ran.append("serve")
        check.pool.failed["ours"] = "RuntimeError: sglang serve exited with code 1"
        raise RuntimeError("sglang serve exited with code 1")

    def timing(deadline):
        ran.append("timing")
        check.pool.get("ours", deadline)

    def slow(deadline):
        ran.append("slow")
        time.sleep(30)

    def layers(deadline):
        ran.append("layers")
        return {"copy_gbps": 1.0, "layers": []}

    def kernels(deadline):
        ran.append("kernels")
        raise ValueError("boom")

    for name, fn in (("build_write", build), ("reference_serve", serve), ("timing_ours", timing),
                     ("mtp_plain", slow), ("layers_replay", layers), ("kernels_bench", kernels)):
        monkeypatch.setattr(check, f"part_{name}", fn)
    check.run()
    assert ran == ["build", "serve", "timing", "slow", "layers", "kernels"]
    r = check.results
    assert r["build"]["status"] == "pass"
    assert r["reference"]["status"] == "error" and "exited with code 1" in r["reference"]["parts"]["serve"]["why"]
    assert r["timing"]["status"] == "cannot run"
    assert "server ours did not start" in r["timing"]["parts"]["ours"]["why"]
    assert r["mtp"]["status"] == "timeout" and "budget of 1 s" in r["mtp"]["parts"]["plain"]["why"]
    assert r["mtp"]["parts"]["plain"]["seconds"] < 30  # the 30 s sleep was cut, not waited out
    assert r["layers"]["status"] == "measured"
    assert r["kernels"]["status"] == "error" and "ValueError: boom" in r["kernels"]["parts"]["bench"]["why"]
    assert all(r[s]["parts"][p]["seconds"] >= 0 for s in r for p in r[s]["parts"])
    assert r["fp8"]["status"] == "skipped" and r["fp8"]["parts"] == {}  # no part of it in this list


# The smoke serves one checkpoint: the steps whose servers other tests already start on CPU are left to
# them (built-in vs reference: test_parity_served.py; MTP-3 = plain: test_mtp.py, test_trained_model.py;
# FP8 served dequantized: test_weights_loading.py; timing is a measurement, no claim on CPU). What
# only this smoke covers: the real-width checkpoint writer (shrunk) served by `sglang serve` and
# compared with the reference by the script's own code, the layer-replay worker and bench/kernels.py.
SMOKE_STEPS = ["build", "reference", "layers", "kernels"]


@pytest.mark.server
def test_cpu_smoke_runs_its_steps_end_to_end(tmp_path):
    """`bench/gpu_check.py --device cpu --steps build,reference,layers,kernels`: the real-width writer at
    CPU size, one real `sglang serve --device cpu` of our class against the reference (with teeth), the
    layer replay worker and bench/kernels.py. --budget-scale 8: the shared 2-core CI machine starts a
    CPU server in 30-90 s, up to twice that while the other test worker runs a server too."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu",
                        "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--budget-scale", "8",
                        "--steps", ",".join(SMOKE_STEPS)],
                       capture_output=True, text=True, timeout=1500)
    report = json.loads((tmp_path / "out" / "gpu_check_cpu.json").read_text())
    steps = report["steps"]
    status = {s: steps[s]["status"] for s in gpu_check.STEPS}
    assert r.returncode == 0, (status, r.stdout[-4000:], r.stderr[-3000:])
    assert status == {"build": "pass", "reference": "pass", "builtin": "skipped", "mtp": "skipped",
                      "fp8": "skipped", "timing": "skipped", "layers": "measured", "kernels": "measured"}
    ref = steps["reference"]["parts"]["compare"]
    assert ref["spec"]["decode_max"] <= 1e-4 and ref["spec"]["prefill_max"] <= 1e-4 and ref["greedy_equal_reference"]
    assert ref["sharp"] == {"window_off": True, "no_routed_clamp": True}  # the comparison has teeth
    layers = steps["layers"]["parts"]["replay"]
    assert layers["copy_gbps"] > 0 and [x["kind"] for x in layers["layers"]][-1] == "moe/full/clamp"
    assert {x["op"] for x in steps["kernels"]["parts"]["bench"]["rows"]} == {"swiglu_clamp", "head_gate", "router"}
    assert set(report["servers"]) == {"ours"} and report["servers"]["ours"]["seconds"] > 0
    for s in gpu_check.STEPS:  # the stdout table: one line per step with its seconds and budget
        assert any(line.startswith(s) for line in r.stdout.splitlines()), s
    print(f"CPU smoke: {report['total_seconds']} s; " + ", ".join(f"{k} up in {v['seconds']} s"
                                                                 for k, v in report["servers"].items()))

"""`make gpu-check-here`: the GPU check that runs on the borrowed GPU machine's image as it is
(Python 3.12, its torch/triton/transformers, no SGLang, no pip, no network), from the working tree
plus the carried bundle build/gpu-bundle (`make gpu-bundle`, scripts/prepare_gpu_bundle.py).

Steps (Step-3.5-Flash's real widths from sglang_step35/data/step3p5_flash_config.json; budgets in
BUDGETS, enforced as timeouts; a step that cannot run says why and the others go on):

    kernels    our Triton kernels (router, head gate, SwiGLU clamp) vs fp32 references; GB/s as a
               share of a device copy measured in the same run           (bench/gpu_here_kernels.py)
    moe        SGLang's Triton fused MoE as our layers configure it (EP4: 72 of 288 experts, I 1280,
               H 4096, top-8, clamp 7), BF16 and 128x128 block FP8, vs the dequantized fp32
               reference; time and roofline                              (bench/gpu_here_moe.py)
    attention  SGLang's Triton decode/extend attention with our per-layer settings (64/96 heads,
               8 KV heads, the triton backend's window values): keys seen = 512 on sliding layers,
               several requests per batch, vs fp32                      (bench/gpu_here_attention.py)
    layers     one dense, MoE and clamped-MoE decoder layer in bf16 vs the fp32 plain-PyTorch
               reference, captured and replayed as a CUDA graph, decode batch 1/16/64 timings
                                                                         (bench/gpu_here_layers.py)
    model      whether SGLang's model runtime and our Step3p5ForCausalLM import on this image
                                                                         (bench/gpu_here_model.py)

Results: gpu_check_here.json and gpu_check_here.md in $OUT when set (the device tool brings that
folder back), else bench/out/; the table also on stdout. Exit code 0 when every required step passed.

    python3 bench/gpu_check_here.py                       # on the GPU machine (docs/benchmarks.md)
    python bench/gpu_check_here.py --device cpu --tiny    # same steps, tiny widths, Triton interpreter
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (ROOT, HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from gpu_here_common import CAPTURE_FAILED, CONFIG, CannotRun, activate_bundle  # noqa: E402

# step -> (GPU budget s, CPU budget s, required). GPU sum 400 s: inside 7 minutes on an H100 with the
# process starts (imports ~10 s each), Triton compilation and CUDA-graph capture included.
BUDGETS = {
    "kernels": (45, 120, True),
    "moe": (120, 240, True),
    "attention": (60, 180, True),
    "layers": (150, 300, True),
    "model": (25, 120, False),
}
STEPS = list(BUDGETS)

# Tiny widths (CPU, Triton interpreter): the same per-layer lists, shrunk dimensions.
TINY = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_attention_groups": 2,
        "head_dim": 16, "moe_num_experts": 16, "moe_top_k": 4, "moe_intermediate_size": 32,
        "share_expert_dim": 32, "sliding_window": 8}
TINY_SLIDING = {"num_attention_heads": 6, "num_attention_groups": 2, "head_dim": 16, "true_head_dim": 16}


def load_config(tiny: bool) -> dict:
    cfg = json.loads(CONFIG.read_text())
    if tiny:
        cfg = copy.deepcopy(cfg)
        cfg.update(TINY)
        cfg["attention_other_setting"].update(TINY_SLIDING)
    return cfg


class StepTimeout(Exception):
    pass


def run_step(name: str, device: str, tiny: bool, bundle: str) -> dict:
    """One step in this process; returns its record (status pass/fail/cannot run/error)."""
    t0 = time.time()
    rec = {"step": name}
    try:
        rec["bundle"] = activate_bundle(bundle)
        cfg = load_config(tiny)
        if name == "model":
            import gpu_here_model

            rec.update(gpu_here_model.run(device))
        elif name == "kernels":
            if device == "cpu":
                os.environ["TRITON_INTERPRET"] = "1"
            import gpu_here_kernels
            from gpu_here_common import load_contract

            contract = load_contract()
            with contract.interpreted_triton_language() if device == "cpu" else _null():
                if device == "cpu":
                    for module, kernel in (("kernels_cuda.router", "_sigmoid_topk_kernel"),
                                           ("kernels_cuda.head_gate", "_head_gate_kernel"),
                                           ("kernels_cuda.swiglu_clamp", "_swiglu_clamp_kernel")):
                        contract.ensure_interpreted(module, kernel)
                rec.update(gpu_here_kernels.run(cfg, device, tiny))
        else:
            from gpu_here_common import sglang_kernels

            mod = __import__(f"gpu_here_{name}")
            with sglang_kernels(device) as sgl:
                rec.update(mod.run(cfg, device, tiny, sgl))
        for t in rec.get("timings", []):  # a decode step that cannot be captured is a GPU-only bug
            if str(t.get("timed_as", "")).startswith(CAPTURE_FAILED):
                rec.setdefault("checks", []).append({"check": f"captures as a CUDA graph: {t}", "ok": False,
                                                     "value": t["timed_as"]})
        rec["status"] = "pass" if all(c["ok"] for c in rec.get("checks", [])) else "fail"
    except CannotRun as e:
        rec.update(status="cannot run", reason=str(e))
    except ImportError as e:
        rec.update(status="cannot run", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    except StepTimeout:
        rec.update(status="timeout", reason="budget exhausted")
    except Exception as e:  # noqa: BLE001 - one step's failure must not stop the others
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:1000]}", traceback=traceback.format_exc()[-3000:])
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _alarm(_signum, _frame):
    raise StepTimeout()


def run_isolated(name: str, args, budget: int) -> dict:
    """The step in its own process (a CUDA fault or a hang cannot take the other steps with it)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "step.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--result", str(result),
               "--device", args.device, "--bundle", args.bundle] + (["--tiny"] if args.tiny else [])
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, timeout=budget, capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:
            tail = (e.stderr or b"")[-2000:]
            return {"step": name, "status": "timeout", "reason": f"budget {budget}s exhausted",
                    "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail,
                    "seconds": round(time.time() - t0, 1)}
        if result.exists():
            rec = json.loads(result.read_text())
        else:
            rec = {"step": name, "status": "error", "reason": f"step process exited {proc.returncode} without a result",
                   "stderr_tail": proc.stderr[-3000:]}
        rec["seconds"] = round(time.time() - t0, 1)
        return rec


def table(records: list[dict]) -> str:
    lines = ["| step | status | s | checks passed | note |", "| --- | --- | --- | --- | --- |"]
    for r in records:
        checks = r.get("checks", [])
        passed = f"{sum(c['ok'] for c in checks)}/{len(checks)}" if checks else "-"
        note = r.get("reason", "") or "; ".join(c["check"] for c in checks if not c["ok"])[:300]
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {passed} | {note} |")
    for r in records:
        for c in r.get("checks", []):
            if not c["ok"]:
                lines.append(f"- FAILED {r['step']}: {c['check']}: value {c.get('value')} limit {c.get('limit')}")
        for t in r.get("timings", []):
            lines.append(f"- {r['step']} timing: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                              for k, v in t.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when torch sees a GPU")
    ap.add_argument("--tiny", action="store_true", help="tiny widths (implied by --device cpu)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--bundle", choices=["auto", "require", "off"], default="auto",
                    help="SGLang from: installed if any else the bundle (auto), the bundle (require), installed (off)")
    ap.add_argument("--out", type=Path, default=None, help="result folder (default $OUT, else bench/out)")
    ap.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                    help="each step in its own process (auto: on a GPU)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        args.tiny = True
    if args.step:  # one step, in a child process
        args.result.write_text(json.dumps(run_step(args.step, args.device, args.tiny, args.bundle), default=str))
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in BUDGETS]
    if unknown:
        ap.error(f"unknown step(s) {unknown}; choose from {STEPS}")
    isolate = args.isolate == "yes" or (args.isolate == "auto" and args.device == "cuda")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "out")
    out.mkdir(parents=True, exist_ok=True)
    records, t_all = [], time.time()
    for name in steps:
        budget = BUDGETS[name][0 if args.device == "cuda" else 1]
        print(f"== {name} (budget {budget}s)", flush=True)
        if isolate:
            rec = run_isolated(name, args, budget)
        else:
            signal.signal(signal.SIGALRM, _alarm)
            signal.alarm(budget)
            try:
                rec = run_step(name, args.device, args.tiny, args.bundle)
            finally:
                signal.alarm(0)
        rec["budget_s"] = budget
        records.append(rec)
        print(f"   {rec['status']} in {rec.get('seconds')}s {rec.get('reason', '')}", flush=True)
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "device": args.device,
           "tiny": args.tiny, "python": sys.version.split()[0], "total_s": round(time.time() - t_all, 1)}
    try:
        import torch
        import triton

        env.update(torch=torch.__version__, triton=triton.__version__,
                   gpu=torch.cuda.get_device_name() if args.device == "cuda" else None)
    except Exception as e:  # noqa: BLE001
        env["versions_error"] = str(e)
    (out / "gpu_check_here.json").write_text(json.dumps({"env": env, "steps": records}, indent=2, default=str))
    md = f"# gpu_check_here {env['date']} on {env.get('gpu') or args.device}\n\n{table(records)}\n"
    (out / "gpu_check_here.md").write_text(md)
    print(md)
    print(f"results in {out}/gpu_check_here.json (total {env['total_s']}s)")
    bad = [r["step"] for r in records if r["status"] != "pass" and BUDGETS[r["step"]][2]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""`make gpu-check`: one prepared command that proves the GPU path on real-width layers.

On one GPU (plain `sglang serve`, CUDA graphs on, BF16), against a real-width checkpoint at reduced
depth (`step35 tiny --real-width`: the 3 dense layers, --moe-layers MoE layers ending with one
clamped like 43/44, the 3 MTP layers; built into --ckpt-dir on first use, reused after):

    build      write the BF16 checkpoint, its FP8 copy and a no-clamp variant (config only)
    reference  ours vs the plain-PyTorch reference (sglang_step35/reference.py) on the GPU: max |Δ logprob| of
               each next token over a prompt longer than the sliding window, then decode steps
    builtin    ours vs SGLang's built-in Step3p5ForCausalLM, clamps zeroed, inside the window: greedy equal
    mtp        MTP-3 (multi-layer EAGLE, draft CUDA graphs): greedy output == plain decoding, accept length
    fp8        the FP8 copy loads and its logprobs stay within FP8_TOL of BF16 on the same tokens
    timing     decode tok/s at batch 1, 16, 64, ours and built-in, and their ratio
    layers     each layer's decode step (batch 1) vs the HBM roofline of its bytes, with the
               bandwidth of a copy kernel measured in the same run
    kernels    our Triton kernels vs the torch ops they replace (bench/kernels.py)

Each step has a time budget (BUDGETS, the sum is 7 minutes on a GPU) enforced as a timeout; its
measured seconds are printed; a step that cannot run says why and the others go on. Results go to
bench/out/gpu_check.json (gpu_check_cpu.json with --device cpu) and a table on stdout. Exit code 0
when every check passes.

    python bench/gpu_check.py                               # one GPU
    python bench/gpu_check.py --server-args="--tp 4 --ep 4" # a real node
    python bench/gpu_check.py --device cpu                  # smoke of the harness at tiny widths (CI)

With --device cpu the same steps run at tiny widths (tiny_real.CPU_SHRINK: same layer selection
and per-layer settings) in float32 on `sglang serve --device cpu`: a test of the harness and of the
checks' plumbing, not a GPU claim (timings there are CPU numbers; Triton runs in its interpreter).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):  # run from a checkout; bench/ helpers
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import requests  # noqa: E402

from sglang_step35.config import read_config  # noqa: E402
from sglang_step35.mtp_check import mtp_acceptance  # noqa: E402
from sglang_step35.server import SGLangServer, ServerPool, ServerUnavailable  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
DEFAULT_CKPT_DIR = ROOT / "build" / "gpu-check"

# Tolerances (stated before any GPU run; the first run's measured values go to bench/RESULTS.md).
# Reference: the CPU parity tests' values (docs/correctness.md): fp32 server 1e-4, bf16 server 0.1.
REF_TOL = {"float32": 1e-4, "bfloat16": 0.1}
# FP8 vs BF16 on the same tokens (teacher-forced): FP8 e4m3 weight rounding (~3% per projection).
# Max over the BF16 run's greedy tokens (likely ones), mean over every position: the logprob of an
# unlikely prompt token moves with any logit change, so its max says little.
FP8_TOL = 0.5
FP8_MEAN_TOL = 0.25

# step -> part -> (budget on a GPU, budget on CPU) in seconds; a part that starts a server includes
# its start-up (weights from the page cache, CUDA graph capture up to --cuda-graph-max-bs 64).
PARTS: list[tuple[str, str, Optional[str], int, Optional[int]]] = [
    # step, part, server (None: in this process or a worker), GPU s, CPU s (None: skipped on CPU)
    ("build", "write", None, 58, 30),
    ("reference", "serve", "ours", 65, 60),
    ("timing", "ours", "ours", 15, 20),
    ("mtp", "plain", "ours", 8, 20),
    ("fp8", "bf16", "ours", 5, 10),
    ("timing", "builtin", "builtin", 55, 60),
    ("builtin", "builtin", "builtin", 8, 10),
    # A fifth server start costs the CPU smoke a minute; there the built-in is compared with the
    # reference only (ours is, in the reference step).
    ("builtin", "ours", "ours-noclamp", 45, None),
    ("mtp", "mtp3", "mtp3", 55, 80),
    ("fp8", "fp8", "fp8", 45, 60),
    ("reference", "compare", None, 18, 30),
    ("builtin", "reference", None, 8, 20),
    ("layers", "replay", None, 20, 30),
    ("kernels", "bench", None, 15, 40),
]
STEPS = ["build", "reference", "builtin", "mtp", "fp8", "timing", "layers", "kernels"]
BUDGETS = {s: {dev: sum(p[3 if dev == "cuda" else 4] or 0 for p in PARTS if p[0] == s) for dev in ("cuda", "cpu")}
           for s in STEPS}

BUILTIN_ENV = {"SGLANG_STEP35_USE_BUILTIN_MODEL": "1"}
MTP3_ARGS = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
             "--speculative-num-draft-tokens", "4", "--enable-multi-layer-eagle"]  # = bench/mtp.py CONFIGS["mtp3"]


class StepTimeout(Exception):
    pass


class CannotRun(Exception):
    """A part that cannot run for a reason outside it (a server that did not start, a missing input)."""


def _alarm(_signum, _frame):
    raise StepTimeout("budget exhausted")


# --- sizes per device ---------------------------------------------------------------------------------
def sizes(device: str, window: int) -> dict:
    if device == "cuda":
        return dict(ref_prompt=window + 48, ref_new=32, greedy_prompts=[64, 96, 128, 160, 200, 240, 280, 320],
                    greedy_new=64, mtp_prompts=[64, 200, window + 88, 96, 128, 160, 300, 400], mtp_new=64,
                    fp8_prompt=256, fp8_new=32, batches=[1, 16, 64], short_new=4, long_new=68, timing_prompt=128)
    return dict(ref_prompt=window + 24, ref_new=12, greedy_prompts=[3, 5, 7, 9], greedy_new=6,
                mtp_prompts=[6, window + 4, 9, 12], mtp_new=24, fp8_prompt=20, fp8_new=8, batches=[1, 2, 4],
                short_new=2, long_new=10, timing_prompt=8)


def prompt_ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(20, 1000) for _ in range(n)]  # below both tokenizers' sizes, past the special tokens


# --- servers ------------------------------------------------------------------------------------------
def generate(server: SGLangServer, ids: list[int], max_new: int, deadline: float, logprobs: bool = True) -> dict:
    body = {"input_ids": list(ids), "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    if logprobs:
        body.update(return_logprob=True, logprob_start_len=0)
    r = requests.post(server.base_url + "/generate", json=body, timeout=max(1.0, deadline - time.time()))
    r.raise_for_status()
    return r.json()


def generate_many(server: SGLangServer, jobs: list[tuple[list[int], int]], deadline: float,
                  logprobs: bool = False) -> list[dict]:
    with ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
        futs = [pool.submit(generate, server, ids, n, deadline, logprobs) for ids, n in jobs]
        return [f.result() for f in futs]


# --- the check ----------------------------------------------------------------------------------------
class Check:
    def __init__(self, args):
        self.args = args
        self.device = args.device
        self.dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.data: dict = {}  # part outputs other parts read
        self.results: dict[str, dict] = {s: {"status": None, "seconds": 0.0, "budget_s": BUDGETS[s][self.device],
                                             "parts": {}} for s in STEPS}
        self.ckpt = Path(args.ckpt_dir)
        self.pool: Optional[ServerPool] = None

    # paths
    @property
    def bf16_dir(self):
        return self.ckpt / "bf16"

    @property
    def fp8_dir(self):
        return self.ckpt / "fp8"

    @property
    def noclamp_dir(self):
        return self.ckpt / "bf16-noclamp"

    def server_args(self, dtype: Optional[str] = None) -> list[str]:
        if self.device == "cuda":
            # CUDA graphs stay on (SGLang's default); capture up to the largest timed batch.
            base = ["--mem-fraction-static", str(self.args.mem_fraction), "--cuda-graph-max-bs", "64",
                    "--context-length", "4096", "--max-running-requests", "64"]
        else:
            base = ["--device", "cpu", "--max-total-tokens", "4096"]
        return base + ["--skip-server-warmup", "--dtype", dtype or self.dtype, *shlex.split(self.args.server_args)]

    def make_pool(self) -> ServerPool:
        return ServerPool({
            "ours": (self.bf16_dir, self.server_args(), {}),
            "builtin": (self.noclamp_dir, self.server_args(), BUILTIN_ENV),
            "ours-noclamp": (self.noclamp_dir, self.server_args(), {}),
            "mtp3": (self.bf16_dir, self.server_args() + MTP3_ARGS, {}),
            # SGLang refuses float32 with an FP8 checkpoint; BF16 on both devices
            "fp8": (self.fp8_dir, self.server_args("bfloat16"), {}),
        })

    def cfg(self) -> dict:
        return read_config(self.bf16_dir)

    def sz(self) -> dict:
        return sizes(self.device, int(self.cfg()["sliding_window"]))

    # ---- build ----
    def part_build_write(self, _deadline):
        from sglang_step35.tiny_real import CPU_SHRINK, write_config_variant, write_real_width_checkpoint, zero_clamps

        want = {"moe_layers": self.args.moe_layers, "seed": 0, "shrink": None if self.device == "cuda" else CPU_SHRINK}
        prov = self.bf16_dir / "tiny_real.json"
        if prov.exists() and (self.fp8_dir / "tiny_real.json").exists() and (self.noclamp_dir / "config.json").exists():
            have = json.loads(prov.read_text())
            if all(have.get(k) == v for k, v in want.items()) and have.get("experts") is not None:
                return {"reused": str(self.ckpt), "bytes": have["bytes"], "built_seconds": have["seconds"]}
        info = write_real_width_checkpoint(self.bf16_dir, moe_layers=want["moe_layers"], shrink=want["shrink"],
                                           fp8_out=self.fp8_dir, device=self.device)
        write_config_variant(self.bf16_dir, self.noclamp_dir, zero_clamps)
        return {"built": str(self.ckpt), "bytes": info["bytes"], "fp8_bytes": info["fp8_bytes"],
                "source_layers": info["source_layers"], "generate_write_seconds": info["seconds"]}

    def check_build(self, _parts):
        return "pass"

    # ---- reference ----
    def part_reference_serve(self, deadline):
        s = self.sz()
        server = self.pool.get("ours", deadline)
        prompt = prompt_ids(1, s["ref_prompt"])
        resp = generate(server, prompt, s["ref_new"], deadline)
        self.data["ref_resp"] = (prompt, resp)
        return {"prompt_len": len(prompt), "decode_steps": s["ref_new"], "window": self.cfg()["sliding_window"]}

    def _ref_weights(self):
        """The checkpoint in fp32 on the check's device, loaded once for the reference parts (as in the
        CPU parity tests, an fp32 reference: the tolerance then measures the server's dtype)."""
        from safetensors.torch import load_file

        if "ref_weights" not in self.data:
            self.pool.close()  # the GPU's memory is the reference's now
            index = json.loads((self.bf16_dir / "model.safetensors.index.json").read_text())["weight_map"]
            weights = {}
            for f in sorted(set(index.values())):
                for k, v in load_file(str(self.bf16_dir / f), device=self.device).items():
                    weights[k] = v.float()
            self.data["ref_weights"] = weights
        return self.data["ref_weights"]

    def part_reference_compare(self, _deadline):
        import torch

        from sglang_step35.reference import Step35Reference
        from sglang_step35.served_logprobs import full_sequence, max_abs_diff, reference_token_logprobs, served_token_logprobs

        if "ref_resp" not in self.data:
            raise CannotRun("no served logprobs (reference/serve did not finish)")
        prompt, resp = self.data["ref_resp"]
        seq = full_sequence(prompt, resp)
        dev = torch.device(self.device)
        weights = self._ref_weights()
        got = served_token_logprobs(resp)
        out = {}
        W = int(self.cfg()["sliding_window"])
        with torch.device(dev):  # the reference's factory calls (arange, zeros) land on the GPU too
            for name, kw in (("spec", {}), ("window_off", {"window": None}), ("no_routed_clamp", {"routed_clamp": False})):
                ref = Step35Reference(self.bf16_dir, dtype=torch.float32, weights=weights, **kw)
                lp = ref.logprobs(seq[:-1])  # on the device, as the index tensor reference_token_logprobs makes
                want = reference_token_logprobs(lp, seq).cpu()
                lp = lp.cpu()
                d = (got - want).abs()
                P = len(prompt) - 1
                out[name] = {"prefill_max": float(d[:P].max()), "decode_max": float(d[P:].max()),
                             "past_window_max": float(d[W:].max()), "max": max_abs_diff(got, want),
                             "mean": float(d.mean())}
                if name == "spec":
                    out["greedy_equal_reference"] = resp["output_ids"] == lp[P:].argmax(-1).tolist()
                del ref, lp
        out["tolerance"] = REF_TOL[self.dtype]
        return out

    def part_builtin_reference(self, _deadline):
        """The built-in's greedy tokens vs the reference's argmax on the same prefixes (clamps zeroed):
        equal at every step <=> the built-in's greedy output is the reference's."""
        import torch

        from sglang_step35.reference import Step35Reference
        from sglang_step35.served_logprobs import full_sequence

        if "builtin_greedy" not in self.data:
            raise CannotRun("no built-in outputs (builtin/builtin did not finish)")
        weights = self._ref_weights()
        agree = []
        with torch.device(self.device):
            ref = Step35Reference(self.noclamp_dir, dtype=torch.float32, weights=weights)
            for (prompt, _), out_ids in zip(self._greedy_jobs(), self.data["builtin_greedy"]):
                seq = full_sequence(prompt, {"output_ids": out_ids})
                want = ref.logprobs(seq[:-1])[len(prompt) - 1:].argmax(-1).tolist()
                agree.append(want == out_ids)
        self.data.pop("ref_weights", None)
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.data["builtin_vs_reference"] = agree
        return {"equal_prompts": sum(agree), "of": len(agree)}

    def check_reference(self, parts):
        c = parts["compare"]
        tol = c["tolerance"]
        ok = c["spec"]["prefill_max"] <= tol and c["spec"]["decode_max"] <= tol
        # sharp: the window and the routed clamp each move the result beyond the tolerance
        c["sharp"] = {k: c[k]["max"] > tol for k in ("window_off", "no_routed_clamp")}
        return "pass" if ok else "fail"

    # ---- builtin ----
    def _greedy_jobs(self):
        s = self.sz()
        return [(prompt_ids(100 + i, n), s["greedy_new"]) for i, n in enumerate(s["greedy_prompts"])]

    def part_builtin_builtin(self, deadline):
        server = self.pool.get("builtin", deadline)
        from serving import MODELS

        if MODELS["builtin"]["log_marker"] not in server.log_text():
            raise RuntimeError("the built-in server's log does not name SGLang's built-in class")
        jobs = self._greedy_jobs()
        assert max(len(p) + n for p, n in jobs) <= int(read_config(self.noclamp_dir)[
            "sliding_window"]), "greedy prompts must stay inside the window"
        self.data["builtin_greedy"] = [r["output_ids"] for r in generate_many(server, jobs, deadline)]
        return {"prompts": len(jobs), "new_tokens": jobs[0][1]}

    def part_builtin_ours(self, deadline):
        server = self.pool.get("ours-noclamp", deadline)
        self.data["ours_greedy"] = [r["output_ids"] for r in generate_many(server, self._greedy_jobs(), deadline)]
        return {}

    def check_builtin(self, parts):
        ok = all(self.data["builtin_vs_reference"])
        a, b = self.data.get("ours_greedy"), self.data.get("builtin_greedy")
        if a is not None:
            equal = [x == y for x, y in zip(a, b)]
            first = [next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
            parts["ours"].update(equal_prompts=sum(equal), of=len(equal), first_divergence=first)
            ok = ok and all(equal)
        return "pass" if ok else "fail"

    # ---- mtp ----
    def _mtp_jobs(self):
        s = self.sz()
        return [(prompt_ids(200 + i, n), s["mtp_new"]) for i, n in enumerate(s["mtp_prompts"])]

    def _mtp_run(self, server, deadline):
        jobs = self._mtp_jobs()
        one_by_one = [generate(server, ids, n, deadline, logprobs=False) for ids, n in jobs[:2]]
        return one_by_one + generate_many(server, jobs[2:], deadline)

    def part_mtp_plain(self, deadline):
        self.data["mtp_plain"] = [r["output_ids"] for r in self._mtp_run(self.pool.get("ours", deadline), deadline)]
        return {"prompts": len(self.data["mtp_plain"])}

    def part_mtp_mtp3(self, deadline):
        t0 = time.perf_counter()
        server = self.pool.get("mtp3", deadline)
        start = time.perf_counter() - t0
        resps = self._mtp_run(server, deadline)
        self.data["mtp3"] = [r["output_ids"] for r in resps]
        hist: list[int] = []
        for r in resps:
            for k, c in enumerate(r["meta_info"].get("spec_correct_drafts_histogram") or []):
                hist += [0] * (k + 1 - len(hist))
                hist[k] += c
        acc = mtp_acceptance({"spec_correct_drafts_histogram": hist})
        return {"server_start_s": round(start, 1), **{k: acc[k] for k in ("verify_steps", "accept_length",
                                                                           "acceptance_per_layer", "histogram")}}

    def check_mtp(self, parts):
        plain, spec = self.data.get("mtp_plain"), self.data.get("mtp3")
        equal = [a == b for a, b in zip(plain, spec)]
        parts["mtp3"].update(equal_prompts=sum(equal), of=len(equal))
        if not parts["mtp3"]["verify_steps"]:
            parts["mtp3"]["why"] = "no verify steps: speculative decoding did not run"
            return "fail"
        return "pass" if all(equal) else "fail"

    # ---- fp8 ----
    def part_fp8_bf16(self, deadline):
        from sglang_step35.served_logprobs import full_sequence, served_token_logprobs

        s = self.sz()
        prompt = prompt_ids(300, s["fp8_prompt"])
        resp = generate(self.pool.get("ours", deadline), prompt, s["fp8_new"], deadline)
        self.data["fp8_seq"] = full_sequence(prompt, resp)
        self.data["fp8_bf16_lp"] = served_token_logprobs(resp)
        self.data["fp8_prompt_len"] = len(prompt)
        return {"tokens": len(self.data["fp8_seq"])}

    def part_fp8_fp8(self, deadline):
        import torch

        from serving import MODELS

        if "fp8_seq" not in self.data:
            raise CannotRun("no BF16 logprobs (fp8/bf16 did not finish)")
        server = self.pool.get("fp8", deadline)
        seq = self.data["fp8_seq"]
        resp = generate(server, seq, 1, deadline)  # teacher-forced on the BF16 run's tokens
        lp = torch.tensor([x[0] for x in resp["meta_info"]["input_token_logprobs"][1:]], dtype=torch.float64)
        d = (lp - self.data["fp8_bf16_lp"]).abs()
        P = self.data["fp8_prompt_len"] - 1  # rows from P on: the BF16 run's greedy tokens
        log = server.log_text()
        return {"greedy_max": float(d[P:].max()), "max": float(d.max()), "mean": float(d.mean()),
                "mean_tolerance": FP8_MEAN_TOL, "tolerance": FP8_TOL,
                "our_class": MODELS["ours"]["log_marker"] in log,
                "dequantized_at_load": "dequantizing FP8 weights at load" in log}

    def check_fp8(self, parts):
        p = parts["fp8"]
        return "pass" if p["our_class"] and p["greedy_max"] <= FP8_TOL and p["mean"] <= FP8_MEAN_TOL else "fail"

    # ---- timing ----
    def _timing(self, key, deadline):
        s = self.sz()
        server = self.pool.get(key, deadline)
        from serving import MODELS

        label = "builtin" if key == "builtin" else "ours"
        if MODELS[label]["log_marker"] not in server.log_text():
            raise RuntimeError(f"{key} server log lacks {MODELS[label]['log_marker']!r}")
        out = {}
        generate(server, prompt_ids(999, s["timing_prompt"]), 2, deadline, logprobs=False)  # first-request costs
        for b in s["batches"]:
            walls = {}
            for n in (s["short_new"], s["long_new"]):
                # fresh prompts per run (no radix-cache hits); same lengths for both runs and both models
                jobs = [(prompt_ids(10_000 * b + 100 * n + i, s["timing_prompt"]), n) for i in range(b)]
                t0 = time.perf_counter()
                rs = generate_many(server, jobs, deadline)
                walls[n] = time.perf_counter() - t0
                assert all(len(r["output_ids"]) == n for r in rs)
            extra = s["long_new"] - s["short_new"]
            dt = walls[s["long_new"]] - walls[s["short_new"]]
            out[f"b{b}"] = {"decode_tok_s": b * extra / dt if dt > 0 else None, "step_ms": 1e3 * dt / extra,
                            "wall_s": {str(k): round(v, 4) for k, v in walls.items()}}
        return {"batches": out, "prompt_len": s["timing_prompt"], "new_tokens": [s["short_new"], s["long_new"]]}

    def part_timing_ours(self, deadline):
        return self._timing("ours", deadline)

    def part_timing_builtin(self, deadline):
        return self._timing("builtin", deadline)

    def check_timing(self, parts):
        ratio = {}
        for b, r in parts["ours"]["batches"].items():
            base = parts["builtin"]["batches"].get(b, {}).get("decode_tok_s")
            ratio[b] = r["decode_tok_s"] / base if base and r["decode_tok_s"] else None
        parts["ours"]["ratio_ours_over_builtin"] = ratio
        return "measured"

    # ---- layers ----
    def part_layers_replay(self, deadline):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "layers.json"
            # Its own process: CUDA state / TRITON_INTERPRET stay out of the driver.
            cmd = [sys.executable, str(ROOT / "bench" / "gpu_check_layers.py"), str(self.bf16_dir),
                   "--device", self.device, "--out", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.time()))
            if r.returncode != 0:
                raise RuntimeError(f"layers worker exit {r.returncode}:\n{r.stderr[-2000:]}")
            return json.loads(out.read_text())

    def check_layers(self, _parts):
        return "measured"

    # ---- kernels ----
    def part_kernels_bench(self, deadline):
        tokens = ["1", "64", "1024"] if self.device == "cuda" else ["1"]
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "bench" / "kernels.py"), "--tokens", *tokens,
                   "--repeat", "50" if self.device == "cuda" else "1", "--out", tmp]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, deadline - time.time()))
            if r.returncode != 0:
                raise RuntimeError(f"bench/kernels.py exit {r.returncode}:\n{r.stderr[-2000:]}")
            data = json.loads((Path(tmp) / "kernels.json").read_text())
        rows = [{k: row[k] for k in ("op", "shape", "tokens", "fused_s", "torch_s", "speedup", "gbps", "frac_peak")}
                for row in data["results"]]
        return {"meta": data["meta"], "rows": rows}

    def check_kernels(self, _parts):
        return "measured"

    # ---- driver ----
    def run(self) -> dict:
        signal.signal(signal.SIGALRM, _alarm)
        self.pool = self.make_pool()
        t_all = time.perf_counter()
        try:
            for step, part, server, b_gpu, b_cpu in PARTS:
                budget = b_gpu if self.device == "cuda" else b_cpu
                res = self.results[step]
                if budget is None:
                    res["parts"][part] = {"status": "skipped", "why": "GPU only (CPU smoke: one server start less)"}
                    continue
                if server is not None and server != self.pool.key and server not in self.pool.starts:
                    # a subset (--steps) can make a short part the one that starts its server: give it
                    # the budget of the part that starts that server in the full run
                    first = next(p for p in PARTS if p[2] == server)
                    budget = max(budget, first[3] if self.device == "cuda" else first[4])
                budget *= self.args.budget_scale
                rec = {"budget_s": budget}
                if step not in self.args.steps:
                    rec.update(status="skipped", why="not in --steps")
                    res["parts"][part] = rec
                    continue
                if part != "write" and not (self.bf16_dir / "config.json").exists():
                    rec.update(status="cannot run", why="no checkpoint (build did not finish)")
                    res["parts"][part] = rec
                    continue
                fn: Callable = getattr(self, f"part_{step}_{part}")
                t0 = time.perf_counter()
                deadline = time.time() + budget
                signal.setitimer(signal.ITIMER_REAL, budget)
                try:
                    rec.update(fn(deadline) or {})
                    rec["status"] = "done"
                except StepTimeout:
                    rec.update(status="timeout", why=f"over its budget of {budget:.0f} s")
                    if server is not None and self.pool.key == server:
                        self.pool.close()
                    if server is not None and server not in self.pool.starts:
                        self.pool.failed.setdefault(server, "start-up did not finish within the budget")
                except (CannotRun, ServerUnavailable) as e:
                    rec.update(status="cannot run", why=str(e))
                except Exception as e:  # noqa: BLE001 - reported, the other steps go on
                    rec.update(status="error", why=f"{type(e).__name__}: {str(e)[-3000:]}",
                               traceback=traceback.format_exc()[-3000:])
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                rec["seconds"] = round(time.perf_counter() - t0, 2)
                res["parts"][part] = rec
                res["seconds"] = round(res["seconds"] + rec["seconds"], 2)
                print(f"[gpu-check] {step}/{part}: {rec['status']} in {rec['seconds']:.1f} s (budget {budget:.0f} s)"
                      + (f" - {rec['why'][:300]}" if rec.get("why") else ""), flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self.pool.close()
        for step in STEPS:
            res = self.results[step]
            states = [p["status"] for p in res["parts"].values()]
            if all(s == "skipped" for s in states):
                res["status"] = "skipped"
            elif any(s != "done" for s in states if s != "skipped"):
                res["status"] = next(s for s in states if s not in ("done", "skipped"))
            else:
                try:
                    res["status"] = getattr(self, f"check_{step}")(res["parts"])
                except Exception as e:  # noqa: BLE001
                    res["status"] = "error"
                    res["why"] = f"{type(e).__name__}: {e}"
        return {"total_seconds": round(time.perf_counter() - t_all, 1), "servers": self.pool.starts}


def summary(step: str, res: dict) -> str:
    p = res["parts"]
    try:
        if step == "build":
            w = p["write"]
            return f"{w['bytes'] / 1e9:.2f} GB bf16" + (" (reused)" if "reused" in w else
                                                       f", written in {w['generate_write_seconds']:.1f} s")
        if step == "reference":
            c = p["compare"]
            return (f"max |dlogprob| prefill {c['spec']['prefill_max']:.3g} decode {c['spec']['decode_max']:.3g} "
                    f"(tol {c['tolerance']:g}); window off {c['window_off']['max']:.3g}, "
                    f"no routed clamp {c['no_routed_clamp']['max']:.3g}")
        if step == "builtin":
            o, r = p["ours"], p["reference"]
            vs_ours = f"ours {o['equal_prompts']}/{o['of']}, " if "equal_prompts" in o else "ours: GPU only, "
            return (f"greedy equal: {vs_ours}reference {r['equal_prompts']}/{r['of']} prompts x "
                    f"{p['builtin']['new_tokens']} tokens")
        if step == "mtp":
            m = p["mtp3"]
            return f"equal {m['equal_prompts']}/{m['of']}, accept length {m['accept_length']:.2f}"
        if step == "fp8":
            f = p["fp8"]
            return (f"|dlogprob| vs bf16: greedy tokens max {f['greedy_max']:.3g} (tol {f['tolerance']:g}), "
                    f"all tokens mean {f['mean']:.3g} (tol {f['mean_tolerance']:g}), max {f['max']:.3g}")
        if step == "timing":
            o, b_ = p["ours"]["batches"], p["builtin"]["batches"]
            r = p["ours"]["ratio_ours_over_builtin"]
            return "  ".join(f"{b}: {o[b]['decode_tok_s']:.0f} vs {b_[b]['decode_tok_s']:.0f} tok/s ({r[b]:.2f}x)"
                             for b in o)
        if step == "layers":
            r = p["replay"]
            return (f"copy {r['copy_gbps']:.0f} GB/s; " + " ".join(
                f"L{x['layer']}:{x['kind']} {x['time_us']:.0f}us/{x['roofline_us']:.0f}us" for x in r["layers"]))
        if step == "kernels":
            return " ".join(f"{x['op']}[{x['shape']},T={x['tokens']}] {x['speedup']:.2f}x" for x in p["bench"]["rows"])
    except (KeyError, TypeError, ZeroDivisionError) as e:
        return f"(incomplete: {type(e).__name__} {e})"
    return ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when a GPU is visible")
    ap.add_argument("--ckpt-dir", default=None, help=f"checkpoints (built on first use; default {DEFAULT_CKPT_DIR}[-cpu])")
    ap.add_argument("--moe-layers", type=int, default=2, help="MoE layers of the real-width checkpoint (2: ~29 GB)")
    ap.add_argument("--server-args", default="", help='extra `sglang serve` flags for every server, e.g. "--tp 4 --ep 4"')
    ap.add_argument("--mem-fraction", type=float, default=0.55,
                    help="--mem-fraction-static of the GPU servers (the reference shares the GPU after them)")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of: " + ", ".join(STEPS))
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every budget (slow machines)")
    ap.add_argument("--out", type=Path, default=OUT_DIR)
    args = ap.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.steps = [s for s in args.steps.split(",") if s]
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        ap.error(f"unknown --steps {sorted(unknown)}")
    if args.ckpt_dir is None:
        args.ckpt_dir = str(DEFAULT_CKPT_DIR) + ("" if args.device == "cuda" else "-cpu")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            ap.error("--device cuda but no GPU is visible (use --device cpu for the harness smoke)")
    else:
        print("[gpu-check] --device cpu: tiny widths, float32, CPU servers - a smoke of the harness, not a GPU claim",
              flush=True)
    check = Check(args)
    print(f"[gpu-check] device {args.device}; checkpoints in {args.ckpt_dir}; budget "
          f"{sum(BUDGETS[s][args.device] for s in STEPS) * args.budget_scale:.0f} s over {len(STEPS)} steps", flush=True)
    meta = check.run()
    from serving import machine_description
    import sglang

    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": args.device,
        "machine": machine_description(),
        "sglang_version": sglang.__version__,
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "dtype": check.dtype,
        "checkpoint": str(check.bf16_dir),
        **meta,
        "steps": check.results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_check.json" if args.device == "cuda" else "gpu_check_cpu.json")
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\n{'step':<10} {'status':<11} {'seconds':>8} {'budget':>7}  result")
    for step in STEPS:
        r = check.results[step]
        print(f"{step:<10} {r['status']:<11} {r['seconds']:>8.1f} {r['budget_s'] * args.budget_scale:>7.0f}  "
              f"{summary(step, r) if r['status'] in ('pass', 'fail', 'measured') else ''}")
    for key, s in meta["servers"].items():
        print(f"  server {key}: up in {s['seconds']:.1f} s")
    print(f"[gpu-check] total {meta['total_seconds']:.1f} s; wrote {path}")
    bad = [s for s in STEPS if check.results[s]["status"] not in ("pass", "measured", "skipped")]
    if bad:
        print(f"[gpu-check] not passed: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

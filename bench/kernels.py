"""Benchmark the Step-3.5 Triton kernels against the unfused torch ops they replace.

Sizes are Step-3.5-Flash's: SwiGLU over the 1280-wide expert intermediate (gate_up [T, 2560]),
head gate over 64x128 (full layers) and 96x128 (sliding layers), router over E=288 top-8, for
T = 1 .. 8192 tokens. All three ops are memory-bound, so next to the time we report achieved GB/s
(bytes the op must move / time) and that as a fraction of the GPU's peak DRAM bandwidth. The router
is also compared with SGLang's own TopK routes for the same rule (``router_vs_topk``: time, max
weight difference, rows routed to other experts).

Writes bench/out/kernels.json and bench/out/kernels.png (bench/out/ is gitignored).

    python bench/kernels.py                 # GPU: full sweep
    python bench/kernels.py --tokens 1 64   # a subset

Without a GPU the kernels run in Triton's CPU interpreter on small sizes only: the numbers then say
nothing about GPU performance; the script says so loudly and marks the JSON ("interpreter": true).
Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    # Must precede the first triton import: @triton.jit picks interpreted vs compiled at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sglang_step35 import ops  # noqa: E402

# Peak DRAM bandwidth in GB/s (vendor spec sheets). Matched by substring of the device name, most
# specific first (an "H100 PCIe" must not match the SXM entry).
PEAK_BW_GBPS: list[tuple[str, float]] = [
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("H200", 4800.0),
    ("GH200", 4000.0),
    ("B200", 8000.0),
    ("B300", 8000.0),
    ("MI300X", 5300.0),
    ("MI325X", 6000.0),
    ("MI350X", 8000.0),
    ("MI355X", 8000.0),
]

HIDDEN = 4096
EXPERT_INTER = 1280
NUM_EXPERTS, TOP_K = 288, 8
HEAD_DIM = 128
GPU_TOKENS = [1, 8, 64, 256, 1024, 4096, 8192]
CPU_TOKENS = [1, 8, 32]  # interpreter: seconds per launch at these sizes already


def peak_bandwidth(name: str) -> float | None:
    for key, bw in PEAK_BW_GBPS:
        if key.lower() in name.lower():
            return bw
    return None


def time_fn(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds per call."""
    if ON_GPU:
        from triton.testing import do_bench

        # do_bench flushes L2 between runs, so small-T cases are not flattered by cache hits.
        return do_bench(fn, warmup=10, rep=max(20, repeat), return_mode="median") / 1e3
    fn()  # first call rewrites the kernel AST in the interpreter
    samples = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def cases(tokens: list[int], device: str, dtype: torch.dtype):
    """(op, shape label, tokens, bytes moved, fused fn, unfused fn) for each benchmark point."""
    es = torch.tensor([], dtype=dtype).element_size()
    impl = None if ON_GPU else "cuda"  # on CPU force the Triton path (interpreter) for comparison
    for t in tokens:
        gu = torch.randn(t, 2 * EXPERT_INTER, device=device, dtype=dtype) * 4
        moved = t * 2 * EXPERT_INTER * es + t * EXPERT_INTER * es
        yield (
            "swiglu_clamp",
            f"I={EXPERT_INTER}",
            t,
            moved,
            lambda gu=gu: ops.swiglu_clamp(gu, 7.0, impl=impl),
            lambda gu=gu: ops.swiglu_clamp_ref(gu, 7.0),
        )
        for heads in (64, 96):
            x = torch.randn(t, heads * HEAD_DIM, device=device, dtype=dtype)
            g = torch.randn(t, heads, device=device, dtype=dtype)
            moved = 2 * t * heads * HEAD_DIM * es + t * heads * es
            yield (
                "head_gate",
                f"{heads}x{HEAD_DIM}",
                t,
                moved,
                lambda x=x, g=g, h=heads: ops.head_gate(x, g, h, impl=impl),
                lambda x=x, g=g, h=heads: ops.head_gate_ref(x, g, h),
            )
        logits = torch.randn(t, NUM_EXPERTS, device=device, dtype=torch.float32)
        bias = torch.randn(NUM_EXPERTS, device=device, dtype=torch.float32) * 0.1
        moved = t * NUM_EXPERTS * 4 + NUM_EXPERTS * 4 + t * TOP_K * (4 + 4)
        yield (
            "router",
            f"E={NUM_EXPERTS} k={TOP_K}",
            t,
            moved,
            lambda lg=logits, b=bias: ops.sigmoid_topk_route(lg, b, TOP_K, 3.0, impl=impl),
            lambda lg=logits, b=bias: ops.sigmoid_topk_route_ref(lg, b, TOP_K, 3.0),
        )


def sglang_topk_routes():
    """SGLang 0.5.23's routes for the TopK config its built-in Step-3.5 uses (scoring_func="sigmoid",
    correction_bias, scale folded with apply_routed_scaling_factor_on_output): the GPU gate that
    forward_cuda reaches (moe_fused_gate's Triton kernel) and forward_native's torch version.
    See the comment at Step35MoE._route for why we keep our router."""
    from sglang_step35.plugin import register

    # As in every SGLang process: on a GPU-less machine the plugin supplies the sgl_kernel stand-in
    # that SGLang's CPU engine imports (SGLANG_USE_CPU_ENGINE=1 makes topk's imports reach it).
    register()
    import sglang.kernels.ops.moe.moe_fused_gate as gate
    from sglang.srt.layers.moe.topk import fused_topk_torch_native

    if not ON_GPU:
        gate.is_arch_support_pdl = lambda: False  # asks the CUDA driver; the interpreter has no PDL

    def gpu(lg, b):
        return gate.moe_fused_gate(lg, b, TOP_K, scoring_func="sigmoid", renormalize=True,
                                   routed_scaling_factor=3.0, apply_routed_scaling_factor_on_output=True)

    def native(lg, b):
        w, ids = fused_topk_torch_native(lg, lg, TOP_K, True, correction_bias=b, scoring_func="sigmoid")
        return w * 3.0, ids  # select_experts folds the scale after this route

    return gpu, native


def router_vs_topk(tokens: list[int], device: str, repeat: int) -> list[dict]:
    """Our router vs SGLang's TopK routes on random logits: time, max weight difference and rows
    whose experts differ. fp32 logits + random bias (need_fp32_gate, as served) and bf16-rounded
    logits + zero bias (ties: what separates the tie-breaks)."""
    impl = None if ON_GPU else "cuda"
    gpu, native = sglang_topk_routes()
    rows = []
    print(f"\nrouter vs SGLang TopK(sigmoid, correction_bias), E={NUM_EXPERTS} k={TOP_K}")
    print(f"{'logits':<10}{'T':>6}{'ours us':>10}{'gate us':>10}{'gate max|dw|':>14}{'gate id rows':>14}"
          f"{'native set rows':>17}")
    gen = torch.Generator(device=device).manual_seed(0)
    for t in tokens:
        for kind in ("fp32", "bf16+0"):
            lg = torch.randn(t, NUM_EXPERTS, device=device, generator=gen) * 2
            b = torch.randn(NUM_EXPERTS, device=device, generator=gen) * 0.1
            if kind == "bf16+0":
                lg, b = lg.bfloat16().float(), torch.zeros_like(b)
            w, ids = ops.sigmoid_topk_route(lg, b, TOP_K, 3.0, impl=impl)
            gw, gids = gpu(lg, b)
            _, nids = native(lg, b)
            # Ours and the gate emit ids in the same order (biased score desc, lowest index on ties);
            # torch.topk(sorted=False) does not, so native is compared as expert sets.
            gate_rows = int((gids.long() != ids.long()).any(-1).sum())
            dw = float((gw - w).abs().max()) if t else 0.0
            native_rows = int((nids.long().sort(-1).values != ids.long().sort(-1).values).any(-1).sum())
            to = time_fn(lambda: ops.sigmoid_topk_route(lg, b, TOP_K, 3.0, impl=impl), repeat)
            tg = time_fn(lambda: gpu(lg, b), repeat)
            rows.append(dict(logits=kind, tokens=t, ours_s=to, gate_s=tg, gate_max_dw=dw,
                             gate_id_rows=gate_rows, native_set_rows=native_rows))
            print(f"{kind:<10}{t:>6}{to * 1e6:>10.1f}{tg * 1e6:>10.1f}{dw:>14.2e}{gate_rows:>9}/{t:<4}"
                  f"{native_rows:>12}/{t:<4}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="*", help="token counts (default: GPU 1..8192, CPU 1..32)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeat", type=int, default=None, help="timed repetitions (default GPU 100, CPU 3)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args(argv)

    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    tokens = args.tokens or (GPU_TOKENS if ON_GPU else CPU_TOKENS)
    repeat = args.repeat or (100 if ON_GPU else 3)
    name = torch.cuda.get_device_name(0) if ON_GPU else "cpu (Triton interpreter)"
    peak = peak_bandwidth(name) if ON_GPU else None

    if not ON_GPU:
        banner = "!" * 78
        print(
            f"{banner}\n!! NO GPU: Triton kernels run in the CPU INTERPRETER on small sizes only.\n"
            f"!! Times below measure numpy emulation, NOT kernel performance. Use a GPU for real numbers.\n{banner}",
            file=sys.stderr,
        )
    elif peak is None:
        print(f"note: no peak-bandwidth entry for {name!r}; reporting GB/s without a fraction", file=sys.stderr)

    rows = []
    print(f"device: {name}   dtype: {args.dtype}   peak DRAM: {peak or 'n/a'} GB/s")
    print(f"{'op':<13}{'shape':<14}{'T':>6}{'fused us':>11}{'torch us':>11}{'speedup':>9}{'GB/s':>9}{'%peak':>7}")
    for op, shape, t, moved, fused, unfused in cases(tokens, device, dtype):
        tf, tu = time_fn(fused, repeat), time_fn(unfused, repeat)
        gbps = moved / tf / 1e9
        frac = gbps / peak if peak else None
        rows.append(
            dict(op=op, shape=shape, tokens=t, bytes=moved, fused_s=tf, torch_s=tu, speedup=tu / tf, gbps=gbps, frac_peak=frac)
        )
        pct = f"{100 * frac:6.1f}%" if frac is not None else "    n/a"
        print(f"{op:<13}{shape:<14}{t:>6}{tf * 1e6:>11.1f}{tu * 1e6:>11.1f}{tu / tf:>9.2f}{gbps:>9.1f}{pct:>7}")

    topk_rows = router_vs_topk(tokens, device, repeat)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, interpreter=not ON_GPU, dtype=args.dtype, peak_gbps=peak, torch=torch.__version__)
    json_path = args.out / "kernels.json"
    json_path.write_text(json.dumps(dict(meta=meta, results=rows, router_vs_topk=topk_rows), indent=2))
    print(f"wrote {json_path}")
    png = plot(rows, meta, args.out / "kernels.png")
    if png:
        print(f"wrote {png}")
    return 0


def plot(rows: list[dict], meta: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the PNG (pip install matplotlib)", file=sys.stderr)
        return None
    series = sorted({(r["op"], r["shape"]) for r in rows})
    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(13, 5))
    for op, shape in series:
        pts = sorted((r for r in rows if (r["op"], r["shape"]) == (op, shape)), key=lambda r: r["tokens"])
        tok = [r["tokens"] for r in pts]
        (line,) = ax_t.plot(tok, [r["fused_s"] * 1e6 for r in pts], marker="o", label=f"{op} {shape} fused")
        ax_t.plot(tok, [r["torch_s"] * 1e6 for r in pts], ls="--", color=line.get_color(), label=f"{op} {shape} torch")
        ax_bw.plot(tok, [r["gbps"] for r in pts], marker="o", color=line.get_color(), label=f"{op} {shape}")
    if meta["peak_gbps"]:
        ax_bw.axhline(meta["peak_gbps"], color="k", ls=":", label=f"peak {meta['peak_gbps']:.0f} GB/s")
    for ax, ylabel in ((ax_t, "time per call (us)"), (ax_bw, "achieved GB/s (fused)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    title = f"Step-3.5 kernels on {meta['device']} ({meta['dtype']})"
    if meta["interpreter"]:
        title += " - CPU INTERPRETER, not GPU performance"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())

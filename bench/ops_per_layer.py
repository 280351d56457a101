"""Ops per decoder layer in one decode step: our Step-3.5 layer vs SGLang 0.5.23's built-in
(`sglang.srt.models.step3p5`), counted with torch.profiler on CPU at Step-3.5-Flash's width.

Each model builds two consecutive layers of the same kind in one SGLang layer stack (dense: layers
0-1, MoE: layers 3-4 of the shipped Flash config), runs one decode token through both, and counts
the ops of the second layer only, which starts from what a layer receives in the middle of the
model (the previous layer's owed output and residual). Counted are the aten ops the layer's Python
code issues (top-level `aten::` events: nested ones, e.g. `aten::addmm` under `aten::linear`, are
not counted again), roughly the kernels a GPU launches in eager mode (`non-view`: without the ops
that only re-view memory: view, reshape, split, ...), split by where they run:

- attention: inside `self_attn` (qkv, q/k norm, rope, gate, o_proj; the attention core itself is a
  plain stand-in, the same for both models, since SGLang's backends need a KV pool and runner);
- ffn: inside the dense MLP or the MoE block (router, experts, shared expert);
- boundary: everything else: the residual adds and RMSNorms between them, which is what SGLang's
  layer-boundary machinery (fused add + RMSNorm, all-reduce fusion) owns.

`fused norms`: how many of the layer's two residual-stream norms were called with a residual,
`norm(x, residual)`: on a GPU each is one fused add + RMSNorm kernel, and the call SGLang's
all-reduce fusion replaces; on CPU SGLang runs it as torch ops, so the op counts cannot show it.

Width is Step-3.5-Flash's (hidden 4096, 64/96 query heads x 128, dense intermediate 11264, expert
and shared intermediate 1280, top-8) with `--experts` routed experts built instead of 288 (288 would
take 9 GB per layer in bf16; a decode token reaches 8 either way). On CPU SGLang's built-in MoE
cannot route (its sigmoid TopK calls `topk_sigmoid`, imported only on CUDA/HIP/XPU), so for the
built-in that one function is given a torch version; it runs inside `ffn`.

Writes bench/out/ops_per_layer.json and .png (bench/out/ is gitignored).

    python bench/ops_per_layer.py               # make bench-ops
    python bench/ops_per_layer.py --experts 8   # smaller
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

# Ops that only make a new view of the same memory (no kernel on a GPU).
VIEW_OPS = {"aten::view", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::split", "aten::chunk",
            "aten::slice", "aten::select", "aten::expand", "aten::permute", "aten::transpose", "aten::t",
            "aten::as_strided", "aten::detach", "aten::alias", "aten::split_with_sizes", "aten::unbind",
            "aten::narrow", "aten::flatten"}
KINDS = {"dense": (0, 1), "moe": (3, 4)}  # (warm-up layer, counted layer) in the Flash config
CONTEXT = 1024  # cached keys the stand-in attention reads


class PlainAttention(nn.Module):
    """The attention core for both models: one decode query over `CONTEXT` cached keys."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype):
        super().__init__()
        self.h, self.d = num_heads, head_dim
        self.k = torch.randn(CONTEXT, num_kv_heads, head_dim, dtype=dtype)
        self.v = torch.randn(CONTEXT, num_kv_heads, head_dim, dtype=dtype)

    def forward(self, q, k, v, forward_batch, *args, **kwargs):  # noqa: ARG002
        g = self.h // self.k.shape[1]
        s = torch.einsum("qhd,khd->hqk", q.view(-1, self.h, self.d), self.k.repeat_interleave(g, 1))
        p = (s * self.d**-0.5).softmax(-1)
        return torch.einsum("hqk,khd->qhd", p, self.v.repeat_interleave(g, 1)).reshape(q.shape[0], -1)


def world_of_one() -> None:
    """register() first, as every SGLang process runs it (on a GPU-less host it selects SGLang's CPU
    engine, which SGLang reads at import), then a world-size-1 SGLang parallel state."""
    from sglang_step35.plugin import register
    from sglang_step35.server import free_port

    register()
    from sglang.test.layer_ut_utils import init_single_process_dist

    init_single_process_dist(master_port=free_port())


def flash_config(experts: int, **overrides):
    """The Flash config with `experts` routed experts; `overrides` (e.g. a smaller hidden size) let
    tests/test_ops_per_layer.py count the same layers cheaply: the op counts do not depend on width."""
    from sglang_step35.config import Step35Config, read_config

    raw = read_config()
    raw["moe_num_experts"] = experts
    raw.update(overrides)
    return Step35Config(**raw)


def cpu_topk_sigmoid():
    """A torch `topk_sigmoid(topk_weights, topk_ids, gating_output, renormalize, correction_bias)`
    for SGLang's built-in on CPU (its CUDA op's contract: select by score + bias, weight by the
    score, renormalised)."""
    def topk_sigmoid(topk_weights, topk_ids, gating_output, renormalize=False, correction_bias=None, **_):
        scores = gating_output.float().sigmoid()
        chosen = scores + correction_bias if correction_bias is not None else scores
        ids = chosen.topk(topk_ids.shape[1], dim=-1).indices
        w = scores.gather(1, ids)
        if renormalize:
            w = w / w.sum(-1, keepdim=True)
        topk_weights.copy_(w)
        topk_ids.copy_(ids.to(topk_ids.dtype))
    return topk_sigmoid


def build(which: str, cfg, layer_ids, dtype):
    from sglang.srt.layers.layer_boundary import layer_stack
    from sglang.srt.runtime_context import get_context

    torch.set_default_dtype(dtype)
    with get_context().override_server_args(device="cpu"), layer_stack():
        if which == "ours":
            from sglang_step35.models.step3p5 import Step35DecoderLayer

            layers = [Step35DecoderLayer(cfg, i, None, prefix=f"model.layers.{i}") for i in layer_ids]
        else:
            from sglang.srt.models.step3p5 import Step3p5DecoderLayer

            layers = [Step3p5DecoderLayer(config=cfg, layer_id=i, quant_config=None, prefix=f"model.layers.{i}")
                      for i in layer_ids]
    torch.set_default_dtype(torch.float32)
    g = torch.Generator().manual_seed(0)
    for layer in layers:
        for name, p in layer.named_parameters():
            if p.dtype.is_floating_point:
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
        a = layer.self_attn
        a.attn = PlainAttention(a.num_heads, a.num_kv_heads, a.head_dim, dtype)
    return layers


def mark_regions(layer: nn.Module) -> None:
    """record_function ranges around the attention and FFN modules of `layer`."""
    regions = {"attention": ["self_attn"], "ffn": ["mlp", "moe", "share_expert"]}
    for region, names in regions.items():
        for name in names:
            mod = getattr(layer, name, None)
            if mod is None:
                continue
            ranges = []

            def pre(_m, _a, region=region, ranges=ranges):
                ranges.append(torch.autograd.profiler.record_function(region))
                ranges[-1].__enter__()

            def post(_m, _a, _o, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)


def decode_batch():
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

    return SimpleNamespace(residual_stream=None, capture_hidden_mode=CaptureHiddenMode.NULL, spec_info=None,
                           attn_cp_metadata=None, forward_mode=ForwardMode.DECODE)


def count(layers, hidden: int, dtype) -> dict:
    from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
    from torch.profiler import ProfilerActivity, profile

    warm, counted = layers
    mark_regions(counted)
    pos = torch.tensor([CONTEXT])
    x = torch.randn(1, hidden, dtype=dtype)

    from sglang.srt.layers.layernorm import GemmaRMSNorm

    norms: list[bool] = []  # residual-stream norm calls of the counted layer: given a residual?
    original = GemmaRMSNorm.forward

    def recording(self, x, residual=None, *args, **kwargs):
        if x.shape[-1] == hidden:  # not the per-head q/k norms
            norms.append(residual is not None)
        return original(self, x, residual, *args, **kwargs)

    def step(prof=None):
        fb = decode_batch()
        residual_batch.start(fb)
        h = warm(pos, x, fb)
        if prof is None:
            h = counted(pos, h, fb)
        else:
            GemmaRMSNorm.forward = recording
            try:
                with prof:
                    h = counted(pos, h, fb)
            finally:
                GemmaRMSNorm.forward = original
        return residual_batch.complete_output(h, fb)

    with torch.no_grad():
        step()  # warm-up
        prof = profile(activities=[ProfilerActivity.CPU])
        step(prof)
    out = {"attention": 0, "ffn": 0, "boundary": 0}
    names: dict[str, dict[str, int]] = {k: {} for k in out}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        parent, region, nested = e.cpu_parent, "boundary", False
        while parent is not None:
            if parent.name.startswith("aten::"):
                nested = True
            if parent.name in out:
                region = parent.name
            parent = parent.cpu_parent
        if nested:
            continue
        out[region] += 1
        names[region][e.name] = names[region].get(e.name, 0) + 1
    out["total"] = sum(out.values())
    # On a GPU each norm given a residual is one fused add + RMSNorm kernel (and the place where
    # SGLang's all-reduce fusion can take a pending TP sum); on CPU SGLang runs it as torch ops.
    out["norms_with_residual"] = sum(norms)
    out["norms_without_residual"] = len(norms) - sum(norms)
    out["total_data_ops"] = sum(n for region in names.values() for op, n in region.items() if op not in VIEW_OPS)
    out["boundary_data_ops"] = sum(n for op, n in names["boundary"].items() if op not in VIEW_OPS)
    out["boundary_ops"] = names["boundary"]
    out["ops_by_region"] = names
    return out


def len_norms(r: dict) -> int:
    return r["norms_with_residual"] + r["norms_without_residual"]


def plot(results: dict, path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
    for ax, (kind, per) in zip(axes if len(results) > 1 else [axes], results.items()):
        parts = ["attention", "ffn", "boundary"]
        bottom = [0, 0]
        for part in parts:
            vals = [per[m][part] for m in ("ours", "builtin")]
            ax.bar(["ours", "built-in"], vals, bottom=bottom, label=part)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_title(f"{kind} layer: aten ops, one decode token")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16, help="routed experts built (the Flash model has 288)")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = ap.parse_args()
    dtype = torch.bfloat16
    world_of_one()
    cfg = flash_config(args.experts)
    import sglang.srt.layers.moe.topk as sglang_topk

    results: dict = {}
    for kind in args.kinds:
        results[kind] = {}
        for which in ("ours", "builtin"):
            if which == "builtin" and not hasattr(sglang_topk, "topk_sigmoid"):
                sglang_topk.topk_sigmoid = cpu_topk_sigmoid()
            layers = build(which, cfg, KINDS[kind], dtype)
            results[kind][which] = count(layers, cfg.hidden_size, dtype)
            del layers
        ours, theirs = results[kind]["ours"], results[kind]["builtin"]
        results[kind]["ratio_total"] = ours["total"] / theirs["total"]
        results[kind]["ratio_boundary"] = ours["boundary"] / max(theirs["boundary"], 1)
        results[kind]["ratio_total_data_ops"] = ours["total_data_ops"] / theirs["total_data_ops"]
    print(f"ops per decoder layer, one decode token, Flash width, {args.experts} experts built, {dtype}")
    print(f"{'layer':<6} {'model':<8} {'attention':>9} {'ffn':>5} {'boundary':>8} {'total':>6} {'non-view':>8} "
          f"{'fused norms':>11}  boundary ops")
    for kind, per in results.items():
        for which in ("ours", "builtin"):
            r = per[which]
            print(f"{kind:<6} {which:<8} {r['attention']:>9} {r['ffn']:>5} {r['boundary']:>8} {r['total']:>6} "
                  f"{r['total_data_ops']:>8} {r['norms_with_residual']:>5} of {len_norms(r):<3}  "
                  + ", ".join(f"{k} x{v}" for k, v in sorted(r["boundary_ops"].items())))
        print(f"{kind:<6} ours / built-in: total {per['ratio_total']:.3f}, non-view {per['ratio_total_data_ops']:.3f}, "
              f"boundary {per['ratio_boundary']:.3f}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.machine()} {platform.processor()}".strip(),
            "torch": torch.__version__, "experts_built": args.experts, "dtype": str(dtype),
            "layers": {k: list(v) for k, v in KINDS.items() if k in args.kinds}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ops_per_layer.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    png = plot(results, args.out / "ops_per_layer.png")
    print(f"wrote {args.out / 'ops_per_layer.json'}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

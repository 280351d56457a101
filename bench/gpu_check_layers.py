"""The `layers` step of `make gpu-check` (bench/gpu_check.py), in its own process so CUDA state and
TRITON_INTERPRET stay out of the driver: each layer's decode step (batch 1) of a real-width
checkpoint vs the HBM roofline of its bytes, with the bandwidth of a copy kernel measured in the
same run. Writes one JSON file.

    python bench/gpu_check_layers.py CKPT_DIR --device cuda --out layers.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout
    sys.path.insert(0, str(ROOT))


def layers_worker(ckpt: Path, device: str, out: Path) -> None:
    import torch
    import torch.nn.functional as F
    from safetensors import safe_open

    from sglang_step35 import ops
    from sglang_step35.config import layer_spec, read_config

    cfg = read_config(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    H, k, scale = int(cfg["hidden_size"]), int(cfg["moe_top_k"]), float(cfg["moe_router_scaling_factor"])
    kv_len = min(1024, int(cfg["sliding_window"]))

    def timed(fn, reps):
        """Median seconds per call: CUDA-graph replays timed with events on a GPU, else wall time."""
        fn()
        if on_gpu:
            torch.cuda.synchronize()
            how = "cuda graph"
            try:
                g = torch.cuda.CUDAGraph()
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    fn()
                torch.cuda.current_stream().wait_stream(s)
                with torch.cuda.graph(g):
                    fn()
                run = g.replay
            except Exception as e:  # noqa: BLE001 - e.g. a host sync in the op: time it eagerly
                how, run = f"eager ({type(e).__name__})", fn
            samples = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                run()
                b.record()
                b.synchronize()
                samples.append(a.elapsed_time(b) / 1e3)
            return statistics.median(samples), how
        samples = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return statistics.median(samples), "wall clock"

    # copy bandwidth: read + write of a buffer larger than any cache
    nbytes = (2 << 30) if on_gpu else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t_copy, _ = timed(lambda: dst.copy_(src), 20 if on_gpu else 3)
    bw = 2 * nbytes / t_copy
    src = dst = None  # free the buffers (rebinding, not del: the timed lambda closes over them)

    moe_kernel = "torch gather (no GPU)"
    fused_moe = None
    if on_gpu:
        try:
            from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
            from sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe import fused_moe as _fm
            from sglang.srt.layers.moe.topk import StandardTopKOutput

            fused_moe, moe_kernel = (_fm, MoeRunnerConfig, StandardTopKOutput), "SGLang Triton fused_moe"
        except Exception as e:  # noqa: BLE001
            moe_kernel = f"torch gather (SGLang fused_moe unavailable: {type(e).__name__}: {e})"

    rows = []
    n = int(cfg["num_hidden_layers"])
    for i in range(n):
        spec = layer_spec(cfg, i)
        p = f"model.layers.{i}."
        names = [nm for nm in index if nm.startswith(p)]
        w = {}
        for f in sorted({index[nm] for nm in names}):
            with safe_open(str(ckpt / f), "pt", device=str(dev)) as fh:
                for nm in fh.keys():
                    if nm.startswith(p):
                        w[nm[len(p):]] = fh.get_tensor(nm).to(dtype) if not nm.endswith("router_bias") else fh.get_tensor(nm)
        nh, nkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        wqkv = torch.cat([w["self_attn.q_proj.weight"], w["self_attn.k_proj.weight"], w["self_attn.v_proj.weight"]])
        kcache = torch.randn(1, nkv, kv_len, d, device=dev, dtype=dtype)
        vcache = torch.randn_like(kcache)
        x = torch.randn(1, H, device=dev, dtype=dtype)
        attn_names = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "self_attn.g_proj.weight")
        bytes_ = sum(w[a].numel() * w[a].element_size() for a in attn_names) + 2 * kcache.numel() * kcache.element_size()

        def attention():
            qkv = F.linear(x, wqkv)
            q = qkv[:, : nh * d].view(1, nh, 1, d)
            o = F.scaled_dot_product_attention(q, kcache, vcache, enable_gqa=True).reshape(1, nh * d)
            o = ops.head_gate(o, F.linear(x, w["self_attn.g_proj.weight"]), nh)
            return F.linear(o, w["self_attn.o_proj.weight"])

        if spec.is_moe:
            w13 = torch.cat([w["moe.gate_proj.weight"], w["moe.up_proj.weight"]], dim=1)  # [E, 2I, H]
            w2 = w["moe.down_proj.weight"]
            s13 = torch.cat([w["share_expert.gate_proj.weight"], w["share_expert.up_proj.weight"]])
            gate_w = w["moe.gate.weight"].float()
            logits = F.linear(x.float(), gate_w)
            _, ids = ops.sigmoid_topk_route(logits, w["moe.router_bias"], k, scale)
            per_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
            bytes_ += ids.unique().numel() * per_expert + gate_w.numel() * 2 + (s13.numel() + w["share_expert.down_proj.weight"].numel()) * s13.element_size()
            limit = spec.swiglu_limit or None

            def ffn():
                lg = F.linear(x.float(), gate_w)
                tw, ti = ops.sigmoid_topk_route(lg, w["moe.router_bias"], k, scale)
                if fused_moe is not None:
                    fm, Cfg, Out = fused_moe
                    routed = fm(x, w13, w2, Out(tw, ti, lg), Cfg(inplace=False, gemm1_clamp_limit=limit))
                else:
                    gu = torch.einsum("th,tkih->tki", x, w13[ti.long()])
                    a = ops.swiglu_clamp(gu.reshape(-1, gu.shape[-1]), limit or 0.0).view(1, k, -1)
                    routed = (torch.einsum("tki,tkhi->tkh", a, w2[ti.long()]) * tw[..., None].to(a.dtype)).sum(1)
                sh = ops.swiglu_clamp(F.linear(x, s13), spec.swiglu_limit_shared or 0.0)
                return routed + F.linear(sh, w["share_expert.down_proj.weight"])
            kind = "moe"
        else:
            m13 = torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])
            bytes_ += (m13.numel() + w["mlp.down_proj.weight"].numel()) * m13.element_size()

            def ffn():
                return F.linear(ops.swiglu_clamp(F.linear(x, m13), spec.swiglu_limit_shared or 0.0),
                                w["mlp.down_proj.weight"])
            kind = "dense"
        kind += "/" + ("swa" if spec.sliding else "full") + ("/clamp" if spec.swiglu_limit or spec.swiglu_limit_shared else "")

        def layer():
            return attention() + ffn()

        if spec.is_moe and fused_moe is not None:
            try:
                layer()
            except Exception as e:  # noqa: BLE001 - keep measuring with the torch path, say why
                fused_moe = None
                moe_kernel = f"torch gather (SGLang fused_moe failed: {type(e).__name__}: {str(e)[:300]})"

        reps = 50 if on_gpu else 3
        t, how = timed(layer, reps)
        rows.append({"layer": i, "kind": kind, "bytes": bytes_, "time_us": t * 1e6, "roofline_us": bytes_ / bw * 1e6,
                     "efficiency": (bytes_ / bw) / t, "timed_as": how})
        w = wqkv = None  # free this layer before the next (the closures above close over them)
        if on_gpu:
            torch.cuda.empty_cache()
    out.write_text(json.dumps({"copy_gbps": bw / 1e9, "copy_bytes": nbytes, "moe_kernel": moe_kernel, "batch": 1,
                               "kv_len": kv_len, "dtype": str(dtype).replace("torch.", ""), "layers": rows}, indent=2))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path, help="a real-width checkpoint (`step35 tiny --real-width`)")
    ap.add_argument("--device", choices=["cuda", "cpu"], required=True)
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    layers_worker(args.ckpt, args.device, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

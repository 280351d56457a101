"""`kernels` step of bench/gpu_check_here.py: our Triton kernels (kernels_cuda: router, head gate,
SwiGLU clamp) at Step-3.5-Flash's widths against their fp32 references (sglang_step35.ops *_ref),
and their bandwidth as a share of a device copy's, measured in the same run."""

from __future__ import annotations

import torch

from gpu_here_common import capture, copy_bandwidth, max_rel_err, median_seconds, reps, sync

# bf16 output of fp32 math: one rounding (2^-8 relative) on the largest element, with margin.
BF16_TOL = 1e-2
ROUTER_W_TOL = 1e-5  # fp32 in, fp32 out: ordering of the renormalisation sum only


def run(cfg: dict, device: str, tiny: bool) -> dict:
    import kernels_cuda
    from sglang_step35 import ops
    from sglang_step35.config import layer_spec

    g = torch.Generator(device=device).manual_seed(0)
    E, k = int(cfg["moe_num_experts"]), int(cfg["moe_top_k"])
    scale = float(cfg["moe_router_scaling_factor"])
    swa = layer_spec(cfg, 1)  # a sliding layer: the widest head gate (96 x 128 on Flash)
    limit = float(max(cfg["swiglu_limits"]))
    widths = {"expert": int(cfg["moe_intermediate_size"]), "dense": int(cfg["intermediate_size"])}
    tokens = [1, 3] if tiny else [1, 64, 8192]
    bw = copy_bandwidth(device)
    checks, rows = [], []

    def measure(name, t, fn, nbytes):
        run, how = capture(fn, device)
        sec = median_seconds(run, device, reps(device))
        rows.append({"kernel": name, "tokens": t, "bytes": nbytes, "time_us": sec * 1e6,
                     "gbps": nbytes / sec / 1e9, "share_of_copy": nbytes / sec / bw, "timed_as": how})

    for t in tokens:
        logits = torch.randn(t, E, device=device, generator=g) * 2
        bias = torch.randn(E, device=device, generator=g) * 0.1
        w, ids = kernels_cuda.sigmoid_topk_route(logits, bias, k, scale)
        rw, rids = ops.sigmoid_topk_route_ref(logits, bias, k, scale)
        checks.append({"check": f"router ids == fp32 reference (T={t})", "ok": bool(torch.equal(ids, rids)),
                       "value": int((ids != rids).sum())})
        err = max_rel_err(w, rw)
        checks.append({"check": f"router weights vs fp32 reference (T={t})", "ok": err <= ROUTER_W_TOL,
                       "value": err, "limit": ROUTER_W_TOL})
        measure("router", t, lambda: kernels_cuda.sigmoid_topk_route(logits, bias, k, scale),
                logits.numel() * 4 + E * 4 + t * k * 8)

        width = swa.num_heads * swa.head_dim
        x = torch.randn(t, width, device=device, generator=g).bfloat16()
        gl = torch.randn(t, swa.num_heads, device=device, generator=g).bfloat16()
        out = kernels_cuda.head_gate(x, gl, swa.num_heads)
        err = max_rel_err(out, ops.head_gate_ref(x.float(), gl.float(), swa.num_heads))
        checks.append({"check": f"head gate vs fp32 reference (T={t}, {swa.num_heads} heads)", "ok": err <= BF16_TOL,
                       "value": err, "limit": BF16_TOL})
        measure("head_gate", t, lambda: kernels_cuda.head_gate(x, gl, swa.num_heads), 2 * x.numel() * 2 + gl.numel() * 2)

        for kind, inter in widths.items():
            rows_ = t * k if kind == "expert" else t
            gu = (torch.randn(rows_, 2 * inter, device=device, generator=g) * 4).bfloat16()
            for lim in (0.0, limit):
                out = kernels_cuda.swiglu_clamp(gu, lim)
                err = max_rel_err(out, ops.swiglu_clamp_ref(gu.float(), lim))
                checks.append({"check": f"swiglu_clamp {kind} I={inter} limit={lim:g} vs fp32 (T={rows_})",
                               "ok": err <= BF16_TOL, "value": err, "limit": BF16_TOL})
            measure(f"swiglu_clamp_{kind}", rows_, lambda: kernels_cuda.swiglu_clamp(gu, limit), gu.numel() * 2 * 3 // 2)
    sync(device)
    return {"checks": checks, "timings": rows, "copy_gbps": bw / 1e9}

"""`moe` step of bench/gpu_check_here.py: SGLang's Triton fused MoE as our MoE layers configure it
(Step35MoE -> FusedMoE: EP4 = 72 local experts of 288, I 1280, H 4096, top-8, our router's ids
mapped to this rank's experts with -1 for the others, `gemm1_clamp_limit` 7 on the clamped layers),
in BF16 and 128x128 block FP8, against the dequantized fp32 reference of the same experts; time at
decode batches (CUDA graph) and the HBM roofline of the expert weights the batch touches."""

from __future__ import annotations

import torch

from gpu_here_common import act_dtype, capture, copy_bandwidth, max_rel_err, median_seconds, reps, sync

# Tolerances, relative to the largest reference element: BF16 is bf16 GEMM inputs/intermediates
# (~2^-8 per rounding, a few roundings); FP8 adds the e4m3 activation quantization per 128-group
# (~2^-4 relative per element, averaging over the 4096/1280-long dot products).
BF16_TOL = 3e-2
FP8_TOL = 1e-1
EP_SIZE, EP_RANK = 4, 0


def _quant_blocks(w: torch.Tensor, block: int):
    """[E, N, K] fp32 -> (e4m3 weight, fp32 scale_inv [E, N/block, K/block]) per block amax / 448."""
    E, N, K = w.shape
    blocks = w.view(E, N // block, block, K // block, block)
    amax = blocks.abs().amax(dim=(2, 4)).clamp_min(1e-12)
    scale = amax / 448.0
    q = (blocks / scale[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(E, N, K)
    return q, scale


def _dequant(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return q.float() * scale.repeat_interleave(block, 1).repeat_interleave(block, 2)


def reference(x, w13, w2, weights, local_ids, limit):
    """fp32: sum over the top-k slots that name a local expert of w * down(swiglu_clamp(gate_up(x)))."""
    from sglang_step35 import ops

    x = x.float()
    out = torch.zeros(x.shape[0], w2.shape[1], device=x.device)
    for t in range(x.shape[0]):
        for slot in range(local_ids.shape[1]):
            e = int(local_ids[t, slot])
            if e < 0:
                continue
            h = ops.swiglu_clamp_ref((x[t:t + 1] @ w13[e].t()), limit or 0.0)
            out[t] += weights[t, slot] * (h @ w2[e].t())[0]
    return out


def run(cfg: dict, device: str, tiny: bool, sgl: dict) -> dict:
    from sglang_step35 import ops

    H, inter = int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"])
    E, k = int(cfg["moe_num_experts"]), int(cfg["moe_top_k"])
    n_local = E // EP_SIZE
    limit = float(max(cfg["swiglu_limits"]))  # 7.0: layers 43/44 on Flash
    block = 32 if tiny else 128
    scale = float(cfg["moe_router_scaling_factor"])
    g = torch.Generator(device=device).manual_seed(1)
    dt = act_dtype(device)
    # gate/up of std 6: silu(gate) and |up| pass the clamp (7) on a good share of elements, as on the
    # outlier tokens the clamp exists for; at std 1 the clamped and unclamped kernels would agree.
    w13 = torch.randn(n_local, 2 * inter, H, device=device, generator=g) * (6 / H**0.5)
    w2 = torch.randn(n_local, H, inter, device=device, generator=g) / inter**0.5
    gate = torch.randn(E, H, device=device, generator=g) / H**0.5
    bias = torch.zeros(E, device=device)
    # Route half the picks to this rank's experts: the bias makes them likely, as a busy rank sees.
    bias[EP_RANK * n_local:(EP_RANK + 1) * n_local] = 0.2
    q13, s13 = _quant_blocks(w13, block)
    q2, s2 = _quant_blocks(w2, block)
    variants = {
        "bf16": dict(w1=w13.to(dt), w2=w2.to(dt), kw={}, ref=(w13, w2)),
        "fp8": dict(w1=q13, w2=q2, kw=dict(use_fp8_w8a8=True, w1_scale=s13, w2_scale=s2, block_shape=[block, block]),
                    ref=(_dequant(q13, s13, block), _dequant(q2, s2, block))),
    }
    fused_moe, Cfg, Out = sgl["fused_moe"], sgl["MoeRunnerConfig"], sgl["StandardTopKOutput"]
    bw = copy_bandwidth(device)
    checks, rows = [], []
    batches = [1, 3] if tiny else [1, 16, 64]
    for t in batches:
        x = torch.randn(t, H, device=device, generator=g).to(dt)
        logits = x.float() @ gate.t()

        def route():
            w, ids = ops.sigmoid_topk_route(logits, bias, k, scale)
            local = ids - EP_RANK * n_local
            return w, torch.where((local >= 0) & (local < n_local), local, -1).to(torch.int32)

        w, local_ids = route()
        for name, v in variants.items():
            for lim in (None, limit):
                def layer(v=v, lim=lim):
                    return fused_moe(x, v["w1"], v["w2"], Out(w, local_ids, logits),
                                     Cfg(inplace=False, gemm1_clamp_limit=lim), **v["kw"])

                got = layer()
                ref = reference(x, *v["ref"], w, local_ids, lim)
                err = max_rel_err(got, ref)
                tol = FP8_TOL if name == "fp8" else BF16_TOL
                checks.append({"check": f"fused MoE {name} clamp={lim or 0:g} vs dequantized fp32 (T={t})",
                               "ok": err <= tol and bool(torch.isfinite(got).all()), "value": err, "limit": tol})
                if lim is None:
                    unclamped = ref
                    continue
                off = max_rel_err(got, unclamped)  # teeth: the clamp must change this output
                checks.append({"check": f"fused MoE {name} clamp={lim:g} differs from the unclamped reference (T={t})",
                               "ok": off > tol, "value": off, "limit": tol})  # time the clamped layer (the unclamped kernel differs in one epilogue only)
                run_, how = capture(layer, device)
                sec = median_seconds(run_, device, reps(device))
                touched = int(torch.unique(local_ids[local_ids >= 0]).numel())
                per_expert = (v["w1"][0].numel() + v["w2"][0].numel()) * v["w1"].element_size()
                nbytes = touched * per_expert + 2 * x.numel() * x.element_size()
                rows.append({"variant": name, "tokens": t, "local_experts_touched": touched, "bytes": nbytes,
                             "time_us": sec * 1e6, "roofline_us": nbytes / bw * 1e6,
                             "efficiency": nbytes / bw / sec, "timed_as": how})
    sync(device)
    return {"checks": checks, "timings": rows, "copy_gbps": bw / 1e9,
            "setup": {"experts": E, "ep_size": EP_SIZE, "local_experts": n_local, "hidden": H, "intermediate": inter,
                      "top_k": k, "clamp": limit, "fp8_block": block}}

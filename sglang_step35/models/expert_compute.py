"""Routed-expert computation with Step-3.5's SwiGLU clamp on FusedMoE's own weights: CPU only.

Why this exists: SGLang 0.5.23's CPU MoE (`moe_forward_native`) ignores `gemm1_clamp_limit` and
indexes with the -1 ids of non-local experts under EP. So on CPU the clamped layers (43-44 in
Step-3.5-Flash), and every layer under EP, run this loop (`sglang_step35.moe.policy` decides).
It syncs with the host (`unique().tolist()`, `nonzero`), so it must never run on a GPU path that
SGLang captures in a CUDA graph; GPUs use FusedMoE with the clamp passed in. Works under EP (only
local experts) and TP (partial intermediate; the caller all-reduces).
"""

from __future__ import annotations

import torch

from sglang_step35 import ops


def experts_forward_loop(experts, x: torch.Tensor, topk_output, limit: float) -> torch.Tensor:
    """limit 0 = no clamp. sum_k w_k * down_e(swiglu_clamp(gate_up_e(x))) over this rank's experts; [T, H] in x's dtype."""
    w13, w2 = experts.w13_weight, experts.w2_weight
    n_local = w13.shape[0]
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[2] != x.shape[-1]:
        raise RuntimeError(
            f"clamped MoE path needs unpacked expert weights [E, 2I, H]; got w13 {tuple(w13.shape)}, "
            f"w2 {tuple(w2.shape)} (a weight-repacking MoE backend is active for a clamped layer)"
        )
    up_first = bool(getattr(getattr(experts, "quant_method", None), "load_up_proj_weight_first", False))
    first_local = experts.moe_ep_rank * n_local if experts.moe_ep_size > 1 else 0
    weights, ids = topk_output.topk_weights, topk_output.topk_ids.long()
    local = ids - first_local
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    for e in torch.unique(local[(local >= 0) & (local < n_local)]).tolist():
        token_idx, slot = torch.nonzero(local == e, as_tuple=True)
        gate_up = x[token_idx] @ w13[e].t()
        if up_first:
            gate_up = torch.cat(gate_up.chunk(2, dim=-1)[::-1], dim=-1)
        h = ops.swiglu_clamp(gate_up, limit)
        y = (h @ w2[e].t()).float() * weights[token_idx, slot].float().unsqueeze(-1)
        out.index_add_(0, token_idx, y)
    return out.to(x.dtype)

"""Fused Step-3.5 MoE router: sigmoid scores, biased top-k selection, unbiased renormalised weights.

    scores = sigmoid(logits)                       # logits fp32 [T, E] (need_fp32_gate)
    ids    = top_k(scores + bias)                  # bias fp32 [E] (use_moe_router_bias)
    w      = scores[ids]; w /= w.sum() (renormalize); w *= scaling_factor

Ties are broken towards the lowest expert index (the torch reference does the same with a stable
descending sort), so kernel and reference agree bit-for-bit on ids even for duplicated logits.
NaN scores rank above every number, as in torch's sort, and +-inf logits are ordinary values: ids
are distinct experts in [0, E) for any input, garbage rows included (tests/test_router_kernel_nan.py).
One program handles BLOCK_T tokens with the whole expert row in registers (E=288 -> 512 lanes);
top-k is k rounds of (row max, lowest index attaining it, mask it out), which for k=8 is far
cheaper than a sort and needs no shared-memory scratch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_cuda._common import LaunchConfig, check_route_args, launch_kwargs, next_pow2


@triton.jit
def _sigmoid_topk_kernel(
    logits_ptr,
    bias_ptr,
    w_ptr,
    ids_ptr,
    T,
    E,
    stride_l_t,
    stride_w_t,
    stride_i_t,
    scaling_factor,
    TOP_K: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = experts < E
    mask = row_ok[:, None] & col_ok[None, :]
    row_off = rows.to(tl.int64)[:, None]
    logits = tl.load(logits_ptr + row_off * stride_l_t + experts[None, :], mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + experts, mask=col_ok, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))  # sigmoid, builtins only (kernels_cuda._common)
    sel = scores + bias[None, :]
    # Padding lanes and experts already chosen are tracked as a mask, not as a -inf score: real
    # scores can be -inf (bias) or NaN (garbage in the padded rows of a prefill CUDA graph), and
    # SGLang reads the ids of those rows too (routed-expert recording, EPLB remap), so every id
    # must be a distinct expert in [0, E). NaN ranks above every number, as in torch's sort (the
    # reference): a round picks the lowest-index NaN if the row has one left, else the lowest
    # index attaining the max.
    is_nan = sel != sel
    taken = ~mask  # padding lanes (and rows past T) are never free

    kcols = tl.arange(0, BLOCK_K)
    w_acc = tl.full((BLOCK_T, BLOCK_K), 0.0, tl.float32)  # tl.full: builtin, unlike tl.zeros
    id_acc = tl.full((BLOCK_T, BLOCK_K), 0, tl.int32)
    for k in tl.static_range(TOP_K):
        free = ~taken
        nan_left = tl.reduce(tl.where(free & is_nan, 1, 0), 1, tl.standard._elementwise_max)
        best = tl.reduce(tl.where(free & ~is_nan, sel, float("-inf")), 1, tl.standard._elementwise_max)
        wanted = tl.where(nan_left[:, None] > 0, is_nan, sel == best[:, None])
        # Lowest index among the candidates: the deterministic tie-break the reference uses. At
        # least E - k >= 1 lanes are free, and a free lane is NaN or >= best, so idx < E.
        cand = tl.where(free & wanted, experts[None, :], BLOCK_E)
        idx = tl.reduce(cand, 1, tl.standard._elementwise_min)  # == tl.min(cand, 1)
        hit = experts[None, :] == idx[:, None]
        w = tl.reduce(tl.where(hit, scores, 0.0), 1, tl.standard._sum_combine)  # unbiased score of the chosen expert
        w_acc = tl.where(kcols[None, :] == k, w[:, None], w_acc)
        id_acc = tl.where(kcols[None, :] == k, idx[:, None], id_acc)
        taken = taken | hit

    if RENORMALIZE:
        denom = tl.reduce(w_acc, 1, tl.standard._sum_combine)  # unused lanes (k >= TOP_K) hold 0
        w_acc = w_acc / denom[:, None]
    w_acc = w_acc * scaling_factor
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(w_ptr + row_off * stride_w_t + kcols[None, :], w_acc, mask=out_mask)
    tl.store(ids_ptr + row_off * stride_i_t + kcols[None, :], id_acc, mask=out_mask)


def nvidia_config(num_tokens: int, num_experts: int) -> LaunchConfig:
    """NVIDIA launch config. The whole expert row lives in registers; with E=288 (512 lanes) a
    4-token tile is 2K fp32 values over 4 warps = 16 per thread, leaving room for the k-loop temps.
    Decode batches get 1-token tiles so even tiny batches spread across SMs."""
    block_e = next_pow2(num_experts)
    if num_tokens <= 64:
        block_t = 1
    elif num_tokens <= 1024:
        block_t = 2
    else:
        block_t = 4
    # Keep <= ~16 fp32 row elements per thread: spilling the row to local memory would dominate.
    num_warps = max(1, min(8, (block_t * block_e) // (32 * 16)))
    return LaunchConfig(block_t=block_t, block_n=block_e, num_warps=next_pow2(num_warps), num_stages=1)


def sigmoid_topk_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
    *,
    config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused router. Returns (topk_weights fp32 [T, k], topk_ids int32 [T, k])."""
    num_tokens, num_experts = check_route_args(logits, bias, top_k)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if bias is None:
        bias = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    bias = bias.to(torch.float32).contiguous()
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    cfg = config or nvidia_config(num_tokens, num_experts)
    if cfg.block_n < num_experts:
        raise ValueError(f"router config block_n={cfg.block_n} cannot hold E={num_experts} experts")
    grid = (triton.cdiv(num_tokens, cfg.block_t),)
    _sigmoid_topk_kernel[grid](
        logits,
        bias,
        weights,
        ids,
        num_tokens,
        num_experts,
        logits.stride(0),
        weights.stride(0),
        ids.stride(0),
        float(scaling_factor),
        TOP_K=top_k,
        BLOCK_K=next_pow2(top_k),
        RENORMALIZE=bool(renormalize),
        BLOCK_T=cfg.block_t,
        BLOCK_E=cfg.block_n,
        **launch_kwargs(cfg),
    )
    return weights, ids


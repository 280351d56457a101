"""Fused clamped SwiGLU for Step-3.5 (dense FFN, shared expert, routed-expert activation).

Input is SGLang's merged ``gate_up`` projection output ``[T, 2I]`` (gate in the first half, up in
the second). Math, computed in fp32 and stored in the input dtype:

    act = silu(gate); if limit > 0: act = min(act, limit); up = clamp(up, -limit, limit)
    out = act * up

This is *not* gpt-oss's swiglu (no alpha=1.702, no ``up + 1``): reusing that path silently changes
the model (known-issues.md). The kernel body here is shared with ROCm; ``kernels_rocm`` only passes
different launch configs, so there is exactly one implementation of the math on GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_cuda._common import LaunchConfig, check_swiglu_args, launch_kwargs, next_pow2


@triton.jit
def _swiglu_clamp_kernel(
    gu_ptr,
    out_ptr,
    T,
    inter,
    stride_gu_t,
    stride_out_t,
    limit,
    HAS_LIMIT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_i = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows[:, None] < T) & (cols[None, :] < inter)
    # int64 row offsets: T * 2I overflows int32 for long prefills with wide dense FFNs
    # (8192 tokens * 2 * 11264 is fine, but 256K-token chunked prefill is not).
    row_off = rows.to(tl.int64)[:, None]
    g_ptrs = gu_ptr + row_off * stride_gu_t + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
    act = g / (1.0 + tl.exp(-g))  # silu; spelled out, see kernels_cuda._common on builtins-only
    if HAS_LIMIT:
        # Clamp silu from above only (silu is bounded below by ~-0.28 anyway), up on both sides.
        act = tl.minimum(act, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
    out = act * u
    tl.store(out_ptr + row_off * stride_out_t + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def nvidia_config(num_tokens: int, inter: int) -> LaunchConfig:
    """Launch config for NVIDIA (32-thread warps).

    Pure streaming op: the goal is enough bytes in flight per SM. Wide tiles along I keep loads
    coalesced (I=1280 per expert, 11264 dense); with few tokens we use a 1-row tile so a decode
    batch still spreads over many programs, with many tokens we stack rows so each program moves
    ~16-32 KiB and the grid does not explode to T*I/BLOCK tiny programs.
    """
    block_i = min(next_pow2(inter), 1024)
    if num_tokens <= 16:
        block_t = 1
    elif num_tokens <= 512:
        block_t = 2
    else:
        block_t = 4
    elems = block_t * block_i
    num_warps = 8 if elems >= 4096 else (4 if elems >= 1024 else 2)
    # No K-loop in this kernel, so software pipelining has nothing to overlap: 1 stage saves smem.
    return LaunchConfig(block_t=block_t, block_n=block_i, num_warps=num_warps, num_stages=1)


def swiglu_clamp(gate_up: torch.Tensor, limit: float | None, *, config: LaunchConfig | None = None) -> torch.Tensor:
    """Launch the fused kernel. ``gate_up`` [T, 2I], last dim contiguous; returns [T, I]."""
    num_tokens, inter = check_swiglu_args(gate_up, limit)
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0 or inter == 0:
        return out
    cfg = config or nvidia_config(num_tokens, inter)
    has_limit = limit is not None and limit > 0
    grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(inter, cfg.block_n))
    _swiglu_clamp_kernel[grid](
        gate_up,
        out,
        num_tokens,
        inter,
        gate_up.stride(0),
        out.stride(0),
        float(limit) if has_limit else 0.0,
        HAS_LIMIT=has_limit,
        BLOCK_T=cfg.block_t,
        BLOCK_I=cfg.block_n,
        **launch_kwargs(cfg),
    )
    return out

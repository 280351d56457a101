"""Head-wise sigmoid attention gate for Step-3.5 (``use_head_wise_attn_gate``).

``attn_out`` [T, H*D] is the attention output before o_proj, ``gate_logits`` [T, H] comes from
``g_proj`` (one scalar per query head). out[t, h*D:(h+1)*D] = attn_out[t, h*D:(h+1)*D] *
sigmoid(gate_logits[t, h]). Fusing it avoids materialising sigmoid(g) and a broadcast multiply,
i.e. one read + one write of the attention output instead of three passes.
Both inputs may be row-strided views (e.g. g sliced from a merged projection); the last dim must be
contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_cuda._common import LaunchConfig, check_head_gate_args, launch_kwargs, next_pow2


@triton.jit
def _head_gate_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    T,
    N,  # H * D
    stride_x_t,
    stride_g_t,
    stride_out_t,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < T) & (cols[None, :] < N)
    row_off = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + row_off * stride_x_t + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Gather the per-head logit for every column; repeated addresses within a head hit L1/L2,
    # so the gate tensor is read from DRAM once (it is only 1/D of the traffic anyway).
    heads = cols // HEAD_DIM
    g = tl.load(g_ptr + row_off * stride_g_t + heads[None, :], mask=mask, other=0.0).to(tl.float32)
    out = x / (1.0 + tl.exp(-g))  # x * sigmoid(g), builtins only (kernels_cuda._common)
    tl.store(out_ptr + row_off * stride_out_t + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def nvidia_config(num_tokens: int, width: int) -> LaunchConfig:
    """NVIDIA launch config. width = H*D (8192 for 64x128 full layers, 12288 for 96x128 sliding)."""
    block_n = min(next_pow2(width), 2048)
    block_t = 1 if num_tokens <= 32 else 2
    elems = block_t * block_n
    num_warps = 8 if elems >= 4096 else (4 if elems >= 1024 else 2)
    return LaunchConfig(block_t=block_t, block_n=block_n, num_warps=num_warps, num_stages=1)


def head_gate(
    attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int, *, config: LaunchConfig | None = None
) -> torch.Tensor:
    """Launch the fused gate. Returns a new [T, H*D] tensor in ``attn_out``'s dtype."""
    check_head_gate_args(attn_out, gate_logits, num_heads)
    if attn_out.stride(-1) != 1:
        attn_out = attn_out.contiguous()
    if gate_logits.stride(-1) != 1:
        gate_logits = gate_logits.contiguous()
    num_tokens, width = attn_out.shape
    out = torch.empty_like(attn_out, memory_format=torch.contiguous_format)
    if num_tokens == 0:
        return out
    cfg = config or nvidia_config(num_tokens, width)
    grid = (triton.cdiv(num_tokens, cfg.block_t), triton.cdiv(width, cfg.block_n))
    _head_gate_kernel[grid](
        attn_out,
        gate_logits,
        out,
        num_tokens,
        width,
        attn_out.stride(0),
        gate_logits.stride(0),
        out.stride(0),
        HEAD_DIM=width // num_heads,
        BLOCK_T=cfg.block_t,
        BLOCK_N=cfg.block_n,
        **launch_kwargs(cfg),
    )
    return out


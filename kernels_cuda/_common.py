"""Launch-config plumbing and argument checks shared by the NVIDIA and ROCm kernel entry points
and by the torch references in ``sglang_step35.ops``.

The Triton kernel bodies live once, in ``kernels_cuda``; what differs per vendor is only how they
are launched (tile sizes, warps vs 64-wide wavefronts, AMD's ``waves_per_eu`` occupancy hint).
A ``LaunchConfig`` carries exactly that, so ``kernels_rocm`` can reuse every kernel unchanged.

Builtins-only kernel bodies: the kernels avoid ``tl.sigmoid``/``tl.max``/``tl.min``/``tl.sum``/``tl.zeros``
because those are themselves ``@triton.jit`` functions, decorated once when ``triton.language`` is
first imported. If anything imported triton before ``TRITON_INTERPRET=1`` was set (any test that
imports sglang, for instance), the interpreter cannot call them ("Cannot call @triton.jit'd outside
of the scope of a kernel"), so interpreter tests of our kernels would depend on import order. We
write sigmoid as ``1 / (1 + exp(-x))`` (exactly ``tl.sigmoid``'s body) and reduce with
``tl.reduce(x, axis, tl.standard._elementwise_max / _elementwise_min / _sum_combine)``, which is
exactly what ``tl.max/min/sum`` expand to for fp32/int32 and what the interpreter maps to numpy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class LaunchConfig:
    block_t: int  # rows (tokens) per program
    block_n: int  # columns per program (intermediate / head*dim columns / experts)
    num_warps: int
    num_stages: int
    # Vendor-specific compiler hints passed straight to the launch (e.g. AMD ``waves_per_eu``).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("block_t", "block_n"):
            v = getattr(self, name)
            # tl.arange needs power-of-two extents.
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= 1, got {v}")
        if self.num_warps < 1 or self.num_stages < 1:
            raise ValueError("num_warps and num_stages must be >= 1")


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU tensors through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_kwargs(cfg: LaunchConfig) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kw.update(cfg.extra)
    return kw


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_head_gate_args(attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int) -> None:
    if attn_out.dim() != 2 or gate_logits.dim() != 2:
        raise ValueError("attn_out must be [T, H*D] and gate_logits [T, H]")
    if gate_logits.shape != (attn_out.shape[0], num_heads):
        raise ValueError(f"gate_logits shape {tuple(gate_logits.shape)} != (T={attn_out.shape[0]}, H={num_heads})")
    if num_heads < 1 or attn_out.shape[1] % num_heads:
        raise ValueError(f"attn_out width {attn_out.shape[1]} is not a multiple of num_heads={num_heads}")


def check_route_args(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [T, E], got {tuple(logits.shape)}")
    if logits.dtype != torch.float32:
        # Step-3.5 routes in fp32 (need_fp32_gate); bf16 logits would change near-tie selections.
        raise ValueError(f"router logits must be float32, got {logits.dtype}")
    num_tokens, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, E={num_experts}]")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"router bias must be [E={num_experts}], got {tuple(bias.shape)}")
    return num_tokens, num_experts


def check_swiglu_args(gate_up: torch.Tensor, limit: float | None) -> tuple[int, int]:
    if gate_up.dim() != 2 or gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up must be [T, 2I] (gate half, then up half), got {tuple(gate_up.shape)}")
    if limit is not None and limit < 0:
        raise ValueError(f"swiglu limit must be >= 0 (0/None = no clamp), got {limit}")
    return gate_up.shape[0], gate_up.shape[1] // 2

"""Step-3.5 Triton kernels on ROCm: the kernel bodies of ``kernels_cuda`` launched with AMD configs.

There is deliberately no second copy of any kernel: Triton compiles the same ``@triton.jit`` bodies
for AMDGPU, so only launch parameters (64-wide wavefronts, ``waves_per_eu``) live here, in
:mod:`kernels_rocm.configs`. :mod:`kernels_rocm.aiter_glue` reports what AITER can and cannot do
for Step-3.5 (notably: no clamped SwiGLU in its fused MoE).
"""

from __future__ import annotations

import torch

from kernels_cuda.head_gate import head_gate as _head_gate
from kernels_cuda.router import sigmoid_topk_route as _route
from kernels_cuda.swiglu_clamp import swiglu_clamp as _swiglu_clamp
from kernels_rocm import configs

__all__ = ["configs", "head_gate", "sigmoid_topk_route", "swiglu_clamp"]


def swiglu_clamp(gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
    cfg = configs.swiglu_clamp_config(gate_up.shape[0], gate_up.shape[-1] // 2)
    return _swiglu_clamp(gate_up, limit, config=cfg)


def head_gate(attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int) -> torch.Tensor:
    cfg = configs.head_gate_config(attn_out.shape[0], attn_out.shape[-1])
    return _head_gate(attn_out, gate_logits, num_heads, config=cfg)


def sigmoid_topk_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = configs.router_config(logits.shape[0], logits.shape[-1])
    return _route(logits, bias, top_k, scaling_factor, renormalize, config=cfg)

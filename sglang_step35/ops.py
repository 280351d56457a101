"""Step-3.5 elementwise/routing ops: plain-torch references and per-platform dispatch.

Three ops, each with a reference (``*_ref``, the spec the Triton kernels are tested against) and a
dispatching entry point:

- ``swiglu_clamp(gate_up, limit)``: SGLang's merged [T, 2I] gate_up -> [T, I];
  ``act = silu(gate)``, with limit > 0 ``act = min(act, limit)`` and ``up = clamp(up, -limit, limit)``;
  ``out = act * up``. fp32 math, input dtype out. Not gpt-oss's swiglu (no alpha, no +1).
- ``head_gate(attn_out, gate_logits, num_heads)``: each head's slice of [T, H*D] times sigmoid(g[t, h]).
- ``sigmoid_topk_route(logits_fp32, bias, top_k, scaling_factor, renormalize=True)``: select by
  sigmoid(logits) + bias, weight by the unbiased scores (renormalised, then scaled);
  returns (weights fp32 [T, k], ids int32 [T, k]); ties go to the lowest expert index.

Dispatch is by the tensor's device and the platform (``sglang_step35.platform``): device tensors on
NVIDIA -> ``kernels_cuda``, on AMD -> ``kernels_rocm`` (same Triton bodies, AMD launch configs),
anything else -> the torch reference. ``impl=`` forces one ("torch", "cuda", "rocm"): benchmarks use it for A/B runs and tests
use it to run the Triton path on CPU tensors under ``TRITON_INTERPRET=1``. The argument checks are
shared with the kernels (``kernels_cuda._common``), so importing this module imports triton, which
is harmless without a GPU; nothing is compiled until a Triton path runs.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kernels_cuda._common import check_head_gate_args, check_route_args, check_swiglu_args

Impl = Literal["torch", "cuda", "rocm"]


def backend_for(t: torch.Tensor) -> Impl:
    """Which implementation serves tensors on ``t``'s device (the platform's kernels for device
    tensors: ROCm builds of torch expose HIP devices as "cuda" too)."""
    if t.device.type == "cuda":
        from sglang_step35.platform import current_platform  # noqa: PLC0415 - cached after the first call

        return current_platform().kernel_impl
    return "torch"


def _kernels(impl: Impl | None, t: torch.Tensor):
    impl = impl or backend_for(t)
    if impl == "torch":
        return None
    if impl == "cuda":
        import kernels_cuda  # noqa: PLC0415 - kernel modules load on first GPU use

        return kernels_cuda
    if impl == "rocm":
        import kernels_rocm  # noqa: PLC0415

        return kernels_rocm
    raise ValueError(f"unknown impl {impl!r}; expected 'torch', 'cuda' or 'rocm'")


# --- references --------------------------------------------------------------------------------------
def swiglu_clamp_ref(gate_up: torch.Tensor, limit: float | None) -> torch.Tensor:
    check_swiglu_args(gate_up, limit)
    gate, up = gate_up.float().chunk(2, dim=-1)
    act = F.silu(gate)
    if limit is not None and limit > 0:
        act = act.clamp(max=limit)  # from above only
        up = up.clamp(-limit, limit)
    return (act * up).to(gate_up.dtype)


def head_gate_ref(attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int) -> torch.Tensor:
    check_head_gate_args(attn_out, gate_logits, num_heads)
    t, width = attn_out.shape
    x = attn_out.float().reshape(t, num_heads, width // num_heads)
    out = x * torch.sigmoid(gate_logits.float()).unsqueeze(-1)
    return out.reshape(t, width).to(attn_out.dtype)


def sigmoid_topk_route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_route_args(logits, bias, top_k)
    scores = torch.sigmoid(logits)
    sel = scores if bias is None else scores + bias.float()
    # A stable descending sort keeps equal keys in index order, i.e. ties go to the lowest expert
    # index, the documented tie-break the kernel implements too (torch.topk promises no order).
    ids = torch.sort(sel, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights * scaling_factor, ids.to(torch.int32)


# --- dispatching entry points ----------------------------------------------------------------------
def swiglu_clamp(gate_up: torch.Tensor, limit: float | None, *, impl: Impl | None = None) -> torch.Tensor:
    k = _kernels(impl, gate_up)
    return swiglu_clamp_ref(gate_up, limit) if k is None else k.swiglu_clamp(gate_up, limit)


def head_gate(
    attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int, *, impl: Impl | None = None
) -> torch.Tensor:
    k = _kernels(impl, attn_out)
    return head_gate_ref(attn_out, gate_logits, num_heads) if k is None else k.head_gate(attn_out, gate_logits, num_heads)


def sigmoid_topk_route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
    *,
    impl: Impl | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernels(impl, logits)
    if k is None:
        return sigmoid_topk_route_ref(logits, bias, top_k, scaling_factor, renormalize)
    return k.sigmoid_topk_route(logits, bias, top_k, scaling_factor, renormalize)

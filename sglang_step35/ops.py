"""Step-3.5 elementwise/routing ops: plain-torch references and per-platform dispatch.

Three ops, each with a reference (``*_ref``, the spec the Triton kernels are tested against) and a
dispatching entry point:

- ``swiglu_clamp(gate_up, limit)``: SGLang's merged [T, 2I] gate_up -> [T, I];
  ``act = silu(gate)``, with limit > 0 ``act = min(act, limit)`` and ``up = clamp(up, -limit, limit)``;
  ``out = act * up``. fp32 math, input dtype out. Not gpt-oss's swiglu (no alpha, no +1).
- ``head_gate(attn_out, gate_logits, num_heads)``: each head's slice of [T, H*D] times sigmoid(g[t, h]).
  ``inplace=True``: the caller hands ``attn_out`` over (the model's attention output, read by no one
  else); the torch path then writes the result into it (``head_gate_ref_``), same numbers.
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


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32: ``t`` itself when it is already (``Tensor.float()`` would return it too, but as
    one more aten op dispatched on every decode step: bench/ops_per_layer.py counts them)."""
    return t if t.dtype == torch.float32 else t.float()


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


def head_gate_ref_(attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``head_gate_ref`` written into ``attn_out`` (returned), bit for bit the same numbers in 3 ops
    fewer: an in-place multiply of a bf16/fp16 tensor by an fp32 one computes in fp32 (TensorIterator's
    common dtype) and rounds once to ``attn_out``'s dtype, so the two fp32 casts of the attention
    output and the cast back are not needed. The decode layer's CPU op count (bench/ops_per_layer.py)
    is then the built-in's, whose bf16 sigmoid this keeps in fp32."""
    check_head_gate_args(attn_out, gate_logits, num_heads)
    if attn_out.stride(-1) != 1:  # a [T, H, D] view needs a contiguous last dim
        attn_out = attn_out.contiguous()
    t, width = attn_out.shape
    heads = attn_out.view(t, num_heads, width // num_heads)
    heads.mul_(torch.sigmoid(as_fp32(gate_logits)).unsqueeze(-1))
    return attn_out


def sigmoid_topk_route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    scaling_factor: float,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    check_route_args(logits, bias, top_k)
    scores = torch.sigmoid(logits)
    sel = scores if bias is None else scores + as_fp32(bias)
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
    attn_out: torch.Tensor, gate_logits: torch.Tensor, num_heads: int, *, impl: Impl | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """The gated attention output. ``inplace``: ``attn_out`` is the caller's to give up; read the
    result from the return value only (the torch path reuses ``attn_out``'s memory, the kernels,
    one fused pass either way, write a new tensor)."""
    k = _kernels(impl, attn_out)
    if k is None:
        return (head_gate_ref_ if inplace else head_gate_ref)(attn_out, gate_logits, num_heads)
    return k.head_gate(attn_out, gate_logits, num_heads)


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

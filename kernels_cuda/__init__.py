"""Step-3.5 Triton kernels, NVIDIA launch configs (the kernel bodies are shared with ROCm).

Entry points (each takes an optional ``config=LaunchConfig`` to override the NVIDIA heuristics;
``kernels_rocm`` uses exactly that to launch the same bodies with AMD configs):

- ``swiglu_clamp(gate_up, limit)``             [T, 2I] -> [T, I]
- ``head_gate(attn_out, gate_logits, num_heads)`` [T, H*D], [T, H] -> [T, H*D]
- ``sigmoid_topk_route(logits, bias, top_k, scaling_factor, renormalize=True)``
                                               -> (weights fp32 [T, k], ids int32 [T, k])

Importing this package imports triton (a torch dependency on Linux; it imports fine without a GPU).
The functions are re-exported eagerly on purpose: the submodules share the functions' names, and a
lazy ``__getattr__`` would be shadowed by the submodule attribute once anything imported it.
"""

from __future__ import annotations

from kernels_cuda._common import LaunchConfig
from kernels_cuda.head_gate import head_gate
from kernels_cuda.router import sigmoid_topk_route
from kernels_cuda.swiglu_clamp import swiglu_clamp

__all__ = ["LaunchConfig", "head_gate", "sigmoid_topk_route", "swiglu_clamp"]

"""Could SGLang's own TopK replace our router? What each path it would take for Step-3.5 computes.

The candidate is the configuration SGLang's built-in Step-3.5 uses (sglang/srt/models/step3p5.py),
with the scale folded in so it is applied once: ``TopK(top_k=8, renormalize=True,
use_grouped_topk=False, scoring_func="sigmoid", correction_bias=router_bias,
routed_scaling_factor=s, apply_routed_scaling_factor_on_output=True)``. Its routing runs in
``select_experts`` (sglang/srt/layers/moe/topk.py), driven here directly with that TopKConfig:

* CUDA / ROCm (``TopK.forward_cuda``): ``biased_topk_jit_kernel_impl`` -> ``moe_fused_gate``'s
  Triton ``_router_triton_kernel`` (288 experts / top-8 is not the radix kernel's 896 / top-16).
  Run under TRITON_INTERPRET=1 it is Step's rule: same ids in the same order, ties included.
* ``TopK.forward_native`` (what ``_torch_compile_forward`` picks for 1-token batches under
  --enable-torch-compile): ``fused_topk_torch_native``, ``torch.topk(sorted=False)``, which does
  not break ties towards the lowest expert index as our router does.
* SGLang's CPU engine (``TopK.forward_cpu``; plugin.register() turns it on for GPU-less hosts):
  ``fused_topk`` calls ``topk_sigmoid``, imported only on CUDA/HIP/XPU -> NameError (with AMX,
  ``fused_topk_cpu`` instead rejects ``apply_routed_scaling_factor_on_output``).

So the swap is not made; these tests pin the differences the comment at ``Step35MoE._route``
cites, and fail when SGLang changes them (time to revisit the swap).
"""

from __future__ import annotations

import pytest
import torch

import gpu_contract
from sglang_step35 import ops

E, K, SCALE = 288, 8, 2.5  # Step-3.5-Flash's router shape; the tiny config's scaling factor


@pytest.fixture(scope="module")
def topk_mod():
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    from sglang_step35.plugin import register

    register()  # the sgl_kernel stand-in SGLang's CPU engine imports
    from sglang.srt.layers.moe import topk

    language = gpu_contract.interpreted_triton_language()
    language.__enter__()
    gpu_contract.ensure_interpreted("sglang.kernels.ops.moe.moe_fused_gate", "_router_triton_kernel")
    gpu_contract.ensure_interpreted("kernels_cuda.router", "_sigmoid_topk_kernel")
    import sglang.kernels.ops.moe.moe_fused_gate as gate

    # The PDL probe asks the CUDA driver for the arch; no PDL is what a pre-Hopper GPU or ROCm runs.
    mp.setattr(gate, "is_arch_support_pdl", lambda: False)
    yield topk
    language.__exit__(None, None, None)
    mp.undo()


def _config(topk, bias):
    return topk.TopKConfig(
        top_k=K, renormalize=True, scoring_func="sigmoid", correction_bias=bias,
        routed_scaling_factor=SCALE, apply_routed_scaling_factor_on_output=True, layer_id=0,
    )


def _route(topk, logits, bias, *, torch_native=False):
    cfg = _config(topk, bias)
    cfg.torch_native = torch_native
    out = topk.select_experts(torch.zeros(logits.shape[0], 8), logits, cfg, layer_id=0)
    return out.topk_weights, out.topk_ids


def _logits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, E, generator=g) * 2
    logits[-1] = 0.0  # a row of 288-way ties: only a tie-break rule decides it
    logits[-2, 100:] = logits[-2, 3]  # ties straddling the top-8 boundary
    return logits


def test_cuda_path_is_steps_rule(topk_mod, monkeypatch):
    """SGLang's GPU route for this config (the Triton gate, not a torch fallback) gives our
    reference's ids, in its order (biased score descending, lowest index on ties), and its
    weights to fp32 rounding: sigmoid, renormalisation and the one scale all in fp32."""
    import sglang.kernels.ops.moe.moe_fused_gate as gate

    calls = []
    real = gate.moe_fused_gate
    monkeypatch.setattr(gate, "moe_fused_gate", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    monkeypatch.setattr(topk_mod, "_is_cpu", False)  # select_experts' GPU branch (the JIT gate)
    logits = _logits(6, seed=0)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.1
    w, ids = _route(topk_mod, logits, bias)
    assert len(calls) == 1 and calls[0]["apply_routed_scaling_factor_on_output"], "the scale folded in the gate"
    ref_w, ref_ids = ops.sigmoid_topk_route_ref(logits, bias, K, SCALE)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, atol=1e-6, rtol=1e-6)


def test_native_path_breaks_ties_by_another_rule(topk_mod):
    """forward_native's torch.topk picks other experts than ours among tied scores (bf16-rounded
    logits with a zero bias: need_fp32_gate / use_moe_router_bias off), so the routed experts
    differ; the selected values are the same multiset (it is only the tie-break)."""
    logits = (torch.randn(256, E, generator=torch.Generator().manual_seed(2)) * 2).bfloat16().float()
    bias = torch.zeros(E)
    w, ids = _route(topk_mod, logits, bias, torch_native=True)
    ref_w, ref_ids = ops.sigmoid_topk_route_ref(logits, bias, K, SCALE)
    torch.testing.assert_close(w.sort(-1).values, ref_w.sort(-1).values, atol=1e-6, rtol=1e-6)
    differs = (ids.long().sort(-1).values != ref_ids.long().sort(-1).values).any(-1)
    assert differs.any(), "torch.topk now breaks ties like our router: revisit the swap"
    # Ours breaks them to the lowest index on both implementations (reference and Triton).
    got_w, got_ids = ops.sigmoid_topk_route(logits[:4], bias, K, SCALE, impl="cuda")
    assert torch.equal(got_ids, ref_ids[:4])


def test_cpu_engine_path_fails(topk_mod):
    """SGLang's CPU engine (forward_cpu) has no sigmoid top-k for this config: without AMX the
    generic fused_topk calls a `topk_sigmoid` that is imported only on CUDA/HIP/XPU; with AMX
    fused_topk_cpu refuses apply_routed_scaling_factor_on_output."""
    assert topk_mod._is_cpu, "conftest runs SGLang as its CPU engine"
    logits = _logits(3, seed=3)
    if topk_mod._is_cpu_amx_available:
        with pytest.raises(ValueError, match="apply_routed_scaling_factor_on_output"):
            _route(topk_mod, logits, torch.zeros(E))
    else:
        with pytest.raises(NameError, match="topk_sigmoid"):
            _route(topk_mod, logits, torch.zeros(E))

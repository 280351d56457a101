"""Ops per decoder layer (issue 26 item 5): our layer spends no more aten ops per decode token than
SGLang's built-in step3p5 layer, with our numerics.

- The head gate's in-place torch path (`ops.head_gate(..., inplace=True)`, what the model calls) is
  bit for bit the fp32 reference formula (`ops.head_gate_ref`: fp32 sigmoid and product, one rounding
  to the input's dtype) for bf16, fp16 and fp32, row-strided and empty inputs, and writes into the
  attention output instead of allocating.
- bench/ops_per_layer.py's count (torch.profiler, one decode token through the second of two layers
  of a kind, ours vs the built-in) at a narrow width: total ours <= built-in for the dense and the MoE
  layer (ops that do work: the MoE layer's too, the dense one's plus the gate logits' fp32 cast), both
  residual-stream norms on SGLang's fused path. The counts do not depend on the width;
  `make bench-ops` measures at Flash width (bench/RESULTS.md).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import gpu_contract
from sglang_step35 import ops

ROOT = Path(__file__).resolve().parents[1]
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("gate_fp32", [False, True])
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 64, 128), (7, 96, 128), (33, 3, 5), (0, 4, 8)])
def test_inplace_head_gate_is_the_fp32_reference_bit_for_bit(dtype, gate_fp32, tokens, heads, head_dim):
    g = torch.Generator().manual_seed(tokens * 131 + heads)
    # Wide-ranged values so that fp32-vs-low-precision intermediate rounding would show.
    x = (torch.randn(tokens, heads * head_dim, generator=g) * 10).to(dtype)
    logits = (torch.randn(tokens, heads + 3, generator=g) * 8).to(torch.float32 if gate_fp32 else dtype)
    gate = logits[:, 1 : 1 + heads]  # row-strided, as a slice of a wider projection
    want = ops.head_gate_ref(x, gate, heads)
    given = x.clone()
    out = ops.head_gate(given, gate, heads, impl="torch", inplace=True)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.equal(out.view(BITS[dtype]), want.view(BITS[dtype]))
    assert out.data_ptr() == given.data_ptr()  # written into the attention output, nothing allocated


def test_inplace_head_gate_on_a_row_strided_attention_output():
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(5, 4 * 16 + 7, generator=g).to(torch.bfloat16)
    x = wide[:, :64]
    gate = torch.randn(5, 4, generator=g).to(torch.bfloat16)
    want = ops.head_gate_ref(x, gate, 4)
    out = ops.head_gate(x, gate, 4, impl="torch", inplace=True)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16))


def test_plain_head_gate_leaves_its_input_alone():
    x = torch.randn(3, 8).to(torch.bfloat16)
    before = x.clone()
    ops.head_gate(x, torch.randn(3, 2).to(torch.bfloat16), 2, impl="torch")
    assert torch.equal(x, before)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_ops_per_layer", ROOT / "bench" / "ops_per_layer.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def counts(bench):
    gpu_contract.sglang_world_of_one()
    import sglang.srt.layers.moe.topk as sglang_topk

    # Flash's heads, rope and layer layout; narrow hidden and FFN widths, 8 experts.
    cfg = bench.flash_config(8, hidden_size=256, intermediate_size=384, moe_intermediate_size=64,
                             share_expert_dim=64)
    mp = pytest.MonkeyPatch()
    if not hasattr(sglang_topk, "topk_sigmoid"):  # the built-in's router op is CUDA/HIP/XPU-only
        mp.setattr(sglang_topk, "topk_sigmoid", bench.cpu_topk_sigmoid(), raising=False)
    try:
        return {kind: {which: bench.count(bench.build(which, cfg, layers, torch.bfloat16), cfg.hidden_size,
                                          torch.bfloat16)
                       for which in ("ours", "builtin")}
                for kind, layers in bench.KINDS.items()}
    finally:
        mp.undo()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_our_layer_spends_no_more_ops_than_the_builtin(counts, kind):
    ours, builtin = counts[kind]["ours"], counts[kind]["builtin"]
    assert ours["total"] <= builtin["total"], (ours["ops_by_region"], builtin["ops_by_region"])
    assert ours["attention"] <= builtin["attention"], (ours["ops_by_region"]["attention"],
                                                       builtin["ops_by_region"]["attention"])
    # Ops that do work (views left out): at most one more, the fp32 cast of the gate logits (the
    # built-in's sigmoid runs in bf16; ours keeps fp32 numerics). The MoE block makes up for it.
    spare = {"dense": 1, "moe": 0}[kind]
    assert ours["total_data_ops"] <= builtin["total_data_ops"] + spare, (ours["ops_by_region"], builtin["ops_by_region"])
    assert ours["boundary"] == builtin["boundary"]  # both SGLang's fused add + RMSNorm
    assert ours["norms_with_residual"] == 2 and ours["norms_without_residual"] == 0

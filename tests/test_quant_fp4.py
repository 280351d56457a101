"""FP4 formats' math and exports, checked against independent decodes from the public specs.

- E2M1 (OCP MX spec v1.0 5.3.3): each code decoded from its bits (sign, 2-bit exponent with bias 1,
  1-bit mantissa; exponent 0 is subnormal), not from the module's table; packing low nibble first.
- NVFP4 (ModelOpt): value = e2m1 * E4M3 block scale (per 16) * fp32 global scale, decoded here by
  explicit loops over blocks; MXFP4 (OCP / Quark): value = e2m1 * 2^(E8M0 - 127) per 32.
- Writers: real tensor names, dtypes and shapes; fused siblings share NVFP4's global scale; MTP
  layers, routers, lm_head stay BF16; the configs name what they quantize.
- Dequantizers: any tensor order, named problems for missing or mis-shaped parts.
"""

from __future__ import annotations

import random

import pytest
import torch

from sglang_step35.quant import e2m1, mxfp4, nvfp4
from sglang_step35.tiny import TinySpec, tiny_config, tiny_weights


def _e2m1_from_bits(code: int) -> float:
    sign = -1.0 if code & 0b1000 else 1.0
    exp, man = (code >> 1) & 0b11, code & 0b1
    mag = man * 0.5 if exp == 0 else 2.0 ** (exp - 1) * (1 + man / 2)
    return sign * mag


def _unpack_bytes(packed: torch.Tensor) -> list[list[int]]:
    rows = []
    for row in packed.reshape(-1, packed.shape[-1]).tolist():
        codes = []
        for byte in row:
            codes += [byte & 0xF, byte >> 4]
        rows.append(codes)
    return rows


def test_e2m1_decode_matches_the_bit_layout_and_packs_low_nibble_first():
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1.decode(codes).tolist() == [_e2m1_from_bits(c) for c in range(16)]
    # 1.0 is code 2, -6.0 is code 15: element 0 in the low nibble -> 0xF2.
    assert e2m1.pack(e2m1.encode(torch.tensor([1.0, -6.0]))).tolist() == [0xF2]
    x = torch.tensor([0.3, 0.74, 0.76, 2.4, 2.6, 5.1, 7.0, -0.1, -1.3])
    got = e2m1.decode(e2m1.encode(x)).tolist()
    assert got == [0.5, 0.5, 1.0, 2.0, 3.0, 6.0, 6.0, -0.0, -1.5]
    # Exact ties go to the even code (round half to even on the mantissa bit).
    assert e2m1.decode(e2m1.encode(torch.tensor([0.25, 1.25, 2.5, 5.0]))).tolist() == [0.0, 1.0, 2.0, 4.0]
    assert torch.equal(e2m1.unpack(e2m1.pack(codes.repeat(2))), codes.repeat(2))


def _nvfp4_reference(packed, block_scale, scale_2) -> torch.Tensor:
    """Loop decode: row r, element j -> e2m1(code) * block_scale[r, j // 16] * scale_2."""
    rows = _unpack_bytes(packed)
    bs = block_scale.float().reshape(len(rows), -1).tolist()
    out = [[_e2m1_from_bits(c) * bs[r][j // 16] * float(scale_2) for j, c in enumerate(row)]
           for r, row in enumerate(rows)]
    return torch.tensor(out).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def test_nvfp4_quantize_decodes_as_the_spec_says_and_stays_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.logspace(-2, 1, 24).unsqueeze(1)
    s2 = nvfp4.global_scale(w.abs().amax())
    q, bs = nvfp4.quantize(w, s2)
    assert q.dtype == torch.uint8 and q.shape == (24, 32)
    assert bs.dtype == torch.float8_e4m3fn and bs.shape == (24, 4)
    assert float(s2) == pytest.approx(float(w.abs().amax()) / (6 * 448), rel=1e-6)
    deq = nvfp4.dequantize(q, bs, s2)
    assert torch.equal(deq, _nvfp4_reference(q, bs, s2))
    # Error bound: half the widest E2M1 gap (1 of 6) of the block's scale, which is amax/6 up to
    # E4M3 rounding (< 1/16).
    block_amax = w.reshape(24, 4, 16).abs().amax(-1, keepdim=True)
    err = (deq - w).abs().reshape(24, 4, 16)
    assert torch.all(err <= block_amax / 6 * (1 + 1 / 16) + 1e-12)
    # Values already on the grid come back (up to the fp32 rounding of scale products).
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 2).repeat(2, 1) * 0.125
    q2, bs2 = nvfp4.quantize(grid, nvfp4.global_scale(grid.abs().amax()))
    assert torch.allclose(nvfp4.dequantize(q2, bs2, nvfp4.global_scale(grid.abs().amax())), grid, rtol=1e-6, atol=0)


def test_nvfp4_stacked_experts_have_one_global_scale_each():
    w = torch.randn(3, 8, 32) * torch.tensor([0.1, 1.0, 10.0]).reshape(3, 1, 1)
    s2 = nvfp4.global_scale(w.abs().amax(dim=(-2, -1)))
    q, bs = nvfp4.quantize(w, s2)
    deq = nvfp4.dequantize(q, bs, s2)
    for e in range(3):
        assert torch.equal(deq[e], _nvfp4_reference(q[e], bs[e], s2[e]))
    with pytest.raises(ValueError, match=r"weight_scale_2 shape \[2\]"):
        nvfp4.dequantize(q, bs, s2[:2])
    with pytest.raises(ValueError, match=r"weight_scale shape \[3, 8, 4\] .*expected \[3, 8, 2\]"):
        nvfp4.dequantize(q, torch.cat([bs, bs], -1), s2)


def test_mxfp4_quantize_decodes_as_the_spec_says():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2, 6, 64, generator=g) * 3
    q, s = mxfp4.quantize(w)
    assert q.dtype == torch.uint8 and q.shape == (2, 6, 32) and s.dtype == torch.uint8 and s.shape == (2, 6, 2)
    codes = _unpack_bytes(q)
    exps = s.reshape(12, 2).tolist()
    ref = torch.tensor([[_e2m1_from_bits(c) * 2.0 ** (exps[r][j // 32] - 127) for j, c in enumerate(row)]
                        for r, row in enumerate(codes)]).reshape(2, 6, 64)
    deq = mxfp4.dequantize(q, s)
    assert torch.equal(deq, ref)
    # The shared exponent is the smallest power of two that brings the block's amax to <= 6.
    amax = w.reshape(2, 6, 2, 32).abs().amax(-1)
    scale = torch.exp2(s.float() - 127)
    assert torch.all(amax / scale <= 6) and torch.all(amax / (scale / 2) > 6)
    assert torch.all((deq - w).abs().reshape(2, 6, 2, 32) <= scale.unsqueeze(-1))  # half a gap of 2
    with pytest.raises(ValueError, match="expected uint8"):
        mxfp4.dequantize(q, s.float())


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(TinySpec(), 1024, {"<|endoftext|>": 0, "<|im_end|>": 1})
    return cfg, tiny_weights(cfg, seed=3, std=0.1)


def test_nvfp4_export_names_shapes_and_shared_global_scales(tiny):
    cfg, w = tiny
    out, extra = nvfp4.write_checkpoint_tensors(w, cfg, "nvfp4")
    p = "model.layers.3."
    assert out[p + "moe.gate_proj.weight"].shape == (8, 32, 32) and out[p + "moe.gate_proj.weight"].dtype == torch.uint8
    assert out[p + "moe.down_proj.weight_scale"].shape == (8, 64, 2)
    assert out[p + "moe.gate_proj.weight_scale_2"].shape == (8,) and out[p + "moe.up_proj.input_scale"].shape == (8,)
    assert out[p + "self_attn.q_proj.weight_scale_2"].shape == ()
    assert out[p + "self_attn.g_proj.weight"].dtype == torch.uint8  # g_proj is quantized in ModelOpt exports
    # q/k/v and gate/up (per expert) share a global scale: the fused GEMM has one.
    for a, b in [("self_attn.q_proj", "self_attn.v_proj"), ("moe.gate_proj", "moe.up_proj"),
                 ("share_expert.gate_proj", "share_expert.up_proj")]:
        assert torch.equal(out[p + a + ".weight_scale_2"], out[p + b + ".weight_scale_2"])
    assert not torch.equal(out[p + "moe.gate_proj.weight_scale_2"], out[p + "moe.down_proj.weight_scale_2"])
    kept = ["model.layers.3.moe.gate.weight", "model.layers.3.moe.router_bias", "lm_head.weight",
            "model.layers.5.self_attn.q_proj.weight", "model.layers.6.mlp.down_proj.weight",
            "model.layers.7.eh_proj.weight", "model.embed_tokens.weight"]
    for k in kept:
        assert torch.equal(out[k], w[k]), k
    qc, side = extra["quantization_config"], extra["files"]["hf_quant_config.json"]
    assert qc["quant_method"] == "modelopt" and qc["quant_algo"] == "NVFP4" and qc["group_size"] == 16
    assert qc["ignore"] == ["lm_head", "model.layers.*.moe.gate", "model.layers.5.*", "model.layers.6.*",
                            "model.layers.7.*"]
    assert side["quantization"]["exclude_modules"] == qc["ignore"]
    assert nvfp4.matches(qc) and nvfp4.matches(side) and not mxfp4.matches(qc)


def test_modelopt_mixed_export_lists_checkpoint_modules(tiny):
    cfg, w = tiny
    out, extra = nvfp4.write_checkpoint_tensors(w, cfg, "modelopt-mixed")
    layers = extra["quantization_config"]["quantized_layers"]
    assert layers["model.layers.3.moe.gate_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["model.layers.0.self_attn.q_proj"] == {"quant_algo": "FP8"}
    assert layers["model.layers.1.self_attn.q_proj"]["quant_algo"] == "NVFP4"
    assert layers["model.layers.3.share_expert.down_proj"] == {"quant_algo": "FP8"}
    for absent in ["model.layers.0.mlp.gate_proj", "model.layers.2.self_attn.o_proj",
                   "model.layers.2.self_attn.g_proj", "model.layers.3.moe.gate", "lm_head", "model.layers.5.self_attn.q_proj"]:
        assert absent not in layers
        assert torch.equal(out[absent + ".weight"], w[absent + ".weight"])
    assert out["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.self_attn.q_proj.weight_scale"].shape == ()
    assert "model.layers.0.self_attn.q_proj.weight_scale_2" not in out
    assert out["model.layers.4.moe.down_proj.weight"].dtype == torch.uint8
    assert set(layers) == {k.removesuffix(".weight") for k, t in out.items()
                           if k.endswith(".weight") and t.dtype in (torch.uint8, torch.float8_e4m3fn)}
    assert nvfp4.matches(extra["quantization_config"]) and nvfp4.matches(extra["files"]["hf_quant_config.json"])
    fp8_only = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                "quantized_layers": {"a": {"quant_algo": "FP8"}}}
    assert not nvfp4.matches(fp8_only)  # SGLang sends that to another method (w4afp8)


def test_mxfp4_export_names_and_quark_config(tiny):
    cfg, w = tiny
    out, extra = mxfp4.write_checkpoint_tensors(w, cfg, "mxfp4")
    p = "model.layers.4."
    assert out[p + "moe.up_proj.weight"].shape == (8, 32, 32) and out[p + "moe.up_proj.weight_scale"].shape == (8, 32, 2)
    assert out[p + "share_expert.down_proj.weight_scale"].dtype == torch.uint8
    for k in ["model.layers.4.self_attn.g_proj.weight", "model.layers.4.moe.gate.weight", "lm_head.weight",
              "model.layers.5.self_attn.q_proj.weight", "model.layers.7.shared_head.output.weight"]:
        assert torch.equal(out[k], w[k]), k
    qc = extra["quantization_config"]
    assert mxfp4.matches(qc) and not nvfp4.matches(qc)
    ex = qc["exclude"]
    assert "lm_head" in ex and "model.layers.4.self_attn.g_proj" in ex and "model.layers.4.moe.gate" in ex
    assert "model.layers.5.self_attn.q_proj" in ex and "model.layers.7.eh_proj" in ex
    assert not any(e.startswith("model.layers.4.self_attn.q_proj") for e in ex)


@pytest.mark.parametrize("fmt,name", [(nvfp4, "nvfp4"), (nvfp4, "modelopt-mixed"), (mxfp4, "mxfp4")])
def test_dequantizer_restores_every_weight_in_any_order(tiny, fmt, name):
    cfg, w = tiny
    out, extra = fmt.write_checkpoint_tensors(w, cfg, name)
    items = list(out.items())
    random.Random(7).shuffle(items)
    dq = fmt.Dequantizer(extra["quantization_config"])
    got = {}
    for k, t in items:
        for kk, tt in dq.feed(k, t):
            assert kk not in got
            got[kk] = tt
    assert dq.problems() == []
    assert set(got) == set(w)
    for k, t in w.items():
        if k in out and out[k].dtype == t.dtype:
            assert torch.equal(got[k], t), k
        else:  # quantized: within half an E2M1 gap (1) of a block scale that is at most amax / 3
            err = (got[k] - t.float()).abs().max() / t.float().abs().max()
            assert got[k].dtype == torch.float32 and err <= 1 / 3, (k, float(err))  # half a gap of a scale <= amax/3


def test_dequantizers_name_missing_and_misshaped_parts(tiny):
    cfg, w = tiny
    out, extra = nvfp4.write_checkpoint_tensors(w, cfg, "nvfp4")
    dq = nvfp4.Dequantizer(extra["quantization_config"])
    p = "model.layers.3.moe."
    dq.feed(p + "gate_proj.weight", out[p + "gate_proj.weight"])
    dq.feed(p + "gate_proj.weight_scale", out[p + "gate_proj.weight_scale"])
    assert dq.feed(p + "up_proj.weight_scale_2", out[p + "up_proj.weight_scale_2"]) == []
    dq.feed(p + "down_proj.weight", out[p + "down_proj.weight"])
    dq.feed(p + "down_proj.weight_scale", out[p + "down_proj.weight_scale"][..., :1])
    assert dq.feed(p + "down_proj.weight_scale_2", out[p + "down_proj.weight_scale_2"]) == []
    probs = dq.problems()
    assert f"{p}gate_proj.weight: quantized weight without {p}gate_proj.weight_scale_2" in probs
    assert f"{p}up_proj: weight_scale_2 without its quantized weight" in probs
    assert any(s.startswith(f"{p}down_proj.weight: weight_scale shape [8, 64, 1]") for s in probs)

    out, extra = mxfp4.write_checkpoint_tensors(w, cfg, "mxfp4")
    dq = mxfp4.Dequantizer(extra["quantization_config"])
    q = "model.layers.0.self_attn.q_proj"
    dq.feed(q + ".weight", out[q + ".weight"])
    dq.feed("model.layers.0.self_attn.k_proj.weight_scale", out["model.layers.0.self_attn.k_proj.weight_scale"])
    assert dq.problems() == [f"{q}.weight: MXFP4 weight without {q}.weight_scale",
                             "model.layers.0.self_attn.k_proj.weight_scale: scale without its MXFP4 weight"]


@pytest.mark.parametrize("fmt,name", [(nvfp4, "nvfp4"), (nvfp4, "modelopt-mixed"), (mxfp4, "mxfp4")])
def test_checkpoint_shape_states_every_written_tensor(tiny, fmt, name):
    """What the loader checks a tensor against (None only where the leaf alone cannot tell: the
    weight and weight_scale of a MIXED_PRECISION module, FP8 or NVFP4)."""
    cfg, w = tiny
    out, extra = fmt.write_checkpoint_tensors(w, cfg, name)
    qc = extra["quantization_config"]
    checked = 0
    for k, t in out.items():
        if k in w and t.dtype == w[k].dtype:
            continue  # kept BF16
        module, leaf = k.rsplit(".", 1)
        want = fmt.checkpoint_shape(leaf, tuple(w[module + ".weight"].shape), qc)
        if want is None:
            assert name == "modelopt-mixed" and leaf in ("weight", "weight_scale"), k
            continue
        assert tuple(t.shape) == want, k
        checked += 1
    assert checked > 50


def test_sglangs_own_fp4_readers_read_our_tensors_as_we_do():
    """SGLang's reference dequantizers (what its load-time conversions use) decode our exports to the
    same numbers: `dequantize_nvfp4` (ModelOpt / Quark NVFP4, low nibble first) and the Quark MXFP4
    linear's `_dequant_mxfp4_to_bf16`."""
    from sglang.srt.layers.quantization.dequantization import dequantize_nvfp4
    from sglang.srt.layers.quantization.quark.schemes.quark_w4a4_mxfp4 import _dequant_mxfp4_to_bf16

    g = torch.Generator().manual_seed(5)
    w = torch.randn(4, 16, 64, generator=g)
    s2 = nvfp4.global_scale(w.abs().amax(dim=(-2, -1)))
    q, bs = nvfp4.quantize(w, s2)
    theirs = dequantize_nvfp4(q, bs, s2.reshape(4, 1, 1), out_dtype=torch.float32)
    # Same numbers up to one fp32 rounding: SGLang rounds block * global scale first, we round once
    # (e2m1 * E4M3 block scale is exact in fp32).
    assert torch.allclose(theirs, nvfp4.dequantize(q, bs, s2), rtol=2e-7, atol=0)
    qm, sm = mxfp4.quantize(w[0])
    assert torch.equal(_dequant_mxfp4_to_bf16(qm, sm), mxfp4.dequantize(qm, sm).to(torch.bfloat16))

"""The quantized-format registry (sglang_step35.quant) and `step35 tiny --quant`: every registered
format writes a tiny checkpoint in its own tensor names and config, which the registry recognises
again, and whose CPU Dequantizer gives back the weights the format means (SGLang-free, no server)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sglang_step35 import fp8, quant
from sglang_step35.cli import main as step35_main
from sglang_step35.quant import int8
from sglang_step35.tiny import QUANT_TINY_SPEC, TinySpec, write_tiny_checkpoint


def dequantized(fmt, ckpt) -> dict[str, torch.Tensor]:
    """The checkpoint through its format's CPU Dequantizer (what the CPU loader feeds the model)."""
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    d = fmt.Dequantizer(qc)
    out = dict(p for name, t in load_file(str(ckpt / "model.safetensors")).items() for p in d.feed(name, t))
    assert d.problems() == []
    return out


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("bf16"), seed=3, spec=QUANT_TINY_SPEC)
    return load_file(str(ckpt / "model.safetensors"))


@pytest.mark.parametrize("name", quant.tiny_names())
def test_every_registered_tiny_is_recognised_and_dequantizes_close_to_its_bf16_weights(tmp_path, bf16, name):
    ckpt = write_tiny_checkpoint(tmp_path / name, seed=3, quant=name)
    cfg = json.loads((ckpt / "config.json").read_text())
    fmt = quant.format_for(cfg["quantization_config"])
    assert fmt is quant.format_for_tiny(name)
    w = dequantized(fmt, ckpt)
    assert set(w) == set(bf16) or any(".experts." in k for k in w)  # per-expert exports stay per expert
    n = cfg["num_hidden_layers"]
    for key, t in bf16.items():
        if key in w:
            got = w[key]
        else:  # per-expert tensors of a stacked one
            stem = key.replace(".moe.", ".moe.experts.{}.", 1)
            got = torch.stack([w[stem.format(e)] for e in range(t.shape[0])])
        assert got.shape == t.shape, key
        err = (got.float() - t.float()).abs().max().item()
        # Quantized: within the coarsest format's step (4-bit: half a step is amax/14; e4m3: amax/16;
        # FP4 E2M1's widest gap, 4 to 6, is 1/3 of its range: NVFP4 half of it is amax/6 up to the E4M3
        # block scale's rounding (< amax/5), MXFP4's power-of-two scale up to twice that, < amax/3);
        # a dropped or misplaced scale is off by orders of magnitude.
        bound = {"nvfp4": 5, "modelopt-mixed": 5, "nvfp4-ct": 5, "mxfp4": 3}.get(name, 8)
        assert err <= t.float().abs().max().item() / bound, (key, err)
        # MTP layers stay BF16 in re-exports (block FP8 is the official export, whose MTP
        # projections are FP8 like the main layers').
        if fmt is not fp8 and key.startswith(tuple(f"model.layers.{i}." for i in range(n, n + 3))):
            assert torch.equal(got, t), f"{key}: MTP layers stay BF16"


def test_int8_exports_quantize_what_their_real_exporters_do(tmp_path):
    own = write_tiny_checkpoint(tmp_path / "own", seed=3, quant="w8a8-int8")
    ct = write_tiny_checkpoint(tmp_path / "ct", seed=3, quant="w8a8-int8-ct")
    w_own, w_ct = load_file(str(own / "model.safetensors")), load_file(str(ct / "model.safetensors"))
    # SGLang's layout: stacked experts, fp32 per-channel scales, g_proj and router BF16.
    assert w_own["model.layers.3.moe.gate_proj.weight"].dtype == torch.int8
    assert w_own["model.layers.3.moe.gate_proj.weight_scale"].shape == (8, 128, 1)
    assert w_own["model.layers.3.moe.gate_proj.weight_scale"].dtype == torch.float32
    assert w_own["model.layers.0.self_attn.g_proj.weight"].dtype == torch.bfloat16
    # compressed-tensors: per-expert Linear tensors, bf16 scales, g_proj quantized, router BF16.
    assert "model.layers.3.moe.gate_proj.weight" not in w_ct
    assert w_ct["model.layers.3.moe.experts.7.down_proj.weight"].dtype == torch.int8
    assert w_ct["model.layers.3.moe.experts.7.down_proj.weight_scale"].dtype == torch.bfloat16
    assert w_ct["model.layers.0.self_attn.g_proj.weight"].dtype == torch.int8
    for w in (w_own, w_ct):
        assert w["model.layers.3.moe.gate.weight"].dtype == torch.bfloat16
        assert w["model.layers.5.self_attn.q_proj.weight"].dtype == torch.bfloat16  # MTP layer
        assert w["lm_head.weight"].dtype == torch.bfloat16
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["config_groups"]["group_0"]["weights"] == {**qc["config_groups"]["group_0"]["weights"],
                                                         "type": "int", "num_bits": 8, "strategy": "channel"}
    assert json.loads((own / "config.json").read_text())["quantization_config"]["quant_method"] == "w8a8_int8"
    # The per-layer lists stay whole (main + MTP layers).
    cfg = json.loads((ct / "config.json").read_text())
    assert len(cfg["layer_types"]) == len(cfg["swiglu_limits"]) == cfg["num_hidden_layers"] + 3


def test_cli_quant_flag_and_fp8_alias_write_the_same_checkpoint(tmp_path):
    assert step35_main(["tiny", str(tmp_path / "a"), "--quant", "fp8", "--seed", "2"]) == 0
    assert step35_main(["tiny", str(tmp_path / "b"), "--fp8", "--seed", "2"]) == 0
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8) if a[k].dtype == fp8.FP8_DTYPE else a[k],
                                                    b[k].view(torch.uint8) if b[k].dtype == fp8.FP8_DTYPE else b[k])
                                        for k in a)
    assert step35_main(["tiny", str(tmp_path / "c"), "--quant", "w8a8-int8"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]["quant_method"] == "w8a8_int8"
    assert step35_main(["tiny", str(tmp_path / "d"), "--fp8", "--quant", "w8a8-int8"]) == 2
    with pytest.raises(SystemExit):
        step35_main(["tiny", str(tmp_path / "e"), "--quant", "int3"])
    with pytest.raises(ValueError, match="unknown quantization 'int3'.*w8a8-int8"):
        write_tiny_checkpoint(tmp_path / "f", quant="int3")


def test_fp8_tiny_still_refuses_partial_blocks(tmp_path):
    with pytest.raises(ValueError, match=r"not whole 128x128 blocks.*self_attn\.q_proj\.weight \[64, 64\]"):
        write_tiny_checkpoint(tmp_path / "bad", spec=TinySpec(), quant="fp8")


def test_int8_dequantizer_names_unpaired_and_misshaped_parts_and_unservable_configs():
    w = torch.randn(6, 8)
    q, s = int8.quantize_channel(w)
    assert torch.equal(int8.dequantize_channel(q, s), q.float() * s)
    assert (int8.dequantize_channel(q, s) - w).abs().max() <= s.max() / 2 + 1e-6
    d = int8.Dequantizer({"quant_method": "w8a8_int8"})
    assert d.feed("a.weight_scale", s) == []
    (name, got), = d.feed("a.weight", q)  # either order
    assert name == "a.weight" and torch.equal(got, q.float() * s)
    d.feed("b.weight", q)
    d.feed("c.weight_scale", s)
    d.feed("e.weight_scale", s[:3])
    assert d.feed("e.weight", q) == []
    assert d.feed("n.weight", w) == [("n.weight", w)]  # unquantized tensors pass through
    assert d.problems() == [
        "e.weight: weight_scale shape [3, 1] does not match weight [6, 8] (expected [6, 1]: one scale per output channel)",
        "b.weight: INT8 weight without b.weight_scale",
        "c.weight_scale: scale without its INT8 weight",
    ]
    ct = {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "int", "num_bits": 8, "strategy": "group", "symmetric": False},
        "input_activations": {"type": "int", "num_bits": 8, "dynamic": False}}}}
    assert quant.format_for(ct) is int8
    probs = int8.Dequantizer(ct).problems()
    assert any("strategy='group'" in p for p in probs) and any("symmetric=false" in p for p in probs)
    assert any("static" in p for p in probs)
    # W4A16 / FP8 compressed-tensors groups are not INT8 W8A8.
    w4 = {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}}}
    assert not int8.matches(w4)

"""The W4A16 formats of sglang_step35/quant/w4a16.py against independent readers of each spec.

Oracles (none of them ours): compressed-tensors' own `pack_to_int32` / `unpack_from_int32` (the
library LLM Compressor writes checkpoints with), SGLang's `pack_rows` / `pack_cols` (vLLM's GPTQ test
packers) and SGLang's `awq_dequantize_decomposition` (the pure-torch reference of its AWQ Triton
dequantizer, AutoAWQ's interleaved order). Then the writer (names, MTP and g_proj kept BF16, configs
the registry claims) and the CPU-path Dequantizer (any order, named problems); channel-wise and group-64
compressed-tensors W4A16, which no tiny writes, loaded on the CPU path against the reference's weights.
"""

from __future__ import annotations

import re

import pytest
import torch

from sglang_step35.checkpoint import layer_index
from sglang_step35.quant import w4a16

K, N = 256, 24  # two groups of 128 inputs; outputs a multiple of 8 (AWQ/GPTQ pack along N)


def _w(n=N, k=K, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_compressed_tensors_packing_is_the_librarys_own():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    w = _w()
    codes, scale = w4a16.quantize_symmetric(w)
    t = w4a16.ct_tensors(w)
    assert torch.equal(t["weight_packed"], pack_to_int32(codes, 4))
    assert t["weight_scale"].dtype == torch.bfloat16 and torch.equal(t["weight_scale"].float(), scale)
    assert t["weight_shape"].tolist() == [N, K]
    # K not a multiple of 8: the library pads the last int32; ours reads it back cropped.
    odd = codes[:, :250]
    assert torch.equal(w4a16.unpack_int32(pack_to_int32(odd, 4), 1, 250).to(torch.int16) - 8, odd.to(torch.int16))
    deq = w4a16.ct_dequantize("x", t)
    want = unpack_from_int32(t["weight_packed"], 4, torch.Size([N, K])).float() * scale.repeat_interleave(128, 1)
    assert torch.equal(deq, want)


def test_gptq_layout_is_sglangs_gptq_packers():
    from sglang.srt.layers.quantization.utils import pack_cols, pack_rows

    w = _w()
    codes, scale = w4a16.quantize_symmetric(w)
    t = w4a16.gptq_tensors(w)
    assert torch.equal(t["qweight"], pack_rows((codes.to(torch.int32) + 8).T, 4, K, N))
    # Symmetric v1: every zero point stored as 8 - 1.
    assert torch.equal(t["qzeros"], pack_cols(torch.full((2, N), 7, dtype=torch.int32), 4, 2, N))
    assert t["scales"].dtype == torch.float16 and torch.equal(t["scales"].float(), scale.T)
    assert torch.equal(t["g_idx"], torch.arange(K, dtype=torch.int32) // 128)
    assert torch.equal(w4a16.gptq_dequantize("x", t), w4a16.ct_dequantize("x", w4a16.ct_tensors(w)))


def test_awq_layout_is_what_sglangs_awq_dequantizer_reads():
    from sglang.kernels.ops.quantization.awq_triton import awq_dequantize_decomposition

    w = _w()
    t = w4a16.awq_tensors(w)
    ref = awq_dequantize_decomposition(t["qweight"], t["scales"], t["qzeros"])  # [K, N] fp16
    ours = w4a16.awq_dequantize("x", t)
    # (q - z) is exact in fp16, so fp16 (q - z) * s and our fp32 product rounded once are equal.
    assert torch.equal(ref, ours.T.half())
    # A plain (non-interleaved) packing would be read as other columns: the order matters.
    plain = dict(t, qweight=w4a16.pack_int32(w4a16.unpack_int32(t["qweight"], 1, N, w4a16.AWQ_ORDER), 1))
    assert not torch.equal(awq_dequantize_decomposition(plain["qweight"], t["scales"], t["qzeros"]), ref)


@pytest.mark.parametrize("fmt", ["ct", "gptq", "awq"])
def test_round_trip_error_is_within_half_a_step(fmt):
    w = _w(seed=3)
    write = {"ct": w4a16.ct_tensors, "gptq": w4a16.gptq_tensors, "awq": w4a16.awq_tensors}[fmt]
    read = {"ct": w4a16.ct_dequantize, "gptq": w4a16.gptq_dequantize, "awq": w4a16.awq_dequantize}[fmt]
    t = write(w)
    scale = (t["weight_scale"] if fmt == "ct" else t["scales"].T).float().repeat_interleave(128, 1)
    err = (read("x", t) - w).abs()
    # Half a step, plus the clipped end of the grid: the bf16-rounded scale may be 2^-8 below
    # max / 7.5, leaving the group's extreme 7.53 steps out where the code stops at 7.
    assert (err <= 0.54 * scale).all()
    assert err.max() > scale.min() / 8  # it is quantized, not passed through


def _tiny_bf16():
    from sglang_step35.tiny import FP8_TINY_SPEC, tiny_config, tiny_weights

    cfg = tiny_config(FP8_TINY_SPEC, 1024, {t: i for i, t in enumerate(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>"])})
    return cfg, tiny_weights(cfg, 0, FP8_TINY_SPEC.init_std)


@pytest.fixture(scope="module")
def tiny_bf16():
    return _tiny_bf16()


@pytest.mark.parametrize("name,parts", [("w4a16", ("weight_packed", "weight_scale", "weight_shape")),
                                        ("gptq", ("qweight", "qzeros", "scales", "g_idx")),
                                        ("awq", ("qweight", "qzeros", "scales"))])
def test_writer_names_configs_and_kept_bf16(tiny_bf16, name, parts):
    cfg, w = tiny_bf16
    out, extra = w4a16.write_checkpoint_tensors(w, cfg, name)
    qc = extra["quantization_config"]
    assert w4a16.matches(qc)
    # Every part has the shape the registry's shape hook states for its BF16 weight.
    for key, t in out.items():
        base, _, leaf = key.rpartition(".")
        if leaf in parts:
            m = re.match(r"^(model\.layers\.\d+\.moe)\.experts\.(\d+)\.(\w+)$", base)
            bf16 = w[f"{m.group(1)}.{m.group(3)}.weight"][0] if m else w[base + ".weight"]
            assert w4a16.checkpoint_shape(leaf, tuple(bf16.shape), qc) == tuple(t.shape), key
    n, E = cfg["num_hidden_layers"], cfg["moe_num_experts"]
    moe = [i for i in range(n) if "model.layers.%d.moe.gate_proj.weight" % i in w]
    L = moe[0]
    for e in (0, E - 1):
        for p in parts:
            assert f"model.layers.{L}.moe.experts.{e}.down_proj.{p}" in out
    assert f"model.layers.{L}.moe.gate_proj.weight" not in out
    assert "model.layers.0.self_attn.q_proj." + parts[0] in out and "model.layers.0.self_attn.q_proj.weight" not in out
    # Kept BF16: g_proj, router (+fp32 bias), norms, embeddings, head and every MTP layer, whole.
    for keep in ["model.layers.0.self_attn.g_proj.weight", f"model.layers.{L}.moe.gate.weight",
                 f"model.layers.{L}.moe.router_bias", "model.embed_tokens.weight", "lm_head.weight",
                 *[k for k in w if (layer_index(k) or 0) >= n]]:
        assert torch.equal(out[keep], w[keep]) and out[keep].dtype == w[keep].dtype, keep
    # The CPU path: every quantized weight back under its BF16 name (experts per expert), within a step.
    deq = w4a16.Dequantizer(qc)
    got = dict(kv for k, t in sorted(out.items(), reverse=True) for kv in deq.feed(k, t))
    assert not deq.problems()
    down = got[f"model.layers.{L}.moe.experts.{E - 1}.down_proj.weight"]
    ref = w[f"model.layers.{L}.moe.down_proj.weight"][E - 1].float()
    # Half a step: max|W| / 15 with |W| <= 0.4 here.
    assert down.dtype == torch.float32 and down.shape == ref.shape and (down - ref).abs().max() < 0.03
    assert set(got) == {k for k in w if not w4a16.quantized_name(k, n)} | {
        k for k in got if ".moe.experts." in k} | {k for k in w if w4a16.quantized_name(k, n) and ".moe." not in k}


def test_writer_refuses_widths_the_format_cannot_hold():
    from sglang_step35.tiny import TinySpec, tiny_config, tiny_weights

    cfg = tiny_config(TinySpec(), 1024, {t: i for i, t in enumerate(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
         "<tool_response>", "</tool_response>"])})
    with pytest.raises(ValueError, match=r"FP8_TINY_SPEC\): model\.layers\.0\.self_attn\.q_proj \[64, 64\]: input "
                                         r"dimension 64 is not a multiple of the group size 128; .* and \d+ more$"):
        w4a16.write_checkpoint_tensors(tiny_weights(cfg, 0, 0.1), cfg, "awq")
    with pytest.raises(ValueError, match="unknown W4A16 checkpoint name 'int4'"):
        w4a16.quantization_config("int4")


def test_matches_claims_only_4bit_weight_only():
    yes = [w4a16.quantization_config(n) for n in w4a16.NAMES]
    yes.append({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True})
    no = [
        {"quant_method": "gptq", "bits": 8, "group_size": 128, "sym": True},
        {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"},
        {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
        {"quant_method": "fp8", "weight_block_size": [128, 128]},
        dict(yes[0], config_groups={"group_0": dict(yes[0]["config_groups"]["group_0"],
                                                    input_activations={"num_bits": 8, "type": "int"},
                                                    format="int-quantized")}, format="int-quantized"),
        dict(yes[0], config_groups={"group_0": dict(yes[0]["config_groups"]["group_0"],
                                                    weights={"num_bits": 8, "type": "int", "strategy": "group"})}),
        {},
    ]
    assert all(w4a16.matches(q) for q in yes)
    assert not any(w4a16.matches(q) for q in no)
    with pytest.raises(ValueError, match="not a W4A16"):
        w4a16.Dequantizer({"quant_method": "fp8"})


def test_dequantizer_names_every_problem():
    qc = w4a16.quantization_config("gptq")
    w = w4a16.gptq_tensors(_w())
    deq = w4a16.Dequantizer(qc)
    assert deq.feed("model.norm.weight", torch.ones(3))[0][0] == "model.norm.weight"  # passes through
    # Parts in any order; the weight comes out once the last required part arrives.
    assert deq.feed("a.scales", w["scales"]) == [] and deq.feed("a.qzeros", w["qzeros"]) == []
    (name, t), = deq.feed("a.qweight", w["qweight"])
    assert name == "a.weight" and t.shape == (N, K)
    deq.feed("a.g_idx", w["g_idx"])  # trivial g_idx after the weight: fine
    deq.feed("b.qweight", w["qweight"])  # never completed
    deq.feed("c.qweight", w["qweight"][:, :8])  # mis-shaped
    deq.feed("c.qzeros", w["qzeros"])
    deq.feed("c.scales", w["scales"])
    deq.feed("d.qweight", w["qweight"].float())  # wrong dtype
    deq.feed("d.qzeros", w["qzeros"])
    deq.feed("d.scales", w["scales"])
    deq.feed("e.qweight", w["qweight"])
    deq.feed("e.qzeros", w["qzeros"][:1])
    deq.feed("e.scales", w["scales"][:1])  # one group over 256 inputs: group size 256, config says 128
    deq.feed("a.qzeros", w["qzeros"])
    p = "\n".join(deq.problems())
    assert "b: has qweight but no qzeros, scales" in p
    assert f"c.qweight: expected [K/8, {N}], got [32, 8]" in p
    assert "d.qweight: expected int32, got float32" in p
    assert "e: 1 scale groups over 256 inputs, but quantization_config says group_size 128" in p
    assert "a.qzeros: second qzeros for a" in p
    late = w4a16.Dequantizer(qc)
    for k in ("scales", "qzeros", "qweight"):
        late.feed("f." + k, w[k])
    late.feed("f.g_idx", w["g_idx"].flip(0))
    assert "f.g_idx: act-order group indices after f's weight" in "\n".join(late.problems())
    # With desc_act the g_idx is required, and used.
    act = w4a16.Dequantizer(dict(qc, desc_act=True))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(1))
    g_idx = (perm // 128).to(torch.int32)
    for k in ("scales", "qzeros", "qweight"):
        assert act.feed("g." + k, w[k]) == []
    (_, t), = act.feed("g.g_idx", g_idx)
    codes = w4a16.unpack_int32(w["qweight"], 0, K).T.float() - 8
    assert torch.equal(t, codes * w["scales"].T.float()[:, g_idx.long()])


def test_compressed_tensors_asymmetric_and_weight_shape_checks():
    qc = w4a16.quantization_config("w4a16")
    asym = dict(qc, config_groups={"group_0": dict(qc["config_groups"]["group_0"],
                                                   weights=dict(qc["config_groups"]["group_0"]["weights"], symmetric=False))})
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes, scale, zero = w4a16.quantize_asymmetric(_w())  # unsigned 0..15: signed code / zero + 8
    signed = lambda u: (u.to(torch.int16) - 8).to(torch.int8)  # noqa: E731
    # The library packs signed codes and zero points (adding 8), zero points along the output dimension.
    t = {"weight_packed": pack_to_int32(signed(codes), 4), "weight_scale": scale.bfloat16(),
         "weight_shape": torch.tensor([N, K]), "weight_zero_point": pack_to_int32(signed(zero), 4, packed_dim=0)}
    deq = w4a16.Dequantizer(asym)
    assert deq.feed("m.weight_packed", t["weight_packed"]) == []
    assert deq.feed("m.weight_scale", t["weight_scale"]) == [] and deq.feed("m.weight_shape", t["weight_shape"]) == []
    (_, got), = deq.feed("m.weight_zero_point", t["weight_zero_point"])
    want = (codes.float() - zero.float().repeat_interleave(128, 1)) * scale.repeat_interleave(128, 1)
    assert torch.equal(got, want)
    bad = w4a16.Dequantizer(qc)
    for k, v in w4a16.ct_tensors(_w()).items():
        bad.feed("n." + k, torch.tensor([N, K + 8]) if k == "weight_shape" else v)
    assert f"n.weight_packed: expected [{N}, 33], got [{N}, 32]" in bad.problems()


def _regrouped(src, out, group: str):
    """The W4A16 tiny `src` re-exported channel-wise (one scale per output row, strategy channel) or with
    groups of 64: every quantized weight dequantized and quantized again (compressed-tensors' symmetric
    codec), the config's scheme changed to match; returns the checkpoint directory."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    deq = w4a16.Dequantizer(qc)
    w = load_file(str(out / "model.safetensors"))
    new = {}
    for name, t in w.items():
        for n, v in deq.feed(name, t):
            if n.endswith(".weight") and n[: -len(".weight")] + ".weight_packed" in w:
                base = n[: -len(".weight")]
                parts = w4a16.ct_tensors(v, v.shape[1] if group == "channel" else 64)
                new.update({f"{base}.{k}": x for k, x in parts.items()})
            else:
                new[n] = v.to(w[n].dtype) if n in w else v
    assert deq.problems() == []
    scheme = qc["config_groups"]["group_0"]["weights"]
    scheme.update({"strategy": "channel", "group_size": None} if group == "channel" else {"group_size": 64})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(new, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("group", ["channel", "g64", "g32"])
def test_w4a16_channel_and_group_64_load_dequantized_on_a_cpu(tmp_path, group):
    """On a CPU (what `sglang serve` runs here; in-process, no server start: the loader and dequantizer
    are the w4a16 case's of tests/test_quant_served.py) symmetric channel-wise, group-64 and group-32
    (`step35 tiny --quant w4a16-g32`) W4A16 are served: built unquantized, every weight dequantized at
    load; each parameter equals what the fp32 reference reads (the format's Dequantizer, experts
    stacked) rounded once to the model dtype. Teeth: scales of groups of 64 or 32 read as one group
    per 128 inputs are refused by the Dequantizer."""
    import json

    import gpu_contract
    from safetensors.torch import load_file
    from test_quant_served import assert_cpu_load_is_the_references

    from sglang_step35 import served
    from sglang_step35.tiny import write_tiny_checkpoint

    gpu_contract.sglang_world_of_one()
    if group == "g32":
        ckpt = write_tiny_checkpoint(tmp_path / group, seed=4, quant="w4a16-g32")
    else:
        ckpt = _regrouped(write_tiny_checkpoint(tmp_path / "w4a16", seed=4, quant="w4a16"), tmp_path / group, group)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert served.quant_label(qc) == f"w4a16-{group}"
    assert served.refusal(served.QUANT, served.Setting("cpu", quant=f"w4a16-{group}", clamped_layers=(4,))) is None
    from sglang_step35.moe.policy import guard_moe_layout  # the launch guard on this machine

    cfg = json.loads((ckpt / "config.json").read_text())
    assert guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cpu", aiter=False).action != "refuse"
    w = load_file(str(ckpt / "model.safetensors"))
    q = w["model.layers.0.self_attn.q_proj.weight_scale"]
    per = {"channel": None, "g64": 64, "g32": 32}[group]
    assert q.shape[1] == (1 if per is None else int(w["model.layers.0.self_attn.q_proj.weight_shape"][1]) // per)
    model, _ = gpu_contract.load_like_sglang(ckpt)
    assert model.cpu_dequant is not None
    assert_cpu_load_is_the_references(w4a16, ckpt, model)
    if per is not None:
        bad = w4a16.Dequantizer(w4a16.quantization_config("w4a16"))  # says groups of 128
        for k in [k for k in w if k.startswith("model.layers.0.self_attn.q_proj.")]:
            bad.feed(k, w[k])
        assert any("group_size 128" in p for p in bad.problems()), bad.problems()

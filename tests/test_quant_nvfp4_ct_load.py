"""compressed-tensors NVFP4 (LLM Compressor `nvfp4-pack-quantized`) loads as SGLang's own methods lay it out.

The tiny of `step35 tiny --quant nvfp4-ct` (sglang_step35/quant/nvfp4_ct.py) is built as SGLang's
loader builds it (`_get_quantization_config` + `_initialize_model`; the draft with each
`draft_model_idx`) while SGLang's capability probe answers as an H100 (sm_90) during construction
only: SGLang's CompressedTensorsConfig then picks its weight-only NVFP4 schemes (W4A4 NVFP4 needs
sm100), CompressedTensorsW4A16Nvfp4MoE for the experts and CompressedTensorsW4A16Fp4 for the linears,
both keeping the checkpoint's `input_global_scale`; as a B200 (sm100) it picks the W4A4 schemes, whose
CUTLASS MoE takes w13 as [up; gate]. We stop before `process_weights_after_loading`
(the FP4 Marlin repack needs the GPU). Bit-exact: packed FP4 and E4M3 scales concatenated in fused
shard order (q/k/v, gate/up; per-expert tensors into w13 / w2 per expert), the fp32 global scales one
per shard. The routed experts are refused on GPUs by name (no SGLang NVFP4 MoE kernel computes Step's
clamp); on a CPU the loader dequantizes, and each weight equals what compressed-tensors' own NVFP4
decompressor and SGLang's `dequantize_nvfp4` (with the reciprocal global scale) read.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import gpu_contract
from gpu_contract import main_name, mtp_name
from sglang_step35 import quant, served
from sglang_step35.quant import nvfp4_ct
from sglang_step35.served import NotServedError
from sglang_step35.tiny import write_tiny_checkpoint

_FUSED = gpu_contract.FUSED_CHECKPOINT_MODULES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("nvfp4-ct") / "ckpt", seed=4, quant="nvfp4-ct")


@pytest.fixture
def as_h100():
    with gpu_contract.gpu_like_build_state("cuda") as mp:
        yield mp


def build(ckpt, mp, draft_idx=None, record=None, blackwell=False):
    """Our model as SGLang builds it on an H100 (a B200: `blackwell`); refusals recorded into
    `record` (None: raised)."""
    from sglang.srt.runtime_context import get_platform

    with mp.context() as m:
        m.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (10, 0) if blackwell else (9, 0))
        if blackwell:  # CompressedTensorsW4A4Nvfp4MoE asks SGLang's platform context
            m.setattr(type(get_platform()), "is_blackwell", property(lambda self: True), raising=False)
        if record is not None:
            m.setattr(served, "check", lambda setting, flags=served.FLAGS: record.extend(served.refusals(setting, flags)))
        return gpu_contract.build_like_sglang(ckpt, draft_idx=draft_idx)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def expected(w: dict, prefix: str, suffix: str, param: torch.Tensor, up_first: bool = False):
    """What parameter `prefix + suffix` must hold, from checkpoint tensors `w` (None: nothing feeds it);
    `up_first`: w13 rows as [up; gate] (the sm100 CUTLASS layout, `load_up_proj_weight_first`)."""
    if suffix.startswith("moe.experts.w"):
        shard, leaf = suffix[len("moe.experts.w"):].split("_", 1)
        projs = (["up_proj", "gate_proj"] if up_first else ["gate_proj", "up_proj"]) if shard == "13" else ["down_proj"]
        n = len({k.split(".")[5] for k in w if k.startswith(prefix + "moe.experts.")})
        per = [torch.cat([w[f"{prefix}moe.experts.{e}.{p}.{leaf}"] for p in projs]) for e in range(n)]
        return torch.stack(per).reshape(param.shape)
    module, _, leaf = suffix.rpartition(".")
    parts = [w.get(f"{prefix}{m}.{leaf}") for m in _FUSED.get(module, [module])]
    return None if any(p is None for p in parts) else torch.cat([p.reshape(-1, *p.shape[1:]) for p in parts])


def assert_every_param_written(model, w: dict, map_name, up_first: bool = False) -> set[str]:
    """Every parameter holds its checkpoint tensors bit for bit; returns the packed FP4 ones."""
    packed, wrong = set(), []
    for name, p in model.named_parameters():
        prefix, suffix = map_name(name)
        want = expected(w, prefix, suffix, p, up_first)
        assert want is not None, f"{name}: no checkpoint tensor ({prefix}{suffix})"
        if want.dtype == torch.bfloat16 and p.dtype == torch.float32:
            want = want.float()  # the fp32 router holds the checkpoint's bf16 gate upcast
        if p.dtype != want.dtype or p.shape != want.shape or not torch.equal(_bits(p.data), _bits(want)):
            wrong.append(f"{name}: {p.dtype} {list(p.shape)} vs {want.dtype} {list(want.shape)}")
        if p.dtype == torch.uint8:
            packed.add(name)
    assert not wrong, "parameters not equal to the checkpoint:\n" + "\n".join(wrong)
    return packed


def test_nvfp4_ct_loads_bit_exact_under_sglangs_compressed_tensors_schemes_main_and_mtp(as_h100, ckpt):
    from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from sglang.srt.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW4A16Fp4,
        CompressedTensorsW4A16Nvfp4MoE,
    )

    w = load_file(str(ckpt / "model.safetensors"))
    refused: list[str] = []
    model, qc = build(ckpt, as_h100, record=refused)
    assert isinstance(qc, CompressedTensorsConfig) and model.cpu_dequant is None
    assert refused and all(r.startswith("nvfp4-ct experts") for r in refused), refused
    model.load_weights(w.items())
    packed = assert_every_param_written(model, w, main_name)
    layers = model.model.layers
    assert isinstance(layers[3].moe.experts.scheme, CompressedTensorsW4A16Nvfp4MoE)
    for mod in (layers[0].self_attn.qkv_proj, layers[2].self_attn.g_proj, layers[1].mlp.gate_up_proj,
                layers[4].moe.share_expert.down_proj):
        assert isinstance(mod.scheme, CompressedTensorsW4A16Fp4), mod
    assert {"model.layers.4.moe.experts.w13_weight_packed", "model.layers.2.self_attn.g_proj.weight_packed",
            "model.layers.0.self_attn.qkv_proj.weight_packed"} <= packed
    # Fused siblings share one global scale (SGLang's weight-only NVFP4 refuses differing ones after loading).
    for p in (layers[0].self_attn.qkv_proj.weight_global_scale, layers[1].mlp.gate_up_proj.weight_global_scale):
        assert torch.unique(p.data).numel() == 1
    gs13 = layers[3].moe.experts.w13_weight_global_scale.data
    assert torch.equal(gs13[:, 0], gs13[:, 1]) and torch.unique(gs13[:, 0]).numel() > 1  # per expert
    assert model.lm_head.weight.dtype == torch.bfloat16 and layers[4].moe.gate.weight.dtype == torch.float32
    n = model.config.num_hidden_layers
    for step in range(3):  # the MTP layers stay BF16 (the export's ignore list names them)
        mtp, _ = build(ckpt, as_h100, draft_idx=step, record=[])
        mtp.load_weights(w.items())
        assert assert_every_param_written(mtp, w, mtp_name(n + step)) == set()
        assert type(mtp.layer.self_attn.qkv_proj.quant_method).__name__ == "UnquantizedLinearMethod"


def test_nvfp4_ct_on_sm100_loads_bit_exact_under_the_w4a4_schemes_up_projection_first(as_h100, ckpt):
    """On a B200 (sm100) SGLang picks the W4A4 schemes, whose CUTLASS MoE loads w13 as [up; gate]
    (`load_up_proj_weight_first`): the same checkpoint lands in that order, every byte."""
    from sglang.srt.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW4A4Fp4,
        CompressedTensorsW4A4Nvfp4MoE,
    )

    w = load_file(str(ckpt / "model.safetensors"))
    refused: list[str] = []
    model, _ = build(ckpt, as_h100, record=refused, blackwell=True)
    assert refused and all(r.startswith("nvfp4-ct experts") for r in refused), refused
    model.load_weights(w.items())
    experts = model.model.layers[3].moe.experts
    assert isinstance(experts.scheme, CompressedTensorsW4A4Nvfp4MoE) and experts.quant_method.load_up_proj_weight_first
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.scheme, CompressedTensorsW4A4Fp4)
    assert "model.layers.3.moe.experts.w13_weight_packed" in assert_every_param_written(model, w, main_name, up_first=True)


def test_nvfp4_ct_is_refused_on_gpus_by_name_and_served_on_cpu(as_h100, ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    assert served.quant_label(cfg["quantization_config"]) == "nvfp4-ct"
    with pytest.raises(NotServedError, match="^nvfp4-ct experts run on SGLang's CUDA FP4 kernels only"):
        build(ckpt, as_h100)  # the first MoE layer (3) is unclamped: the generic refusal
    (why,) = served.refusals(served.Setting("nvidia", quant="nvfp4-ct", clamped_layers=(43, 44)))
    assert why.startswith("nvfp4-ct experts on the SwiGLU-clamped layers 43, 44: SGLang's compressed-tensors NVFP4 "
                          "MoE would drop or change Step's min(silu(gate), L) * clamp(up, ±L)")
    assert "CompressedTensorsW4A16Nvfp4MoE" in why and "CompressedTensorsW4A4Nvfp4MoE" in why
    (why,) = served.refusals(served.Setting("amd", quant="nvfp4-ct"))
    assert why.startswith("nvfp4-ct experts run on SGLang's CUDA FP4 kernels only")
    assert served.refusals(served.Setting("cpu", quant="nvfp4-ct", clamped_layers=(43, 44))) == []
    # At launch: the guard SGLang's launch calls reads the checkpoint's config the same way.
    from sglang_step35.moe.policy import guard_moe_layout

    def launch(platform):
        return guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, platform, aiter=False)

    assert launch("cuda").action == "refuse" and "nvfp4-ct experts" in launch("cuda").message
    assert launch("cpu").action != "refuse"


def test_on_a_cpu_nvfp4_ct_loads_as_compressed_tensors_and_sglang_decode_it(ckpt):
    """The CPU path: built in BF16, each weight dequantized while loading, equal (one bf16 ulp) to
    compressed-tensors' NVFP4PackedCompressor.decompress and to SGLang's dequantize_nvfp4 given the
    reciprocal global scale. Teeth: reading weight_global_scale as ModelOpt's multiplier is far off."""
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from sglang.srt.layers.quantization.dequantization import dequantize_nvfp4

    gpu_contract.sglang_world_of_one()
    model, _ = gpu_contract.load_like_sglang(ckpt)
    assert model.cpu_dequant is not None
    w = load_file(str(ckpt / "model.safetensors"))
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(qc["config_groups"]["group_0"])
    params = dict(model.named_parameters())
    checked = 0
    for base in sorted(k[: -len(".weight_packed")] for k in w if k.endswith(".weight_packed")):
        parts = {p: w[f"{base}.{p}"] for p in ("weight_packed", "weight_scale", "weight_global_scale")}
        theirs = NVFP4PackedCompressor.decompress(dict(parts), scheme)["weight"].float()
        sglang = dequantize_nvfp4(parts["weight_packed"], parts["weight_scale"], 1 / parts["weight_global_scale"])
        torch.testing.assert_close(sglang.float(), theirs, rtol=2**-7, atol=0)
        layer, rest = base.split(".", 3)[2], base.split(".", 3)[3]
        if rest.startswith("moe.experts."):
            _, _, e, proj = rest.split(".")
            p = params[f"model.layers.{layer}.moe.experts.{'w2' if proj == 'down_proj' else 'w13'}_weight"][int(e)]
            got = p if proj == "down_proj" else p.chunk(2)[proj == "up_proj"]
        else:
            module = next((f for f, subs in _FUSED.items() if rest in subs), rest)
            p = params[f"model.layers.{layer}.{module}.weight"]
            subs = _FUSED.get(module, [module])
            sizes = [w[f"model.layers.{layer}.{s}.weight_packed"].shape[0] for s in subs]
            got = p.split(sizes)[subs.index(rest)]
        torch.testing.assert_close(got.float(), theirs, rtol=2**-7, atol=0, msg=base)
        modelopt_reading = dequantize_nvfp4(parts["weight_packed"], parts["weight_scale"], parts["weight_global_scale"])
        assert (modelopt_reading.float() - theirs).abs().max() > 100 * theirs.abs().max()
        checked += 1
    assert checked >= 5 * 4 + 2 * 8 * 3  # every quantized Linear of the 5 main layers, experts per expert


def test_dequantizer_names_missing_misshaped_and_accepts_scalar_global_scales():
    w = torch.randn(32, 64)
    gs = nvfp4_ct.global_scale(w.abs().amax())
    packed, bs = nvfp4_ct.nvfp4.quantize(w, 1 / gs)
    d = nvfp4_ct.Dequantizer({})
    assert d.feed("a.weight_global_scale", gs.reshape(())) == [] and d.feed("a.weight_scale", bs) == []
    (name, got), = d.feed("a.weight_packed", packed)  # any order; a scalar global scale
    assert name == "a.weight" and (got - w).abs().max() <= w.abs().max() / 5
    assert d.feed("a.input_global_scale", gs.reshape(1)) == []  # GPU-only, dropped
    assert d.feed("a.weight_scale", bs) == []  # a second copy (two shards holding it): named below
    d.feed("b.weight_packed", packed)
    d.feed("b.weight_scale", bs)
    d.feed("c.weight_global_scale", gs.reshape(1))
    d.feed("e.weight_packed", packed)
    d.feed("e.weight_scale", bs[:, :2])
    assert d.feed("e.weight_global_scale", gs.reshape(1)) == []
    assert d.feed("n.weight", w) == [("n.weight", w)]
    assert d.problems() == [
        "a.weight_scale: a second weight_scale for a",
        "e.weight_packed: weight_scale shape [32, 2] does not match weight [32, 32] (expected [32, 4]: one E4M3 "
        "scale per 16 elements)",
        "b.weight_packed: NVFP4 weight without b.weight_global_scale",
        "c: weight_global_scale without its weight_packed",
    ]
    assert quant.format_for({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "float", "num_bits": 4, "group_size": 16, "strategy": "tensor_group"}}}}) is nvfp4_ct
    mx = {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"type": "float", "num_bits": 4, "group_size": 32, "strategy": "group"}}}}
    assert not nvfp4_ct.matches(mx)  # MXFP4 (group 32, E8M0 scales) is another format
    # The planner's bytes are ModelOpt NVFP4's (two fp32 scalars per weight either way); own label.
    from sglang_step35.moe.quant import QUANTS, parse_quant

    ct = parse_quant(nvfp4_ct.quantization_config({"num_hidden_layers": 45, "num_nextn_predict_layers": 3}))
    assert ct.name == "nvfp4-ct" and ct.linear_bytes(1280, 4096) == QUANTS["nvfp4"].linear_bytes(1280, 4096)
    assert ct.split_multiple == QUANTS["nvfp4"].split_multiple == 64

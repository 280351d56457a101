"""FP4 checkpoints load as on their GPUs: SGLang's own ModelOpt / Quark methods choose each module's
layout, and every parameter they create holds exactly the checkpoint's bytes.

NVFP4 (ModelOpt, plain and MIXED_PRECISION) as an H100 builds it, MXFP4 (Quark) as an MI300X does:
SGLang's capability probes answer like those GPUs during construction only (the NVFP4 MoE method
picks its Marlin fallback on (9, 0); Quark checks the scheme's minimum capability), our platform
probe answers the GPU vendor (so the CPU dequant fallback is off). The models are built as SGLang's
loader builds them (`_get_quantization_config` + `_initialize_model`; the draft with each
`draft_model_idx`) and loaded; we stop before `process_weights_after_loading` (the kernels' repacks,
e.g. the swizzled NVFP4 block scales, are derived there and need the GPU).

Bit-exact: packed FP4 weights and their E4M3 / E8M0 block scales concatenated in the fused shard
order (q/k/v, gate/up; stacked experts per expert), per-tensor scales (weight_scale_2, input_scale,
ModelOpt FP8's weight_scale) one per shard / per expert, BF16 tensors as written. Mixed precision:
a module listed FP8 is built with SGLang's ModelOpt FP8 method, one listed NVFP4 with the NVFP4
method, one not listed or excluded (`model.layers.0.mlp*`, which must not catch the MoE) in BF16.
Contrast: SGLang's built-in Step-3.5 class builds the MIXED_PRECISION routed experts unquantized
(its MoE prefix `...mlp.experts` matches no `...moe.gate_proj` key) and cannot load them.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from safetensors.torch import load_file

from sglang_step35.tiny import write_tiny_checkpoint

import gpu_contract
from gpu_contract import main_name, mtp_name

build = gpu_contract.build_like_sglang

_FUSED = gpu_contract.FUSED_CHECKPOINT_MODULES
# Derived in process_weights_after_loading (from weight_scale), never loaded: SGLang's own loader
# skips them too (models/step3p5.py's "blockscale_swizzled").
_DERIVED = ("blockscale_swizzled",)


@contextlib.contextmanager
def nvidia_h100(mp):
    """SGLang's CUDA capability probes answer as an H100 (sm_90): ModelOpt's NVFP4 MoE method takes
    its Marlin fallback, its FP8 linear its Hopper choice."""
    from sglang.srt.layers.quantization import modelopt_quant

    with mp.context() as m:
        m.setattr(modelopt_quant, "is_cuda", lambda: True)
        m.setattr(modelopt_quant, "get_device_capability", lambda *a: (9, 0))
        m.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
        yield


@contextlib.contextmanager
def amd_mi300(mp):
    """Quark's scheme check reads the device capability; an MI300X (gfx942) reports (9, 4)."""
    from sglang.srt.layers.quantization.quark import quark as quark_mod

    with mp.context() as m:
        m.setattr(quark_mod, "get_device_capability", lambda *a: (9, 4))
        yield


@pytest.fixture
def on_nvidia():  # per test: the CPU tests below need the real (CPU) platform back
    with gpu_contract.gpu_like_build_state("cuda") as mp:
        yield mp


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp4")
    return {name: write_tiny_checkpoint(root / name, seed=4, quant=name)
            for name in ("nvfp4", "modelopt-mixed", "mxfp4")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn,) else t


def expected_param(w: dict, prefix: str, suffix: str, param: torch.Tensor):
    """What parameter `prefix + suffix` must hold, rebuilt from checkpoint tensors `w` (None: no
    checkpoint tensor feeds it)."""
    m = re.match(r"^(.*experts\.(?:w13|w2))_(.+)$", suffix)
    module, leaf = (m.group(1), m.group(2)) if m else suffix.rsplit(".", 1)
    parts = [w.get(f"{prefix}{c}.{leaf}") for c in _FUSED.get(module, [module])]
    if any(p is None for p in parts):
        return None
    experts = ".experts." in f".{module}"
    if parts[0].dim() >= 2 + experts:  # weights and block scales: concatenated along the output dim
        return torch.cat(parts, dim=1 if experts else 0)
    # Per-tensor scales: one per shard (a Linear's [shards]; experts' [E, shards] or [E]).
    stacked = torch.stack(parts, dim=-1 if experts else 0)
    return stacked.reshape(param.shape) if stacked.numel() == param.numel() else stacked


def assert_every_param_written(model, w: dict, map_name) -> dict[str, torch.dtype]:
    """Every loaded parameter equals its checkpoint tensors bit for bit; returns {name: dtype} of the
    quantized ones (uint8 packed FP4 / E8M0, FP8)."""
    quantized, wrong = {}, []
    for name, p in model.named_parameters():
        if any(d in name for d in _DERIVED):
            continue
        if getattr(p, "_skip_weight_check", False):
            continue  # optional k/v scales (SGLang's KV-cache method defaults)
        prefix, suffix = map_name(name)
        want = expected_param(w, prefix, suffix, p)
        assert want is not None, f"{name}: no checkpoint tensor ({prefix}{suffix})"
        if p.dtype in (torch.uint8, torch.float8_e4m3fn):
            quantized[name] = p.dtype
        elif want.dtype.is_floating_point and want.dtype != torch.float8_e4m3fn:
            want = want.to(p.dtype)  # the fp32 router holds the checkpoint's bf16 gate upcast
        if p.dtype != want.dtype or tuple(p.shape) != tuple(want.shape) or not torch.equal(_bits(p.data), _bits(want)):
            wrong.append(f"{name}: {p.dtype} {list(p.shape)} vs {want.dtype} {list(want.shape)}")
    assert not wrong, "parameters not equal to the checkpoint:\n" + "\n".join(wrong)
    return quantized


def _method(module) -> str:
    return type(module.quant_method).__name__


def _build_and_load(ckpt, gpu, mp, w, draft_idx=None):
    """Built past the allow-list: on GPUs sglang-step35 refuses FP4 experts (no kernel keeps Step's
    clamp, see test_fp4_experts_are_refused_on_gpus_by_name), so the refusal is recorded instead of
    raised to check the load contract SGLang's methods define."""
    from sglang_step35 import served

    refused: list[str] = []
    with gpu(mp), mp.context() as m:
        m.setattr(served, "check", lambda setting, flags=served.FLAGS: refused.extend(served.refusals(setting, flags)))
        model, qc = build(ckpt, draft_idx=draft_idx)
    assert all(r.startswith(("nvfp4 experts", "mxfp4 experts")) for r in refused), refused
    assert model.cpu_dequant is None  # the GPU path: SGLang's quantization methods, no fallback
    model.load_weights(w.items())
    return model, qc


def _mtp_steps_bf16(ckpt, gpu, mp, w, n):
    """The three MTP steps build and load in BF16 (every export keeps them unquantized)."""
    for step in range(3):
        mtp, _ = _build_and_load(ckpt, gpu, mp, w, draft_idx=step)
        assert assert_every_param_written(mtp, w, mtp_name(n + step)) == {}
        assert _method(mtp.layer.self_attn.qkv_proj) == "UnquantizedLinearMethod"


def test_nvfp4_loads_under_sglangs_modelopt_fp4_methods_main_and_mtp(on_nvidia, ckpts):
    from sglang.srt.layers.quantization.modelopt_quant import ModelOptFp4Config

    ckpt = ckpts["nvfp4"]
    w = load_file(str(ckpt / "model.safetensors"))
    model, qc = _build_and_load(ckpt, nvidia_h100, on_nvidia, w)
    assert isinstance(qc, ModelOptFp4Config)
    quantized = assert_every_param_written(model, w, main_name)
    layers = model.model.layers
    assert _method(layers[3].moe.experts) == "ModelOptNvFp4FusedMoEMethod"
    for mod in (layers[0].self_attn.qkv_proj, layers[0].self_attn.g_proj, layers[1].mlp.gate_up_proj,
                layers[4].moe.share_expert.down_proj):
        assert _method(mod) == "ModelOptFp4LinearMethod"
    assert "model.layers.4.moe.experts.w13_weight" in quantized
    assert "model.layers.2.self_attn.g_proj.weight" in quantized  # g_proj quantized as ModelOpt exports it
    assert _method(model.lm_head) == "UnquantizedLinearMethod" and model.lm_head.weight.dtype == torch.bfloat16
    _mtp_steps_bf16(ckpt, nvidia_h100, on_nvidia, w, model.config.num_hidden_layers)


def test_modelopt_mixed_precision_builds_each_module_as_listed(on_nvidia, ckpts):
    from sglang.srt.layers.quantization.modelopt_quant import ModelOptMixedPrecisionConfig

    ckpt = ckpts["modelopt-mixed"]
    w = load_file(str(ckpt / "model.safetensors"))
    model, qc = _build_and_load(ckpt, nvidia_h100, on_nvidia, w)
    assert isinstance(qc, ModelOptMixedPrecisionConfig)
    assert_every_param_written(model, w, main_name)
    layers = model.model.layers
    want = {
        layers[0].self_attn.qkv_proj: "ModelOptFp8LinearMethod",  # listed FP8
        layers[1].self_attn.qkv_proj: "ModelOptFp4LinearMethod",  # listed NVFP4
        layers[2].self_attn.o_proj: "UnquantizedLinearMethod",  # not listed
        layers[2].self_attn.g_proj: "UnquantizedLinearMethod",
        layers[0].mlp.gate_up_proj: "UnquantizedLinearMethod",  # excluded by model.layers.0.mlp*
        layers[1].mlp.down_proj: "ModelOptFp4LinearMethod",
        layers[3].moe.share_expert.gate_up_proj: "ModelOptFp8LinearMethod",
        layers[3].moe.experts: "ModelOptNvFp4FusedMoEMethod",  # keyed model.layers.3.moe.gate_proj
        layers[4].moe.experts: "ModelOptNvFp4FusedMoEMethod",
    }
    got = {m: _method(m) for m in want}
    assert got == want
    _mtp_steps_bf16(ckpt, nvidia_h100, on_nvidia, w, model.config.num_hidden_layers)


def test_quark_mxfp4_loads_under_sglangs_quark_methods_main_and_mtp(ckpts):
    from sglang.srt.layers.quantization.quark.quark import QuarkConfig
    from sglang.srt.layers.quantization.quark.schemes import QuarkW4A4MXFP4, QuarkW4A4MXFp4MoE

    ckpt = ckpts["mxfp4"]
    w = load_file(str(ckpt / "model.safetensors"))
    with gpu_contract.gpu_like_build_state("rocm") as mp:
        model, qc = _build_and_load(ckpt, amd_mi300, mp, w)
        assert isinstance(qc, QuarkConfig)
        quantized = assert_every_param_written(model, w, main_name)
        layers = model.model.layers
        assert isinstance(layers[3].moe.experts.scheme, QuarkW4A4MXFp4MoE)
        assert isinstance(layers[0].self_attn.qkv_proj.scheme, QuarkW4A4MXFP4)
        assert isinstance(layers[4].moe.share_expert.gate_up_proj.scheme, QuarkW4A4MXFP4)
        assert quantized["model.layers.3.moe.experts.w13_weight_scale"] == torch.uint8
        assert _method(layers[2].self_attn.g_proj) == "UnquantizedLinearMethod"  # excluded, BF16
        _mtp_steps_bf16(ckpt, amd_mi300, mp, w, model.config.num_hidden_layers)


def test_sglangs_builtin_class_builds_mixed_precision_experts_unquantized(on_nvidia, ckpts):
    """The oracle's failure our class fixes: its MoE prefix never matches the checkpoint's
    `model.layers.N.moe.gate_proj` keys, so ModelOpt's per-layer lookup leaves the NVFP4 experts BF16
    and the packed uint8 tensors cannot load into them."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.weight_utils import get_quant_config
    from sglang.srt.models.step3p5 import Step3p5ForCausalLM as Builtin

    ckpt = ckpts["modelopt-mixed"]
    mc = ModelConfig(str(ckpt), dtype="bfloat16")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with nvidia_h100(on_nvidia):
            qc = get_quant_config(mc, LoadConfig(), getattr(Builtin, "packed_modules_mapping", {}))
            builtin = Builtin(mc.hf_config, qc)
    finally:
        torch.set_default_dtype(old)
    experts = builtin.model.layers[3].moe.experts
    assert _method(experts) == "UnquantizedFusedMoEMethod" and experts.w13_weight.dtype == torch.bfloat16
    # The packed [E, I, H/2] uint8 experts cannot fill [E, 2I, H] BF16 parameters (nor the packed
    # NVFP4 q/k/v of layer 1 its unquantized qkv_proj: no packed_modules_mapping): SGLang's linear
    # loader asserts on the shapes.
    w = load_file(str(ckpt / "model.safetensors"))
    with pytest.raises(AssertionError):
        builtin.load_weights(w.items())


def test_fp4_experts_are_refused_on_gpus_by_name(on_nvidia, ckpts):
    """No SGLang 0.5.23 FP4 MoE kernel is verified with Step's router, and none computes Step's clamp:
    building the NVFP4 model as on an H100 or the MXFP4 one as on an MI300X stops at the first MoE
    layer with the reason; a clamped layer names what its kernels do to the clamp; on a CPU NVFP4 and
    MXFP4 are served (dequantized at load)."""
    from sglang_step35 import served
    from sglang_step35.served import NotServedError

    generic = "experts run on SGLang's CUDA / CK FP4 kernels only"
    with nvidia_h100(on_nvidia), pytest.raises(NotServedError, match=f"^nvfp4 {generic}.*serve the BF16 or the block-FP8"):
        build(ckpts["nvfp4"])
    with gpu_contract.gpu_like_build_state("rocm") as mp, amd_mi300(mp), \
            pytest.raises(NotServedError, match=f"^mxfp4 {generic}"):
        build(ckpts["mxfp4"])
    clamped = {
        ("nvfp4", "nvidia"): "nvfp4 experts on the SwiGLU-clamped layers 43, 44: SGLang's ModelOpt NVFP4 MoE would "
                             "drop or change Step's min(silu(gate), L) * clamp(up, ±L) on every kernel it has — Marlin",
        ("mxfp4", "amd"): "mxfp4 experts on the SwiGLU-clamped layers 43, 44: SGLang's Quark MXFP4 MoE runs only on "
                          "AITER, which gets swiglu_limit 0 for Step's clamp",
        ("mxfp4", "nvidia"): f"mxfp4 {generic}",
        ("nvfp4", "amd"): f"nvfp4 {generic}",
    }
    for (quant, platform), head in clamped.items():
        why = served.refusals(served.Setting(platform, quant=quant, clamped_layers=(43, 44)))
        assert len(why) == 1 and why[0].startswith(head), why
    # On a CPU both are dequantized at load (below) and served (tests/test_quant_served.py).
    for quant in ("nvfp4", "mxfp4"):
        assert served.refusals(served.Setting("cpu", quant=quant, clamped_layers=(43, 44))) == [], quant


def _oracle_bf16(w: dict) -> dict:
    """The checkpoint's weights decoded by SGLang's own readers (NVFP4: `dequantize_nvfp4`; MXFP4: the
    Quark linear's `_dequant_mxfp4_to_bf16`, per expert; ModelOpt FP8: weight * per-tensor scale)."""
    from sglang.srt.layers.quantization.dequantization import dequantize_nvfp4
    from sglang.srt.layers.quantization.quark.schemes.quark_w4a4_mxfp4 import _dequant_mxfp4_to_bf16

    out = {}
    for k, t in w.items():
        base = k[: -len(".weight")] if k.endswith(".weight") else None
        if base is None or t.dtype not in (torch.uint8, torch.float8_e4m3fn):
            if not k.endswith(("_scale", "_scale_2")):
                out[k] = t
            continue
        s = w[base + ".weight_scale"]
        if t.dtype == torch.float8_e4m3fn:
            out[k] = (t.float() * s.float()).to(torch.bfloat16)
        elif s.dtype == torch.float8_e4m3fn:
            s2 = w[base + ".weight_scale_2"].float()
            out[k] = dequantize_nvfp4(t, s, s2.reshape(*s2.shape, 1, 1) if s2.dim() else s2)
        else:
            flat = [_dequant_mxfp4_to_bf16(q, sc) for q, sc in zip(t.reshape(-1, *t.shape[-2:]), s.reshape(-1, *s.shape[-2:]))]
            out[k] = torch.stack(flat).reshape(*t.shape[:-1], t.shape[-1] * 2)
    return out


@pytest.mark.parametrize("name", ["nvfp4", "modelopt-mixed", "mxfp4"])
def test_on_a_cpu_fp4_loads_dequantized_as_sglangs_readers_decode_it(ckpts, name):
    """The CPU path `sglang serve` takes: SGLang's methods cannot run, so the model is built in BF16
    and every FP4 / FP8 weight is dequantized while loading; each parameter equals what SGLang's own
    FP4 readers decode (up to one bf16 ulp: SGLang rounds block * global scale in fp32 first)."""
    gpu_contract.sglang_world_of_one()
    ckpt = ckpts[name]
    model, _ = gpu_contract.load_like_sglang(ckpt)
    assert model.cpu_dequant is not None
    w = _oracle_bf16(load_file(str(ckpt / "model.safetensors")))
    checked = 0
    for pname, p in model.named_parameters():
        prefix, suffix = main_name(pname)
        want = expected_param(w, prefix, suffix, p)
        assert want is not None, pname
        assert p.dtype in (torch.bfloat16, torch.float32), pname
        torch.testing.assert_close(p.data, want.to(p.dtype), rtol=2**-7, atol=0, msg=pname)  # one bf16 ulp
        checked += 1
    assert checked >= 60  # every parameter of the 5 main layers, embedding, norm, lm_head

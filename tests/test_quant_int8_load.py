"""W8A8-INT8 checkpoints load as on a GPU: SGLang's own `W8A8Int8Config` chooses each module's method.

Both exports of sglang_step35.quant.int8 (SGLang's `w8a8_int8` with stacked experts, and
compressed-tensors `int-quantized` with per-expert tensors, served with `--quantization w8a8_int8`)
are built the way SGLang's loader builds them (`ModelConfig` of the checkpoint directory,
`_get_quantization_config`, `_initialize_model`; our platform probe answers "cuda" so the CPU dequant
fallback is off; SGLang's capability check sees no device, as on an H100 it would pass), main model
and the three MTP steps, then loaded. Stops before `process_weights_after_loading` (on CPU SGLang's
W8A8-INT8 methods need AMX there). Every parameter must hold its checkpoint tensors bit for bit.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_step35.tiny import write_tiny_checkpoint

import gpu_contract
from gpu_contract import main_name, mtp_name

FUSED = gpu_contract.FUSED_CHECKPOINT_MODULES


@pytest.fixture(scope="module")
def gpu_like_build():
    with gpu_contract.gpu_like_build_state("cuda"):
        yield


@pytest.fixture(scope="module", params=["w8a8-int8", "w8a8-int8-ct"])
def int8_ckpt(request, tmp_path_factory):
    return request.param, write_tiny_checkpoint(tmp_path_factory.mktemp(request.param), seed=6, quant=request.param)


def build(ckpt, draft_idx=None, quantization="w8a8_int8"):
    """As gpu_contract.build_like_sglang, with SGLang's --quantization value."""
    return gpu_contract.build_like_sglang(ckpt, draft_idx=draft_idx, quantization=quantization)


def kept_bf16(ckpt, modules: list[str]) -> dict:
    """Rewrite an INT8 tiny so that `modules` (checkpoint names) are BF16 and listed in its
    quantization_config's ignore list, as exports that keep layers unquantized write them; returns
    the new tensors."""
    from sglang_step35.quant import int8

    w = dict(load_file(str(ckpt / "model.safetensors")))
    for k in modules:
        w[k + ".weight"] = int8.dequantize_channel(w[k + ".weight"], w.pop(k + ".weight_scale")).to(torch.bfloat16)
    save_file(w, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["ignore"] += modules
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    return w


def checkpoint_tensor(w: dict, prefix: str, module: str, leaf: str, experts: int) -> torch.Tensor:
    """`prefix + module + "." + leaf`, stacked from per-expert tensors where the export unrolled them."""
    name = f"{prefix}{module}.{leaf}"
    if name in w or not module.startswith("moe."):
        return w[name]
    return torch.stack([w[f"{prefix}{module.replace('moe.', f'moe.experts.{e}.', 1)}.{leaf}"] for e in range(experts)])


def expected(w: dict, prefix: str, suffix: str, experts: int) -> torch.Tensor:
    m = re.match(r"^(moe\.experts\.w13|moe\.experts\.w2)_(.+)$", suffix)
    module, leaf = (m.group(1), m.group(2)) if m else suffix.rsplit(".", 1)
    parts = [checkpoint_tensor(w, prefix, c, leaf, experts) for c in FUSED.get(module, [module])]
    return torch.cat(parts, dim=1 if module.startswith("moe.experts") else 0)


def assert_bit_exact(model, w: dict, map_name, experts: int) -> set[str]:
    """Every parameter equals its checkpoint tensors bit for bit; returns the INT8 parameters."""
    int8_params, wrong = set(), []
    for name, p in model.named_parameters():
        prefix, suffix = map_name(name)
        want = expected(w, prefix, suffix, experts)
        if p.dtype == torch.int8:
            int8_params.add(name)
        # bf16 scales of compressed-tensors exports widen exactly into SGLang's fp32 scale parameters.
        if want.dtype != p.dtype and not (want.dtype == torch.bfloat16 and p.dtype == torch.float32):
            wrong.append(f"{name}: {p.dtype} vs checkpoint {want.dtype}")
        elif not torch.equal(p.data, want.to(p.dtype)):
            wrong.append(name)
    assert not wrong, f"parameters not equal to the checkpoint: {wrong}"
    return int8_params


def test_int8_tiny_loads_bit_exact_under_sglangs_w8a8_int8_main_and_mtp(gpu_like_build, int8_ckpt):
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config, W8A8Int8LinearMethod, W8A8Int8MoEMethod

    name, ckpt = int8_ckpt
    w = load_file(str(ckpt / "model.safetensors"))
    model, qc = build(ckpt)
    assert isinstance(qc, W8A8Int8Config) and model.cpu_dequant is None
    model.load_weights(w.items())
    E = model.config.moe_num_experts
    got = assert_bit_exact(model, w, main_name, E)
    layer3 = model.model.layers[3]
    assert isinstance(layer3.moe.experts.quant_method, W8A8Int8MoEMethod)
    assert isinstance(layer3.moe.share_expert.gate_up_proj.quant_method, W8A8Int8LinearMethod)
    want = {f"model.layers.{i}.{m}" for i in range(5) for m in (
        "self_attn.qkv_proj.weight", "self_attn.o_proj.weight")}
    want |= {f"model.layers.{i}.mlp.{m}.weight" for i in range(2) for m in ("gate_up_proj", "down_proj")}
    want |= {f"model.layers.{i}.moe.{m}" for i in range(2, 5) for m in (
        "experts.w13_weight", "experts.w2_weight", "share_expert.gate_up_proj.weight", "share_expert.down_proj.weight")}
    if name == "w8a8-int8-ct":  # compressed-tensors quantizes every Linear it does not ignore: g_proj too
        want |= {f"model.layers.{i}.self_attn.g_proj.weight" for i in range(5)}
    assert got == want  # the router (moe.gate), embeddings and lm_head stay BF16 as the ignore list says
    n = model.config.num_hidden_layers
    for step in range(3):
        mtp, _ = build(ckpt, draft_idx=step)
        mtp.load_weights(w.items())
        assert assert_bit_exact(mtp, w, mtp_name(n + step), E) == set()  # MTP layers: BF16, ignored


def test_int8_load_names_missing_experts_misshaped_scales_and_wrong_precision(gpu_like_build, int8_ckpt):
    from sglang_step35.models.weights import Step35WeightError

    name, ckpt = int8_ckpt
    w = dict(load_file(str(ckpt / "model.safetensors")))
    down = ("model.layers.4.moe.experts.5.down_proj" if name == "w8a8-int8-ct" else "model.layers.4.moe.down_proj")
    del w[down + ".weight_scale"]
    w["model.layers.2.share_expert.up_proj.weight_scale"] = w["model.layers.2.share_expert.up_proj.weight_scale"][:7]
    q = "model.layers.0.self_attn.q_proj.weight"
    w[q] = w[q].to(torch.bfloat16)
    model, _ = build(ckpt)
    with pytest.raises(Step35WeightError) as e:
        model.load_weights(w.items())
    msg = str(e.value)
    assert f"{q}: bfloat16, but model.layers.0.self_attn.qkv_proj.weight is INT8" in msg
    assert "model.layers.2.share_expert.up_proj.weight_scale: expected [128, 1], got [7, 1]" in msg
    if name == "w8a8-int8-ct":
        assert "model.layers.4.moe.experts.{E}.down_proj.weight_scale: experts [5] missing" in msg
    else:
        assert "model.layers.4.moe.down_proj.weight_scale: expected [8, 128, 1]" in msg


def test_compressed_tensors_int8_without_the_w8a8_int8_flag_is_refused_by_name(gpu_like_build, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ct", seed=6, quant="w8a8-int8-ct")
    with pytest.raises(ValueError, match=r"implemented only for NPU.*--quantization w8a8_int8"):
        build(ckpt, quantization=None)


def test_int8_is_refused_on_rocm_by_name(gpu_like_build, tmp_path):
    # SGLang's W8A8Int8LinearMethod has its dense INT8 GEMM (sgl_kernel.int8_scaled_mm) on CUDA only.
    from sglang_step35.served import NotServedError

    ckpt = write_tiny_checkpoint(tmp_path / "int8", seed=6, quant="w8a8-int8")
    with gpu_contract.gpu_like_build_state("rocm"):
        with pytest.raises(NotServedError, match=r"w8a8-int8 experts.*int8_scaled_mm only on CUDA"):
            build(ckpt)


def test_compressed_tensors_int8_on_rocm_is_one_refusal_naming_the_checkpoint_to_serve(gpu_like_build, tmp_path):
    """On ROCm neither method serves a compressed-tensors INT8 checkpoint: SGLang's compressed-tensors INT8
    MoE is NPU-only and --quantization w8a8_int8's dense INT8 GEMM CUDA-only. One refusal says both, at
    launch (the policy step) and at construction, instead of sending the user to the flag first."""
    from types import SimpleNamespace

    from sglang_step35.launch.policy import Launch, quant_method_problems
    from sglang_step35.platform import Platform

    ckpt = write_tiny_checkpoint(tmp_path / "ct", seed=6, quant="w8a8-int8-ct")
    cfg = json.loads((ckpt / "config.json").read_text())
    both = r"implemented only for NPU.*no route on amd either: w8a8-int8 experts .*int8_scaled_mm only on CUDA.*" \
        r"serve the BF16 or the block-FP8"
    at_launch = quant_method_problems(Launch(SimpleNamespace(quantization=None), Platform("amd"), cfg))
    assert at_launch and re.search(both, at_launch), at_launch
    # NVIDIA keeps the one-flag fix (the flag serves it there).
    on_cuda = quant_method_problems(Launch(SimpleNamespace(quantization=None), Platform("nvidia", (9, 0)), cfg))
    assert "--quantization w8a8_int8" in on_cuda and "no route" not in on_cuda
    with gpu_contract.gpu_like_build_state("rocm"):
        with pytest.raises(ValueError, match=both):
            build(ckpt, quantization=None)


def test_ignore_list_naming_checkpoint_shards_keeps_the_fused_module_bf16(gpu_like_build, tmp_path):
    # An export that keeps layer 1's q/k/v and layer 0's gate/up in BF16 names them as the checkpoint
    # does; SGLang resolves our fused qkv_proj / gate_up_proj through the class's
    # packed_modules_mapping (without it the fused modules are built INT8 and the BF16 tensors refused).
    ckpt = write_tiny_checkpoint(tmp_path / "ct", seed=6, quant="w8a8-int8-ct")
    keep = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
            "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    w = kept_bf16(ckpt, keep)
    model, _ = build(ckpt)
    model.load_weights(w.items())
    got = assert_bit_exact(model, w, main_name, model.config.moe_num_experts)
    assert model.model.layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[0].mlp.gate_up_proj.weight.dtype == torch.bfloat16
    assert "model.layers.0.self_attn.qkv_proj.weight" in got and "model.layers.0.mlp.down_proj.weight" in got

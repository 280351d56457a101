"""Block-FP8 checkpoints load as on a GPU: SGLang's own `Fp8Config` chooses each module's method.

On a CPU without AMX our model builds unquantized and dequantizes at load (tests/test_weights_loading.py
serves that). That fallback hides the GPU contract: there `Fp8Config` stays active, SGLang's FP8 linear
and MoE methods create FP8 `weight` + fp32 `weight_scale_inv` parameters, `RadixAttention` gets
`k_scale`/`v_scale`, and the checkpoint's quantization_config decides which modules stay BF16. Here the
platform is faked as CUDA for our policy (so the fallback is off) and the models are built the way
SGLang's loader builds them (`_get_quantization_config` + `_initialize_model` from a ModelConfig of
the checkpoint directory; the draft with `is_draft_model` and each `draft_model_idx`), then loaded.
We stop before `process_weights_after_loading`: on CPU SGLang's FP8 methods assert AMX there.

Checks are bit-exact: every FP8 parameter holds exactly the checkpoint's FP8 bytes (fused q/k/v and
gate/up in their shard order, stacked experts per expert), every scale its checkpoint scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sglang_step35 import fp8
from sglang_step35.tiny import FP8_TINY_SPEC, TinySpec, write_tiny_checkpoint

import gpu_contract
from gpu_contract import main_name, mtp_name


@pytest.fixture(scope="module")
def gpu_like_build():
    """World-size-1 SGLang state; our platform probe answers "cuda" (SGLang's stays CPU)."""
    with gpu_contract.gpu_like_build_state("cuda"):
        yield


build = gpu_contract.build_like_sglang


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fp8-gpu"), seed=4, fp8=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t


def _same(param: torch.Tensor, want: torch.Tensor) -> bool:
    return param.dtype == want.dtype and torch.equal(_bits(param.data), _bits(want))


def expected_param(w: dict, prefix: str, suffix: str) -> torch.Tensor | None:
    """What our parameter `prefix + suffix` must hold, rebuilt from checkpoint tensors `w`."""
    scale = suffix.endswith(fp8.SCALE_SUFFIX)
    s = fp8.SCALE_SUFFIX if scale else ""
    base = suffix.removesuffix(s)
    cat = {
        "self_attn.qkv_proj.weight": ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"],
        "mlp.gate_up_proj.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "moe.share_expert.gate_up_proj.weight": ["share_expert.gate_proj.weight", "share_expert.up_proj.weight"],
        "moe.share_expert.down_proj.weight": ["share_expert.down_proj.weight"],
        "moe.experts.w13_weight": ["moe.gate_proj.weight", "moe.up_proj.weight"],
        "moe.experts.w2_weight": ["moe.down_proj.weight"],
    }.get(base, [base])
    parts = [w.get(prefix + c + s) for c in cat]
    if any(p is None for p in parts):
        return None
    dim = 1 if base.startswith("moe.experts.") else 0  # stacked experts: [E, N, K]
    return torch.cat(parts, dim=dim)


def assert_every_param_written(model, w: dict, map_name) -> list[str]:
    """Every parameter equals its checkpoint tensors bit for bit; returns the FP8 parameter names."""
    fp8_params, wrong = [], []
    for name, p in model.named_parameters():
        if getattr(p, "_skip_weight_check", False):
            # SGLang's "not loaded" sentinel (BaseKVCacheMethod: -1, made 1.0 after loading).
            assert torch.all(p.data == -1.0), f"{name}: kv scale changed without a checkpoint scale"
            continue
        prefix, suffix = map_name(name)
        want = expected_param(w, prefix, suffix)
        assert want is not None, f"{name}: no checkpoint tensor ({prefix}{suffix})"
        if p.dtype == fp8.FP8_DTYPE:
            fp8_params.append(name)
        if not _same(p, want.to(p.dtype) if p.dtype != fp8.FP8_DTYPE and want.dtype != fp8.FP8_DTYPE else want):
            wrong.append(name)
    assert not wrong, f"parameters not equal to the checkpoint: {wrong}"
    return fp8_params


def test_fp8_tiny_loads_under_sglangs_fp8config_main_and_mtp(gpu_like_build, fp8_ckpt):
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod, Fp8MoEMethod

    w = load_file(str(fp8_ckpt / "model.safetensors"))
    model, qc = build(fp8_ckpt)
    assert isinstance(qc, Fp8Config) and model.cpu_dequant is None  # the GPU path, no fallback
    model.load_weights(w.items())
    fp8_params = assert_every_param_written(model, w, main_name)
    # What is FP8 follows the checkpoint: attention and MLP projections, shared and routed experts.
    layer4 = model.model.layers[4]
    assert isinstance(layer4.moe.experts.quant_method, Fp8MoEMethod)
    assert isinstance(layer4.moe.share_expert.gate_up_proj.quant_method, Fp8LinearMethod)
    assert "model.layers.4.moe.experts.w13_weight" in fp8_params
    assert "model.layers.0.self_attn.qkv_proj.weight" in fp8_params
    assert model.model.layers[0].self_attn.g_proj.weight.dtype == torch.bfloat16
    n = model.config.num_hidden_layers
    for step in range(3):
        mtp, _ = build(fp8_ckpt, draft_idx=step)
        mtp.load_weights(w.items())
        got = assert_every_param_written(mtp, w, mtp_name(n + step))
        assert "layer.self_attn.qkv_proj.weight" in got and "layer.mlp.down_proj.weight" in got


def _keep_bf16(src: Path, dst: Path, keep: list[str]) -> Path:
    """A copy of the FP8 checkpoint whose modules under `keep` (checkpoint names) are stored in BF16
    (dequantized, scales dropped) and listed in quantization_config.modules_to_not_convert."""
    import shutil

    shutil.copytree(src, dst)
    w = load_file(str(src / "model.safetensors"))
    out = {}
    for name, t in w.items():
        kept = any(name.startswith(k + ".") for k in keep)
        if kept and name.endswith(fp8.SCALE_SUFFIX):
            continue
        if kept and t.dtype == fp8.FP8_DTYPE:
            t = fp8.dequantize_block(t, w[name + fp8.SCALE_SUFFIX], torch.bfloat16)
        out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = keep
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def test_modules_the_quantization_config_keeps_in_bf16_load_as_bf16(gpu_like_build, fp8_ckpt, tmp_path):
    # The shared expert of one MoE layer, one dense layer's attention, and the first MTP layer.
    keep = ["model.layers.3.share_expert", "model.layers.1.self_attn", "model.layers.5"]
    ckpt = _keep_bf16(fp8_ckpt, tmp_path / "mixed", keep)
    w = load_file(str(ckpt / "model.safetensors"))
    model, _ = build(ckpt)
    model.load_weights(w.items())
    fp8_params = assert_every_param_written(model, w, main_name)
    layers = model.model.layers
    assert layers[3].moe.share_expert.gate_up_proj.weight.dtype == torch.bfloat16
    assert layers[3].moe.experts.w13_weight.dtype == fp8.FP8_DTYPE  # the routed experts stay FP8
    assert layers[1].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    assert "model.layers.1.mlp.gate_up_proj.weight" in fp8_params
    mtp0, _ = build(ckpt, draft_idx=0)
    mtp0.load_weights(w.items())
    assert not assert_every_param_written(mtp0, w, mtp_name(5))  # all BF16
    mtp1, _ = build(ckpt, draft_idx=1)
    mtp1.load_weights(w.items())
    assert assert_every_param_written(mtp1, w, mtp_name(6))


def test_wrong_precision_missing_scale_and_stray_scale_are_named(gpu_like_build, fp8_ckpt):
    from sglang_step35.models.weights import Step35WeightError

    w = load_file(str(fp8_ckpt / "model.safetensors"))
    bad = dict(w)
    q = "model.layers.0.self_attn.q_proj.weight"
    bad[q] = fp8.dequantize_block(w[q], w[q + fp8.SCALE_SUFFIX], torch.bfloat16)  # BF16 where FP8 is built
    del bad["model.layers.4.moe.down_proj.weight_scale_inv"]
    bad["model.layers.2.self_attn.g_proj.weight_scale_inv"] = torch.ones(1, 1)  # g_proj is never quantized
    model, _ = build(fp8_ckpt)
    with pytest.raises(Step35WeightError) as e:
        model.load_weights(bad.items())
    msg = str(e.value)
    assert f"{q}: bfloat16, but model.layers.0.self_attn.qkv_proj.weight is FP8" in msg
    assert "modules_to_not_convert" in msg
    assert "model.layers.4.moe.down_proj.weight_scale_inv: expected [8, 1, 1]" in msg
    assert "model.layers.2.self_attn.g_proj.weight_scale_inv" in msg.split("unexpected tensors")[1]


def test_checkpoint_kv_scales_load_into_radix_attention(gpu_like_build, fp8_ckpt):
    w = load_file(str(fp8_ckpt / "model.safetensors"))
    w = dict(w, **{"model.layers.2.self_attn.k_proj.k_scale": torch.tensor(0.25),
                   "model.layers.2.self_attn.v_proj.v_scale": torch.tensor(0.5)})
    model, _ = build(fp8_ckpt)
    model.load_weights(w.items())
    attn = model.model.layers[2].self_attn.attn
    assert float(attn.k_scale) == 0.25 and float(attn.v_scale) == 0.5
    assert float(model.model.layers[1].self_attn.attn.k_scale) == -1.0  # not in the checkpoint: SGLang's default


def test_fp8_tiny_builder_refuses_partial_blocks(tmp_path):
    # The default tiny widths (64) are not whole 128-blocks: such an FP8 checkpoint could never be
    # built by SGLang's Fp8Config on a GPU, so the builder refuses it and names the tensors.
    with pytest.raises(ValueError, match=r"not whole 128x128 blocks.*self_attn\.q_proj\.weight \[64, 64\]"):
        write_tiny_checkpoint(tmp_path / "bad", spec=TinySpec(), fp8=True)
    assert FP8_TINY_SPEC.hidden_size % 128 == 0

"""An FP8 checkpoint's k/v scales reach every RadixAttention, the MTP draft layers' included.

Under SGLang's `Fp8Config` each RadixAttention owns `k_scale` / `v_scale` (SGLang's BaseKVCacheMethod;
-1 = "not in the checkpoint"). Checkpoints name them in several ways, which SGLang's
`maybe_remap_kv_scale_name` maps onto `<...>.self_attn.attn.k_scale`: `self_attn.k_proj.k_scale`
(modelopt), `self_attn.k_scale` (compressed-tensors), and SGLang's own name. Step3p5MTP's parameters
are named `layer.self_attn.attn.k_scale`, not by their checkpoint layer (45-47 in Step-3.5-Flash), so
the remap must be matched in the checkpoint's naming, then mapped onto the draft's parameters.

Models are built as SGLang's loader builds them on a GPU (tests/gpu_contract.py `build_like_sglang`,
our platform probe answering "cuda", as in tests/test_fp8_gpu_load.py), then loaded.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sglang_step35.tiny import write_tiny_checkpoint

import gpu_contract


@pytest.fixture(scope="module")
def gpu_like_build():
    """World-size-1 SGLang state; our platform probe answers "cuda" (SGLang's stays CPU)."""
    with gpu_contract.gpu_like_build_state("cuda"):
        yield


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fp8-kv"), seed=5, fp8=True)


def _scale(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _with_kv_scales(w: dict, n: int) -> tuple[dict, dict]:
    """The checkpoint plus k/v scales on main layers 0-2 and on MTP layers n..n+2, each of the three
    in another naming form; returns (weights, {layer: (k, v)})."""
    forms = [
        ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"),  # modelopt
        ("self_attn.k_scale", "self_attn.v_scale"),  # compressed-tensors
        ("self_attn.attn.k_scale", "self_attn.attn.v_scale"),  # SGLang's parameter name
    ]
    want, extra = {}, {}
    for j, layer in enumerate([0, 1, 2, n, n + 1, n + 2]):
        k_name, v_name = forms[j % len(forms)]
        want[layer] = (0.125 * (j + 1), 0.0625 * (j + 3))
        extra[f"model.layers.{layer}.{k_name}"] = _scale(want[layer][0])
        extra[f"model.layers.{layer}.{v_name}"] = _scale(want[layer][1])
    # An MTP layer stored with its decoder nested under `transformer.` (handled by Step3p5MTP).
    nested = f"model.layers.{n + 2}."
    for name in [k for k in extra if k.startswith(nested)]:
        extra[nested + "transformer." + name[len(nested):]] = extra.pop(name)
    return {**w, **extra}, want


def test_mtp_layers_load_their_kv_scales(gpu_like_build, fp8_ckpt):
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    w = load_file(str(fp8_ckpt / "model.safetensors"))
    model, qc = gpu_contract.build_like_sglang(fp8_ckpt)
    assert isinstance(qc, Fp8Config)
    n = model.config.num_hidden_layers
    weights, want = _with_kv_scales(w, n)

    model.load_weights(weights.items())
    for layer in (0, 1, 2):
        attn = model.model.layers[layer].self_attn.attn
        assert (float(attn.k_scale), float(attn.v_scale)) == want[layer]
    assert float(model.model.layers[3].self_attn.attn.k_scale) == -1.0  # none in the checkpoint

    for step in range(3):
        mtp, _ = gpu_contract.build_like_sglang(fp8_ckpt, draft_idx=step)
        attn = mtp.layer.self_attn.attn
        assert float(attn.k_scale) == -1.0  # SGLang's "not loaded" sentinel before loading
        mtp.load_weights(weights.items())
        assert (float(attn.k_scale), float(attn.v_scale)) == want[n + step], f"MTP step {step}"


def test_a_kv_scale_for_no_attention_is_still_named(gpu_like_build, fp8_ckpt):
    from sglang_step35.models.weights import Step35WeightError

    w = load_file(str(fp8_ckpt / "model.safetensors"))
    model, _ = gpu_contract.build_like_sglang(fp8_ckpt)
    n = model.config.num_hidden_layers
    stray = f"model.layers.{n}.mlp.down_proj.k_scale"
    mtp, _ = gpu_contract.build_like_sglang(fp8_ckpt, draft_idx=0)
    with pytest.raises(Step35WeightError, match=f"unexpected tensors.*\\n  {stray.replace('.', '[.]')}"):
        mtp.load_weights({**w, stray: _scale(0.5)}.items())


def test_cpu_fp8_fallback_ignores_kv_scales_of_its_unquantized_attention(gpu_like_build, fp8_ckpt, caplog):
    # On a CPU without AMX the model is built unquantized and dequantized at load
    # (models/weights.py): its attention has no FP8 KV scales, so the checkpoint's are not used.
    w = load_file(str(fp8_ckpt / "model.safetensors"))
    with pytest.MonkeyPatch.context() as mp:
        gpu_contract.fake_platform_probe(mp, "cpu")
        model, _ = gpu_contract.build_like_sglang(fp8_ckpt)
        mtp, _ = gpu_contract.build_like_sglang(fp8_ckpt, draft_idx=1)
    if model.cpu_dequant is None:
        pytest.skip("this CPU has AMX: SGLang's FP8 methods run, no fallback")
    assert not any(name.endswith("_scale") for name, _ in mtp.named_parameters())
    weights, _ = _with_kv_scales(w, model.config.num_hidden_layers)
    model.load_weights(weights.items())
    mtp.load_weights(weights.items())
    assert "k/v scales ignored" in caplog.text
    # A scale that names no attention is still an error.
    from sglang_step35.models.weights import Step35WeightError

    with pytest.raises(Step35WeightError, match=r"model\.layers\.6\.mlp\.down_proj\.k_scale"):
        mtp.load_weights({**weights, "model.layers.6.mlp.down_proj.k_scale": _scale(0.5)}.items())

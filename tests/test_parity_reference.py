"""Server-free checks of the parity oracle (tests/reference) and of the math the served tests rely on:
the reference's llama3 rope against transformers' independent implementation, the sliding-window
boundary, the MTP chain and block-FP8 quantization. Tensor, expert and pipeline parallel are checked
served (tests/test_parallel_served.py), not on a re-implementation of the sharding.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reference import Step35Reference, llama3_inv_freq, rope_inv_freq
from sglang_step35 import fp8
from sglang_step35.tiny import FP8_TINY_SPEC, write_tiny_checkpoint

REAL_SCALING = {"rope_type": "llama3", "factor": 2.0, "original_max_position_embeddings": 131072,
                "low_freq_factor": 1.0, "high_freq_factor": 32.0}  # Step-3.5-Flash's config.json


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ref-default"), seed=0)


@pytest.fixture(scope="module")
def ref(ckpt):
    return Step35Reference(ckpt)


TOKENS = [(37 * i + 11) % 1000 + 20 for i in range(50)]


# --- rotary ------------------------------------------------------------------------------------------
def test_llama3_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    params = {**REAL_SCALING, "rope_theta": 5e6, "partial_rotary_factor": 0.5}
    cfg = LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128, max_position_embeddings=262144,
                      rope_parameters=params)
    theirs, _ = _compute_llama3_parameters(cfg, "cpu")
    ours = llama3_inv_freq(rope_inv_freq(64, 5e6), REAL_SCALING)
    assert torch.allclose(theirs.double(), ours, rtol=1e-6)
    ratio = ours / rope_inv_freq(64, 5e6)
    # All three regimes occur at Step-3.5-Flash's settings: kept, blended, divided by the factor.
    assert ratio[0] == 1.0 and ratio[-1] == 0.5 and ((ratio > 0.5) & (ratio < 1.0)).any()


def test_scaling_only_on_full_layers(ref):
    for i in range(ref.n_layers):
        head_dim = ref.heads(i)[2]
        partial = ref.cfg["partial_rotary_factors"][i]
        plain = rope_inv_freq(int(head_dim * partial), ref.cfg["rope_theta"][i])
        if ref.is_sliding(i):
            assert torch.equal(ref.inv_freq(i), plain)
        else:
            assert not torch.equal(ref.inv_freq(i), plain)  # the tiny config's scaling bites too


# --- the window boundary -----------------------------------------------------------------------------
def test_sliding_window_counts_the_current_key(ref):
    """Sliding layer 1 with window W: position p must not depend on token p - W (it sees p-W+1 .. p)
    but must depend on token p - W + 1."""
    assert ref.is_sliding(1)
    W, p = ref.window, 25
    positions = torch.arange(30)

    def attn_at_p(tokens):
        return ref.attention(1, ref.embed(tokens), positions)[p]

    base = list(TOKENS[:30])
    far, near = list(base), list(base)
    far[p - W] = 5
    near[p - W + 1] = 5
    assert torch.equal(attn_at_p(far), attn_at_p(base))
    assert not torch.allclose(attn_at_p(near), attn_at_p(base))


# --- MTP ---------------------------------------------------------------------------------------------
def test_mtp_chain_uses_its_own_layers(ckpt, ref):
    out = ref.mtp_chain_logits(TOKENS[:12])
    assert [o.shape[0] for o in out] == [11, 10, 9] and out[0].shape[1] == ref.cfg["vocab_size"]
    # Perturbing MTP layer 1's weights changes layer 1's logits and leaves layer 0's untouched.
    w = load_file(str(ckpt / "model.safetensors"))
    w[f"model.layers.{ref.n_layers + 1}.eh_proj.weight"] = w[f"model.layers.{ref.n_layers + 1}.eh_proj.weight"] * 2
    out2 = Step35Reference(ckpt, weights=w).mtp_chain_logits(TOKENS[:12])
    assert torch.equal(out[0], out2[0]) and not torch.allclose(out[1], out2[1])


# --- FP8 ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 64), (300, 130), (3, 256, 384), (4, 32, 64)])
def test_fp8_block_roundtrip_error_bound(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 0.1
    w[..., :5, :7] *= 40  # one hot block: its scale must not leak into the others
    q, s = fp8.quantize_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and s.shape == fp8.scale_shape(shape)
    deq = fp8.dequantize_block(q, s, torch.float32)
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals; subnormals step scale * 2^-9.
    s_full = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., : shape[-2], : shape[-1]]
    assert ((deq - w).abs() <= w.abs() * 2**-4 + s_full * 2**-9).all()
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        fp8.dequantize_block(q, s[..., :1, :], torch.float32) if s.shape[-2] > 1 else fp8.dequantize_block(
            q, torch.ones(*s.shape[:-2], 2, 2), torch.float32)


def test_fp8_checkpoint_layout_and_closeness(tmp_path):
    bf16_dir = write_tiny_checkpoint(tmp_path / "bf16", seed=0, spec=FP8_TINY_SPEC)  # the --fp8 sizes
    fp8_dir = write_tiny_checkpoint(tmp_path / "fp8", seed=0, fp8=True)
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    w = load_file(str(fp8_dir / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.self_attn.g_proj.weight",
                 "model.layers.4.moe.gate.weight", "model.layers.5.eh_proj.weight"):
        assert w[name].dtype == torch.bfloat16 and name + "_scale_inv" not in w
    assert w["model.layers.4.moe.router_bias"].dtype == torch.float32
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.4.moe.gate_proj.weight", "model.layers.4.share_expert.up_proj.weight"):
        assert w[name].dtype == torch.float8_e4m3fn
        assert tuple(w[name + "_scale_inv"].shape) == fp8.scale_shape(w[name].shape)
    deq = fp8.dequantize_checkpoint(w)
    a = Step35Reference(fp8_dir, weights=deq).logprobs(TOKENS)
    b = Step35Reference(bf16_dir).logprobs(TOKENS)
    # FP8 (3 mantissa bits, one scale per 128x128 block) moves a flat random model's distributions a
    # little: measured (seeds 0, 5) mean KL 0.008-0.009, median 0.002-0.003, mean |Δlogprob| 0.07-0.08;
    # the max over positions (0.15-0.17) is one or two positions where a near-tie in the top-2
    # expert choice flips. Ignoring the scales breaks it (mean KL ~0.85).
    kl = fp8_kl(b, a)
    assert kl.mean() < FP8_MEAN_KL_TOL and kl.max() < FP8_KL_TOL and (a - b).abs().mean() < FP8_MEAN_TOL
    no_scale = {k: (v.to(torch.bfloat16) if v.dtype == torch.float8_e4m3fn else v) for k, v in w.items()}
    c = Step35Reference(fp8_dir, weights=no_scale).logprobs(TOKENS)
    assert fp8_kl(b, c).mean() > 20 * FP8_MEAN_KL_TOL and (c - b).abs().mean() > 4 * FP8_MEAN_TOL


FP8_MEAN_KL_TOL = 0.02  # mean over positions of KL(bf16 || fp8)
FP8_KL_TOL = 0.25  # max over positions (a routing flip at a near-tie moves one position)
FP8_MEAN_TOL = 0.1  # mean |Δlogprob| over positions x vocab


def fp8_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)

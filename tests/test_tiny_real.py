"""`step35 tiny OUT --real-width`: Step-3.5-Flash's real widths at reduced depth, checked on CPU at a
reduced expert count (names, shapes and per-layer settings equal the real config's for the kept layers)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.config import layer_spec, read_config, validate
from sglang_step35.fp8 import FP8_DTYPE, dequantize_block
from sglang_step35.tiny_real import (
    CPU_SHRINK,
    _random,
    _std,
    checkpoint_bytes,
    generate_group,
    layer_groups,
    real_width_config,
    write_config_variant,
    write_real_width_checkpoint,
    zero_clamps,
)

EXPERTS = 4  # real widths everywhere else (hidden 4096, vocab 128,896, experts of 1280)


def _header_shapes(d):
    """name -> (shape, dtype) from the shard headers, without reading tensor data."""
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for f in sorted(set(index.values())):
        with open(d / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        out.update({k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"})
    return out


def test_default_selection_matches_the_real_layers_and_fits_one_gpu():
    real = read_config()
    cfg, src = real_width_config()
    assert src == [0, 1, 2, 3, 4, 44, 45, 46, 47]
    validate(cfg)
    size = checkpoint_bytes(cfg)
    assert 30e9 < size < 40e9, size / 1e9  # < 40 GB in BF16 (issue 15), most of it the 3 MoE layers
    # every width is the real one
    for key in ("hidden_size", "intermediate_size", "vocab_size", "num_attention_heads", "num_attention_groups",
                "head_dim", "moe_num_experts", "moe_top_k", "moe_intermediate_size", "share_expert_dim",
                "sliding_window", "rope_scaling", "attention_other_setting", "moe_router_scaling_factor"):
        assert cfg[key] == real[key], key
    assert cfg["num_hidden_layers"] == 6 and cfg["moe_layers_enum"] == "3,4,5"
    for j, i in enumerate(src):  # per-layer settings are those of the source layer
        assert layer_spec(cfg, j) == dataclasses.replace(layer_spec(real, i), index=j), j
    clamped = layer_spec(cfg, 5)
    assert (clamped.swiglu_limit, clamped.swiglu_limit_shared, clamped.is_moe) == (7.0, 16.0, True)
    assert [layer_spec(cfg, j).num_heads for j in range(6)] == [64, 96, 96, 96, 64, 64]
    one_more, _ = real_width_config(moe_layers=4)
    # one more MoE layer (real 5, sliding): 288 x 3 x 1280 x 4096 x 2 B of experts + its attention
    assert 9.0e9 < checkpoint_bytes(one_more) - size < 9.5e9
    with pytest.raises(ValueError, match="--moe-layers"):
        real_width_config(moe_layers=0)


@pytest.fixture(scope="module")
def real_width_groups():
    """Two real-width layer groups generated in memory at EXPERTS experts (a whole real-width
    checkpoint is > 9 GB even at 2 experts: its five 128,896 x 4096 vocabulary matrices): real layer
    44 (clamped MoE, full attention) and real layer 1 (sliding, dense)."""
    cfg, src = real_width_config(moe_layers=2, experts=EXPERTS)
    groups = dict(layer_groups(cfg))
    w = {}
    for j in (1, 4):
        w.update(generate_group(cfg, groups[f"model-layer-{j:02d}"], seed=1, device=torch.device("cpu")))
    return cfg, src, w


def test_real_width_layers_at_reduced_experts(real_width_groups):
    cfg, src, w = real_width_groups
    real = read_config()
    validate(cfg)
    assert src == [0, 1, 2, 3, 44, 45, 46, 47]
    assert cfg["moe_num_experts"] == EXPERTS and cfg["moe_top_k"] == EXPERTS
    shapes = checkpoint_shapes(cfg)
    assert {k: tuple(v.shape) for k, v in w.items()} == {k: shapes[k] for k in w}
    assert shapes["model.embed_tokens.weight"] == (128896, 4096)
    assert w["model.layers.4.moe.gate_proj.weight"].shape == (EXPERTS, 1280, 4096)
    assert w["model.layers.1.self_attn.q_proj.weight"].shape == (96 * 128, 4096)  # sliding: 96 heads
    assert w["model.layers.4.self_attn.q_proj.weight"].shape == (64 * 128, 4096)  # real 44 is a full layer
    assert w["model.layers.1.mlp.gate_proj.weight"].shape == (11264, 4096)
    assert w["model.layers.4.moe.router_bias"].dtype == torch.float32
    assert {v.dtype for k, v in w.items() if not k.endswith("router_bias")} == {torch.bfloat16}
    for j, i in enumerate(src):
        for key in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
            assert cfg[key][j] == real[key][i], (key, j, i)
    assert len(cfg["layer_types"]) == cfg["num_hidden_layers"] + 3


def test_weights_keep_activations_in_range_and_the_clamp_clips(real_width_groups):
    cfg, _, w = real_width_groups
    H = 4096
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.rms_norm(torch.randn(64, H, generator=g), (H,))  # a normed layer input
    q = x @ w["model.layers.1.self_attn.q_proj.weight"].float().t()
    assert 0.8 < float(q.std()) < 1.25  # projections into a layer: unit variance at the real fan-in
    head = _random("lm_head.weight", (2048, H), _std(cfg, "lm_head.weight", (128896, H)), 0, torch.device("cpu"))
    assert 3.0 < float((x @ head.float().t()).std()) < 5.0  # clear argmaxes over 128k tokens
    # the clamped layer (4 <- real 44): routed |up| exceeds its limit 7 often; an unclamped layer's never
    up = x @ w["model.layers.4.moe.up_proj.weight"][0].float().t()
    frac = float((up.abs() > 7.0).float().mean())
    assert 0.03 < frac < 0.2, frac
    dense_up = x @ w["model.layers.1.mlp.up_proj.weight"].float().t()
    assert float((dense_up.abs() > 7.0).float().mean()) == 0.0
    # and what it adds back to the residual stays O(MIX)
    gate = x @ w["model.layers.4.moe.gate_proj.weight"][0].float().t()
    act = torch.nn.functional.silu(gate).clamp(max=7.0) * up.clamp(-7.0, 7.0)
    y = act @ w["model.layers.4.moe.down_proj.weight"][0].float().t()
    assert 0.01 < float(y.std()) < 0.5


@pytest.fixture(scope="module")
def shrunk_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shrunk")
    info = write_real_width_checkpoint(root / "bf16", moe_layers=2, shrink=CPU_SHRINK, seed=1, fp8_out=root / "fp8",
                                       device="cpu")
    return root / "bf16", root / "fp8", info


def test_written_checkpoint_layout(shrunk_dirs):
    bf16_dir, _, info = shrunk_dirs
    cfg = json.loads((bf16_dir / "config.json").read_text())
    validate(cfg)
    assert info["source_layers"] == [0, 1, 2, 3, 44, 45, 46, 47]
    shapes = _header_shapes(bf16_dir)
    assert {k: s for k, (s, _) in shapes.items()} == checkpoint_shapes(cfg)
    assert shapes["model.layers.4.moe.router_bias"][1] == "F32"
    assert len(list(bf16_dir.glob("*.safetensors"))) == 9  # one shard per layer + embeddings/heads
    assert json.loads((bf16_dir / "tiny_real.json").read_text())["bytes"] == checkpoint_bytes(cfg)
    # MTP wiring: each MTP layer drafts from the next token's embedding through the main head
    with safe_open(str(bf16_dir / "model-embed-head.safetensors"), "pt") as f:
        head, norm = f.get_tensor("lm_head.weight"), f.get_tensor("model.norm.weight")
    H = cfg["hidden_size"]
    for j in (5, 6, 7):
        with safe_open(str(bf16_dir / f"model-layer-{j:02d}.safetensors"), "pt") as f:
            eh = f.get_tensor(f"model.layers.{j}.eh_proj.weight").float()
            assert torch.equal(f.get_tensor(f"model.layers.{j}.shared_head.output.weight"), head)
            assert torch.equal(f.get_tensor(f"model.layers.{j}.shared_head.norm.weight"), norm)
        assert torch.equal(eh[:, :H], torch.eye(H)) and not eh[:, H:].any()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bf16_dir))
    assert len(tok) <= cfg["vocab_size"] and tok.convert_tokens_to_ids("</think>") < len(tok)


def test_fp8_copy_is_the_same_weights_quantized(shrunk_dirs):
    bf16_dir, fp8_dir, _ = shrunk_dirs
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert (fp8_dir / "model-embed-head.safetensors").is_symlink()  # nothing to quantize: linked
    assert _header_shapes(fp8_dir).keys() >= _header_shapes(bf16_dir).keys()
    with safe_open(str(fp8_dir / "model-layer-04.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.4.moe.down_proj.weight")
        s = f.get_tensor("model.layers.4.moe.down_proj.weight_scale_inv")
    with safe_open(str(bf16_dir / "model-layer-04.safetensors"), "pt") as f:
        ref = f.get_tensor("model.layers.4.moe.down_proj.weight").float()
    assert q.dtype == FP8_DTYPE and tuple(s.shape) == (8, 1, 1)
    err = (dequantize_block(q, s).float() - ref).abs().max() / ref.abs().max()
    assert 0 < err < 0.07  # e4m3: 3 mantissa bits


def test_same_seed_same_bytes(tmp_path):
    a = write_real_width_checkpoint(tmp_path / "a", moe_layers=1, shrink=CPU_SHRINK, seed=2, device="cpu")
    write_real_width_checkpoint(tmp_path / "b", moe_layers=1, shrink=CPU_SHRINK, seed=2, device="cpu")
    write_real_width_checkpoint(tmp_path / "c", moe_layers=1, shrink=CPU_SHRINK, seed=3, device="cpu")
    assert a["source_layers"] == [0, 1, 2, 44, 45, 46, 47]
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
    assert (tmp_path / "a" / "model-layer-03.safetensors").read_bytes() != (tmp_path / "c" / "model-layer-03.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["vocab_size"] == 2048 and cfg["swiglu_limits"][3] == 7.0
    z = write_config_variant(tmp_path / "a", tmp_path / "z", zero_clamps)
    zc = json.loads((z / "config.json").read_text())
    assert not any(zc["swiglu_limits"]) and not any(zc["swiglu_limits_shared"])
    assert (z / "model-layer-03.safetensors").resolve() == (tmp_path / "a" / "model-layer-03.safetensors").resolve()


def test_cli_real_width_flags(tmp_path):
    out = tmp_path / "rw"
    r = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(out), "--real-width",
                        "--moe-layers", "2", "--experts", "4", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "from the real model's layers [0, 1, 2, 3, 44, 45, 46, 47]" in r.stdout
    cfg, _ = real_width_config(moe_layers=2, experts=4)
    assert f"{checkpoint_bytes(cfg) / 1e9:.1f} GB in BF16" in r.stdout and not out.exists()
    bad = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(tmp_path / "x"), "--moe-layers", "2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--real-width" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "sglang_step35.cli", "tiny", str(tmp_path / "x"), "--real-width",
                          "--moe-layers", "99", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--moe-layers must be in 1..42" in bad.stderr

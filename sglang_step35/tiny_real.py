"""Real-width Step-3.5 checkpoints at reduced depth: `step35 tiny OUT --real-width`.

Widths, head counts, vocabulary, experts, rope, window and SwiGLU limits are read from the shipped
Step-3.5-Flash config (`data/step3p5_flash_config.json`); only the depth is cut. The kept layers are
real layers of that config, renumbered in order, each with *its own* per-layer settings (type, rope
theta, partial rotary, SwiGLU limits):

    the dense layers (0, 1, 2)  +  the first `moe_layers - 1` unclamped MoE layers (3, 4, ...)
    +  layer 44 (routed limit 7, shared limit 16: clamped like 43/44)  +  the 3 MTP layers (45-47)

`--moe-layers 3` (the default) keeps 0, 1, 2, 3, 4, 44 and is about 38 GB in BF16, so one 141 GB
GPU holds it with room for KV; every MoE layer adds 9.1 GB (288 experts of 1280 x 4096 x 3). The
tensors are those of `sglang_step35.checkpoint.checkpoint_shapes` (the real layout), written one
shard per layer as each is generated (on the GPU when there is one), with a safetensors index.

Random weights, scaled by fan-in so activations stay O(1) at any width: projections into a
layer have std 1/sqrt(fan_in); the projections back into the residual stream (o_proj, down_proj)
are scaled by MIX, so the residual stays mostly the token's embedding (as in
tests/mtp_checkpoint.py) and the MTP layers are wired to predict from it (eh_proj = [I, 0], their
head = the main head): drafts are then often accepted, so MTP's accept paths run. The clamped layer's
expert inputs are scaled up (CLAMP_GAIN) so its limits really clip. Each tensor has its own
generator seeded by (seed, name): the same seed on the same device type gives the same bytes
(the CPU and CUDA generators differ, so a GPU-built checkpoint differs from a CPU-built one).

`shrink=` replaces the widths (hidden, heads, experts, window, vocabulary...) for a CPU-sized
checkpoint with the same layer selection and per-layer settings: the CPU smoke of bench/gpu_check.py.
"""

from __future__ import annotations

import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.config import FULL, moe_layer_ids, read_config
from sglang_step35.tiny import SPECIAL_TOKENS, build_tokenizer, default_corpus, save_tokenizer

CLAMPED_SOURCE_LAYER = 44  # routed limit 7 and shared limit 16 (43: routed 7 only)
MIX = 0.35  # gain of the projections back into the residual stream
CLAMP_GAIN = 4.0  # the clamped layer's expert gate/up std (x 1/sqrt(H)): |up| > 7 for ~8% of entries
LM_HEAD_GAIN = 4.0  # logits std ~4: clear argmaxes over a 128k vocabulary
TOKENIZER_VOCAB = 4096  # locally trained BPE; the model vocabulary (128,896) is larger, as real ones are padded
PROVENANCE_FILE = "tiny_real.json"

# Widths of the CPU smoke: the tiny checkpoint's sizes (sglang_step35.tiny.TinySpec), with a model
# vocabulary twice the tokenizer's (the real-width one is larger than its tokenizer too).
CPU_SHRINK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "sliding_heads": 6,
    "num_attention_groups": 2,
    "head_dim": 16,
    "moe_num_experts": 8,
    "moe_top_k": 2,
    "moe_intermediate_size": 32,
    "share_expert_dim": 32,
    "sliding_window": 16,
    "vocab_size": 2048,
    "tokenizer_vocab": 1024,
}


def source_layers(real: dict, moe_layers: int) -> list[int]:
    """Indices (in the real model) of the main layers kept for `moe_layers` MoE layers."""
    n = int(real["num_hidden_layers"])
    moe = sorted(moe_layer_ids(real))
    if not 1 <= moe_layers <= len(moe):
        raise ValueError(f"--moe-layers must be in 1..{len(moe)}, got {moe_layers}")
    dense = [i for i in range(n) if i not in moe]
    unclamped = [i for i in moe if not real["swiglu_limits"][i] and not real["swiglu_limits_shared"][i]]
    return dense + unclamped[: moe_layers - 1] + [CLAMPED_SOURCE_LAYER]


def real_width_config(moe_layers: int = 3, experts: Optional[int] = None, shrink: Optional[dict] = None,
                      special_ids: Optional[dict] = None) -> tuple[dict, list[int]]:
    """(config dict, source index of every layer in it, MTP layers included)."""
    real = read_config()  # Step-3.5-Flash's
    n_real, m = int(real["num_hidden_layers"]), int(real["num_nextn_predict_layers"])
    kept = source_layers(real, moe_layers)
    src = kept + list(range(n_real, n_real + m))
    cfg = {k: v for k, v in real.items()}
    for key in ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared"):
        cfg[key] = [real[key][i] for i in src]
    cfg["num_hidden_layers"] = len(kept)
    cfg["moe_layers_enum"] = ",".join(str(j) for j, i in enumerate(kept) if i in moe_layer_ids(real))
    other = dict(real["attention_other_setting"])
    if shrink:
        s = shrink
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_attention_groups", "head_dim",
                    "moe_num_experts", "moe_top_k", "moe_intermediate_size", "share_expert_dim", "sliding_window",
                    "vocab_size"):
            if key in s:
                cfg[key] = s[key]
        other.update(num_attention_heads=s.get("sliding_heads", other["num_attention_heads"]),
                     num_attention_groups=cfg["num_attention_groups"], head_dim=cfg["head_dim"],
                     true_head_dim=cfg["head_dim"])
        cfg["max_seq_len"] = cfg["max_position_embeddings"] = 4096
        if cfg.get("rope_scaling"):  # keep llama3 scaling meaningful at the short context
            cfg["rope_scaling"] = {**cfg["rope_scaling"], "original_max_position_embeddings": 2048}
    cfg["attention_other_setting"] = other
    if experts is not None:
        if experts < 1:
            raise ValueError(f"--experts must be >= 1, got {experts}")
        cfg["moe_num_experts"] = experts
        cfg["moe_top_k"] = min(int(cfg["moe_top_k"]), experts)
    if special_ids is not None:
        cfg["bos_token_id"] = special_ids["<|endoftext|>"]
        cfg["eos_token_id"] = [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
    cfg.pop("quantization_config", None)
    return cfg, src


def checkpoint_bytes(cfg: dict) -> int:
    """BF16 size of the checkpoint described by `cfg` (router bias in fp32)."""
    return sum(math.prod(s) * (4 if n.endswith("router_bias") else 2) for n, s in checkpoint_shapes(cfg).items())


def _layer_of(name: str) -> Optional[int]:
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def _std(cfg: dict, name: str, shape: tuple[int, ...]) -> float:
    """Fan-in scaled std of one tensor (see the module doc); 1-D tensors are Gemma norm offsets."""
    from sglang_step35.config import layer_spec

    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith("router_bias"):
        return 0.05
    if len(shape) == 1:
        return 0.1
    fan_in = shape[-1]
    base = 1.0 / math.sqrt(fan_in)
    if name.endswith(("lm_head.weight", "shared_head.output.weight")):
        return LM_HEAD_GAIN * base
    i = _layer_of(name)
    spec = layer_spec(cfg, i) if i is not None else None
    clamped = spec is not None and (spec.swiglu_limit > 0 or spec.swiglu_limit_shared > 0)
    if name.endswith(("moe.gate_proj.weight", "moe.up_proj.weight")) and clamped and spec.swiglu_limit > 0:
        return CLAMP_GAIN * base
    if name.endswith(("share_expert.gate_proj.weight", "share_expert.up_proj.weight", "mlp.gate_proj.weight",
                      "mlp.up_proj.weight")) and spec is not None and spec.swiglu_limit_shared > 0:
        return 2 * CLAMP_GAIN * base  # shared limit 16
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        gain = MIX
        if name.endswith("moe.down_proj.weight") and spec.swiglu_limit > 0:
            gain /= CLAMP_GAIN ** 2
        if name.endswith(("share_expert.down_proj.weight", "mlp.down_proj.weight")) and spec.swiglu_limit_shared > 0:
            gain /= (2 * CLAMP_GAIN) ** 2
        return gain * base
    return base


def _generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _random(name: str, shape: tuple[int, ...], std: float, seed: int, device: torch.device) -> torch.Tensor:
    g = _generator(device, seed, name)
    if len(shape) == 3:  # stacked experts: a few at a time, bounded fp32 temporaries
        out = torch.empty(shape, dtype=torch.bfloat16, device=device)
        step = max(1, (1 << 27) // (shape[1] * shape[2]))
        for e in range(0, shape[0], step):
            n = min(step, shape[0] - e)
            out[e:e + n] = (torch.randn((n, *shape[1:]), generator=g, device=device) * std).to(torch.bfloat16)
        return out
    t = torch.randn(shape, generator=g, device=device) * std
    return t.float() if name.endswith("router_bias") else t.to(torch.bfloat16)


def layer_groups(cfg: dict) -> list[tuple[str, list[str]]]:
    """(shard stem, tensor names) in write order: embeddings/head first, then one group per layer."""
    names = list(checkpoint_shapes(cfg))
    groups: dict[str, list[str]] = {}
    for name in names:
        i = _layer_of(name)
        groups.setdefault("model-embed-head" if i is None else f"model-layer-{i:02d}", []).append(name)
    return list(groups.items())


def generate_group(cfg: dict, names: Iterable[str], seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The random tensors of one group, with the MTP wiring (see the module doc) applied."""
    shapes = checkpoint_shapes(cfg)
    H, n = int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        i = _layer_of(name)
        if i is not None and i >= n:  # MTP layer: predict from the next token's embedding
            tail = name.split(".", 3)[3]
            if tail == "eh_proj.weight":
                eh = torch.zeros(H, 2 * H, dtype=torch.bfloat16, device=device)
                eh[:, :H] = torch.eye(H, dtype=torch.bfloat16, device=device)
                out[name] = eh
                continue
            if tail == "enorm.weight":
                out[name] = torch.zeros(H, dtype=torch.bfloat16, device=device)
                continue
            if tail == "shared_head.norm.weight":
                out[name] = _random("model.norm.weight", (H,), 0.1, seed, device)
                continue
            if tail == "shared_head.output.weight":
                out[name] = _random("lm_head.weight", shapes["lm_head.weight"], _std(cfg, "lm_head.weight",
                                                                                     shapes["lm_head.weight"]), seed, device)
                continue
        out[name] = _random(name, shapes[name], _std(cfg, name, shapes[name]), seed, device)
    return out


def _default_device() -> torch.device:
    from sglang_step35.platform import current_platform

    return torch.device("cuda" if current_platform().has_accelerator else "cpu")  # ROCm devices are "cuda" too


def _write_meta(out: Path, cfg: dict, weight_map: dict, total: int, tok) -> None:
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2) + "\n")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    save_tokenizer(tok, out, cfg["max_position_embeddings"])


def write_real_width_checkpoint(
    out: os.PathLike | str,
    moe_layers: int = 3,
    experts: Optional[int] = None,
    seed: int = 0,
    fp8: bool = False,
    fp8_out: Optional[os.PathLike | str] = None,
    shrink: Optional[dict] = None,
    device: Optional[torch.device | str] = None,
    progress: Optional[Callable[[str, int], None]] = None,
) -> dict:
    """Write the checkpoint to `out` (FP8 layout if `fp8`); with `fp8_out`, also the same weights in
    the FP8 layout there, from the same generated tensors (bf16 at `out`). Shards hold one layer each
    (the embeddings and heads one more); in an FP8 copy the shards with nothing to quantize are links
    to the BF16 ones. `progress(stem, bytes)` is called after each shard. Returns the provenance
    (also written to tiny_real.json): source layers, sizes, seconds."""
    from safetensors.torch import save_file

    from sglang_step35 import fp8 as fp8mod

    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else _default_device()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_vocab = (shrink or {}).get("tokenizer_vocab", TOKENIZER_VOCAB)
    tok = build_tokenizer(tok_vocab, default_corpus())
    special_ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    cfg, src = real_width_config(moe_layers, experts, shrink, special_ids)
    if tok.get_vocab_size() > int(cfg["vocab_size"]):
        raise ValueError(f"tokenizer has {tok.get_vocab_size()} tokens, more than the model's vocab {cfg['vocab_size']}")
    fp8_cfg = {**cfg, "quantization_config": dict(fp8mod.QUANTIZATION_CONFIG)}
    targets = []  # (dir, quantize, config)
    if fp8:
        targets.append((out, True, fp8_cfg))
    else:
        targets.append((out, False, cfg))
    if fp8_out is not None:
        fp8_out = Path(fp8_out)
        fp8_out.mkdir(parents=True, exist_ok=True)
        targets.append((fp8_out, True, fp8_cfg))
    groups = layer_groups(cfg)
    maps = [dict() for _ in targets]
    totals = [0 for _ in targets]
    for k, (stem, names) in enumerate(groups):
        tensors = generate_group(cfg, names, seed, device)
        fname = f"{stem}.safetensors"
        bf16_path = None
        for t_idx, (d, quantize, _) in enumerate(targets):
            w = fp8mod.quantize_checkpoint(tensors) if quantize else tensors
            has_q = quantize and any(fp8mod.is_quantized_name(n) for n in names)
            if quantize and not has_q and bf16_path is not None:
                # identical to the BF16 shard: link it (saves the embeddings and heads, ~5 GB at real width)
                dst = d / fname
                if dst.exists() or dst.is_symlink():
                    dst.unlink()
                dst.symlink_to(os.path.relpath(bf16_path, d))
            else:
                save_file({n: v.contiguous().cpu() for n, v in w.items()}, str(d / fname), metadata={"format": "pt"})
                if not quantize:
                    bf16_path = d / fname
            size = sum(v.numel() * v.element_size() for v in w.values())
            totals[t_idx] += size
            maps[t_idx].update({n: fname for n in w})
            if progress is not None and t_idx == 0:
                progress(stem, size)
        del tensors
    seconds = time.perf_counter() - t0
    provenance = {
        "source_layers": src,
        "moe_layers": moe_layers,
        "experts": int(cfg["moe_num_experts"]),
        "seed": seed,
        "device": device.type,
        "shrink": shrink,
        "seconds": round(seconds, 2),
    }
    for t_idx, (d, quantize, c) in enumerate(targets):
        _write_meta(d, c, maps[t_idx], totals[t_idx], tok)
        (d / PROVENANCE_FILE).write_text(json.dumps({**provenance, "fp8": quantize, "bytes": totals[t_idx]},
                                                    indent=2) + "\n")
    return {**provenance, "bytes": totals[0], "fp8_bytes": totals[1] if len(targets) > 1 else None}


def write_config_variant(src: os.PathLike | str, dst: os.PathLike | str, edit: Callable[[dict], None]) -> Path:
    """A checkpoint directory with the same weights (links to `src`'s shards) and an edited
    config.json, e.g. the SwiGLU limits zeroed for the comparison with SGLang's built-in model."""
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if target.exists() or target.is_symlink():
            target.unlink()
        if f.name == "config.json":
            cfg = json.loads(f.read_text())
            edit(cfg)
            target.write_text(json.dumps(cfg, indent=2) + "\n")
        elif f.suffix == ".safetensors":
            target.symlink_to(f.resolve())
        else:
            target.write_bytes(f.read_bytes())
    return dst


def zero_clamps(cfg: dict) -> None:
    """config edit: no SwiGLU limit anywhere (SGLang's built-in then computes the same function)."""
    cfg["swiglu_limits"] = [0.0] * len(cfg["swiglu_limits"])
    cfg["swiglu_limits_shared"] = [0.0] * len(cfg["swiglu_limits_shared"])


def describe(cfg: dict) -> str:
    n = int(cfg["num_hidden_layers"])
    kinds = []
    for i, t in enumerate(cfg["layer_types"]):
        kind = "full" if t == FULL else "swa"
        kinds.append(f"{i}:{kind}{'+moe' if i < n and i in moe_layer_ids(cfg) else ''}"
                     f"{'+clamp' if cfg['swiglu_limits'][i] or cfg['swiglu_limits_shared'][i] else ''}"
                     f"{'(mtp)' if i >= n else ''}")
    return " ".join(kinds)

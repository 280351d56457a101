"""Block-wise FP8 (e4m3) as in Step-3.5-Flash-FP8: 128x128 weight blocks, one fp32 inverse scale each.

Layout (the DeepSeek-V3 / Step-3.5-Flash-FP8 convention SGLang's `Fp8Config` reads):
- `X.weight`: float8_e4m3fn, same shape as the bf16 weight ([N, K], or [E, N, K] for stacked experts);
- `X.weight_scale_inv`: float32 [ceil(N/128), ceil(K/128)] (or [E, ...]); the weight is
  `fp8 * scale_inv` blockwise. Edge blocks are ragged (smaller than 128) when N or K is not a multiple
  of 128: their scale covers only the existing elements, as real loaders assume (SGLang's block
  dequantization, which :func:`dequantize_block` calls, crops the repeated scale to the weight's shape).
- config.json `quantization_config`: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
  "dynamic", "weight_block_size": [128, 128]}.
Quantized: every projection of attention, dense MLP, shared and routed experts. Kept in bf16: router
(`moe.gate`, fp32 `router_bias`), norms, embeddings, `lm_head`, `g_proj`, MTP `eh_proj` and head.
Used by the tiny builder, the loader and the tests; only :func:`dequantize_block` imports SGLang, and
only when called (the tiny builder and the quantizer stay SGLang-free).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from sglang_step35.quant.pairing import WeightScalePairs

BLOCK = (128, 128)
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"

QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
}

# Checkpoint name suffixes that are quantized; everything else stays in its checkpoint dtype.
_QUANTIZED_SUFFIXES = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "share_expert.gate_proj.weight", "share_expert.up_proj.weight", "share_expert.down_proj.weight",
    "moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight",
)


def is_quantized_name(name: str) -> bool:
    """Whether `name` (a bf16 checkpoint tensor) is stored as FP8 in a Step-3.5 FP8 checkpoint."""
    return name.endswith(_QUANTIZED_SUFFIXES)


def scale_shape(shape: Sequence[int], block: Sequence[int] = BLOCK) -> tuple[int, ...]:
    """Shape of `weight_scale_inv` for a weight of `shape` (leading dims, e.g. experts, kept)."""
    *lead, n, k = shape
    return (*lead, math.ceil(n / block[0]), math.ceil(k / block[1]))


def _pad_to_blocks(w: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    n, k = w.shape[-2:]
    pn, pk = (-n) % block[0], (-k) % block[1]
    return torch.nn.functional.pad(w, (0, pk, 0, pn)) if pn or pk else w


def quantize_block(w: torch.Tensor, block: Sequence[int] = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (fp8 weight [..., N, K], fp32 scale_inv [..., ceil(N/bn), ceil(K/bk)]) with
    scale_inv = amax(|block|) / 448 so each block uses e4m3's full range (zero blocks: scale 1)."""
    bn, bk = block
    *lead, n, k = w.shape
    wf = _pad_to_blocks(w.float(), block)  # zero padding never raises a block's amax
    N, K = wf.shape[-2:]
    blocks = wf.reshape(*lead, N // bn, bn, K // bk, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., N/bn, K/bk]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*lead, N, K)[..., :n, :k].contiguous()
    return q, scale_inv.float().contiguous()


def dequantize_block(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16, block: Sequence[int] = BLOCK
) -> torch.Tensor:
    """Inverse of :func:`quantize_block`: fp8 [..., N, K] * scale_inv repeated per block (cropped to
    N, K for ragged edge blocks) -> `dtype`. Raises ValueError if the scale grid does not fit."""
    if tuple(scale_inv.shape) != scale_shape(q.shape, block):
        raise ValueError(
            f"weight_scale_inv shape {list(scale_inv.shape)} does not match weight {list(q.shape)} "
            f"with {list(block)} blocks (expected {list(scale_shape(q.shape, block))})"
        )
    # SGLang's own block dequantize (what its FP8 paths use to unquantize block weights, e.g. for
    # MXFP4 conversion): scale repeated per block, cropped to [N, K] (ragged edges), fp32 product,
    # cast to `dtype`; any leading dims. Pure torch, so it runs on CPU. It checks no shapes (too
    # large a grid is silently cropped, too small one fails as a broadcast RuntimeError), hence the
    # ValueError above, which the loader collects per tensor.
    from sglang.srt.layers.quantization.fp8_utils import block_quant_dequant  # noqa: PLC0415

    return block_quant_dequant(q, scale_inv.float(), list(block), dtype)


def quantize_checkpoint(weights: dict[str, torch.Tensor], block: Sequence[int] = BLOCK) -> dict[str, torch.Tensor]:
    """A bf16 Step-3.5 state dict -> its FP8 form (quantized weights + `weight_scale_inv`)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if is_quantized_name(name):
            q, s = quantize_block(t, block)
            out[name] = q
            out[name + SCALE_SUFFIX] = s
        else:
            out[name] = t
    return out


def dequantize_checkpoint(weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """An FP8 state dict -> plain weights in `dtype` (scales consumed); non-FP8 tensors unchanged."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == FP8_DTYPE:
            out[name] = dequantize_block(t, weights[name + SCALE_SUFFIX], dtype)
        else:
            out[name] = t
    return out


# --- registry interface (sglang_step35.quant) ------------------------------------------------------
NAMES = ("fp8",)


def matches(quantization_config: dict) -> bool:
    """Block FP8 (Step-3.5-Flash-FP8, DeepSeek-V3 style): quant_method fp8 with a weight_block_size.
    Per-tensor / per-channel FP8 is not this format (served.py refuses it by name)."""
    return (str(quantization_config.get("quant_method", "")).lower() == "fp8"
            and bool(quantization_config.get("weight_block_size")))


def block_problems(shapes: dict, block: Sequence[int] = BLOCK) -> list[str]:
    """Quantized tensors among `shapes` (name -> BF16 shape) whose [N, K] are not whole blocks."""
    return [f"{k} {list(s)}" for k, s in shapes.items()
            if is_quantized_name(k) and (s[-2] % block[0] or s[-1] % block[1])]


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:  # noqa: ARG001 (registry signature)
    """BF16 Step-3.5 tensors -> block FP8 (see module notes); ValueError names partial blocks, which
    SGLang's Fp8Config cannot build on a GPU ("... is not divisible by weight quantization block_n")."""
    if name not in NAMES:
        raise ValueError(f"fp8 format: unknown name {name!r}; use one of {NAMES}")
    bad = block_problems({k: tuple(t.shape) for k, t in weights.items()})
    if bad:
        raise ValueError("FP8 checkpoint: these projections are not whole 128x128 blocks, so SGLang's "
                         "Fp8Config could not build them on a GPU (use FP8_TINY_SPEC sizes): " + ", ".join(bad))
    return quantize_checkpoint(weights), {"quantization_config": dict(QUANTIZATION_CONFIG)}


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict):
    """Shape of `<module>.<leaf>` for a module whose BF16 weight has `bf16_shape` (None: not ours)."""
    if leaf == "weight":
        return tuple(bf16_shape)
    if leaf == "weight" + SCALE_SUFFIX:
        return scale_shape(bf16_shape, quantization_config.get("weight_block_size") or BLOCK)
    return None


class Dequantizer(WeightScalePairs):
    """CPU path: pairs each FP8 `X.weight` with its `X.weight_scale_inv` (either order in the stream),
    yields the fp32 weight under `X.weight`; records unpaired / mis-shaped scales."""

    FORMAT, SCALE, WEIGHT_DTYPE, ERROR_AT = "FP8", ".weight" + SCALE_SUFFIX, FP8_DTYPE, ".weight" + SCALE_SUFFIX

    def __init__(self, quantization_config: dict):
        super().__init__()
        self.block = tuple(quantization_config.get("weight_block_size") or BLOCK)

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_block(q, scale, torch.float32, self.block)

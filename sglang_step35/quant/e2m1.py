"""FP4 E2M1 elements, two per byte: the element format shared by NVFP4 and OCP MXFP4 (pure torch).

E2M1 (OCP Microscaling Formats spec v1.0, section 5.3.3): 1 sign bit, 2 exponent bits (bias 1), 1
mantissa bit, no inf/NaN. The 8 magnitudes of codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6; bit 3 is the
sign (code 8 is -0). Packing (what ModelOpt, Quark and SGLang's kernels read): element 2i in the low
nibble of byte i, element 2i+1 in the high nibble, along the last (input) dimension.
Used by `quant/nvfp4.py` and `quant/mxfp4.py`; the block scales on top differ per format.
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
# Magnitude of codes 0..7 (sign in bit 3).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _table(device=None) -> torch.Tensor:
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])  # code -> value for codes 0..15


def encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by their block scale) -> E2M1 codes (uint8, 0..15), round to
    nearest magnitude (ties to the even code, as IEEE round-half-even does for the mantissa bit),
    saturating at 6."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=x.device)
    a = x.float().abs().clamp(max=E2M1_MAX)
    dist = (a.unsqueeze(-1) - mags).abs()
    best = dist.min(dim=-1, keepdim=True).values
    # Among equally near codes pick the even one (a tie is always between one odd and one even code).
    tie_break = torch.arange(8, device=x.device) % 2  # odd codes lose ties
    code = torch.where(dist == best, tie_break, 2).argmin(dim=-1).to(torch.uint8)
    return torch.where(x < 0, code | 8, code).to(torch.uint8)


def decode(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, low 4 bits used) -> fp32 values."""
    return _table(codes.device)[(codes & 0xF).long()]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (K even) -> bytes [..., K/2]: element 2i low nibble, 2i+1 high nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {list(codes.shape)}")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Bytes [..., K/2] -> codes [..., K] (inverse of :func:`pack`)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 weight is {str(packed.dtype).removeprefix('torch.')}, expected uint8")
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def checkpoint_shapes(bf16_shape: tuple, group: int) -> tuple[tuple, tuple]:
    """(packed weight, block scales) shapes of a weight whose BF16 shape is [..., N, K], packed as
    :func:`pack` does with one scale per `group` elements along K: ([..., N, K/2], [..., N, K/group])."""
    *lead, n, k = bf16_shape
    return (*lead, n, k // 2), (*lead, n, k // group)

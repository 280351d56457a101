"""The int4 tensor codecs of the W4A16 formats (compressed-tensors pack-quantized, GPTQ, AWQ): pack and
unpack 4-bit codes, quantize one BF16 weight into a format's tensors (the writers' side) and
dequantize them back (the CPU path and the tests' reference). Checkpoint-level handling (which
configs, the streaming dequantizer, tensor shapes, tiny checkpoints) is in :mod:`sglang_step35.quant.w4a16`,
which describes the layouts and re-exports these names.

Written from the formats' public specifications (SGLang-free, pure torch). A weight W [N, K] is
split into groups of `group_size` consecutive inputs; each (row, group) has one scale s (and,
asymmetric, one zero point z); the 4-bit code q of an element gives W = (q - z) * s. Eight 4-bit
codes are packed into one int32, code i of eight in bits 4i..4i+3.
"""

from __future__ import annotations

from typing import Optional

import torch

GROUP_SIZE = 128
BITS = 4
PACK = 32 // BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: code i of an int32 is column AWQ_ORDER[i]

# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """Unsigned 4-bit codes (any integer dtype, values 0..15) -> int32, eight consecutive codes along
    `dim` per int32 (code i in bits 4i..4i+3 holds element `order[i]` of the eight); `dim` padded
    with zeros to a multiple of 8."""
    c = codes.to(torch.int64).movedim(dim, -1)
    pad = (-c.shape[-1]) % PACK
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, PACK)[..., list(order)]
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    packed = (c << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement int32
    return packed.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_int32(packed: torch.Tensor, dim: int, size: int, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 -> uint8 codes, `size` along `dim` (padding cropped)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed 4-bit codes must be int32, got {str(packed.dtype).removeprefix('torch.')}")
    p = packed.movedim(dim, -1).to(torch.int64)
    shifts = torch.arange(PACK, dtype=torch.int64) * BITS
    codes = (p[..., None] >> shifts) & 0xF  # code i of each int32
    inverse = [0] * PACK
    for i, col in enumerate(order):
        inverse[col] = i
    codes = codes[..., inverse].reshape(*p.shape[:-1], -1)
    if codes.shape[-1] < size:
        raise ValueError(f"{p.shape[-1]} int32 hold {codes.shape[-1]} codes, fewer than {size}")
    return codes[..., :size].to(torch.uint8).movedim(-1, dim).contiguous()


# ------------------------------------------------------------------------------------------------
# Quantizing (the writers' side)
# ------------------------------------------------------------------------------------------------
def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    if k % group:
        raise ValueError(f"input dimension {k} is not a multiple of the group size {group}")
    return w.float().reshape(n, k // group, group)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).float()


def quantize_symmetric(w: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> (signed codes int8 [N, K] in [-8, 7], scale fp32 [N, K/g], bf16 values):
    scale = max|W| / 7.5 per group (compressed-tensors' and GPTQ's symmetric int4), all-zero groups 1."""
    g = _groups(w, group)
    amax = g.abs().amax(-1)
    scale = _bf16(torch.where(amax > 0, amax / 7.5, torch.ones_like(amax)))
    q = torch.round(g / scale[..., None]).clamp(-8, 7)
    return q.reshape(w.shape).to(torch.int8), scale


def quantize_asymmetric(w: torch.Tensor, group: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [N, K] -> (codes uint8 [N, K] in [0, 15], scale fp32 [N, K/g] (bf16 values), zero uint8 [N, K/g]):
    AWQ's min/max grid, scale = (max - min) / 15, zero = round(-min / scale)."""
    g = _groups(w, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = _bf16(torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)))
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(g / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return q.reshape(w.shape).to(torch.uint8), scale, zero.to(torch.uint8)


def ct_tensors(w: torch.Tensor, group: int = GROUP_SIZE, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized, symmetric: weight_packed / weight_scale / weight_shape."""
    q, scale = quantize_symmetric(w, group)
    return {
        "weight_packed": pack_int32(q.to(torch.int16) + 8, dim=1),
        "weight_scale": scale.to(dtype),
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def gptq_tensors(w: torch.Tensor, group: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """GPTQ v1, symmetric: qweight [K/8, N], qzeros [K/g, N/8] (8 - 1 each), scales fp16 [K/g, N], g_idx."""
    n, k = w.shape
    if n % PACK:
        raise ValueError(f"output dimension {n} is not a multiple of {PACK} (GPTQ packs zero points along it)")
    q, scale = quantize_symmetric(w, group)
    zeros = torch.full((k // group, n), 8 - 1, dtype=torch.uint8)
    return {
        "qweight": pack_int32((q.to(torch.int16) + 8).T, dim=0),
        "qzeros": pack_int32(zeros, dim=1),
        "scales": scale.T.to(torch.float16).contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32) // group,
    }


def awq_tensors(w: torch.Tensor, group: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """AWQ GEMM, asymmetric: qweight [K, N/8], qzeros [K/g, N/8] (AWQ order), scales fp16 [K/g, N]."""
    n, _ = w.shape
    if n % PACK:
        raise ValueError(f"output dimension {n} is not a multiple of {PACK} (AWQ packs along it)")
    q, scale, zero = quantize_asymmetric(w, group)
    return {
        "qweight": pack_int32(q.T, dim=1, order=AWQ_ORDER),
        "qzeros": pack_int32(zero.T, dim=1, order=AWQ_ORDER),
        "scales": scale.T.to(torch.float16).contiguous(),
    }


# ------------------------------------------------------------------------------------------------
# Dequantizing (the CPU path and the tests' reference)
# ------------------------------------------------------------------------------------------------
def _check(name: str, t: torch.Tensor, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected {list(shape)}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name}: expected {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, "
                         f"got {str(t.dtype).removeprefix('torch.')}")


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
_INTS = (torch.int32, torch.int64)


def _apply(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """codes [N, K], zero / scale [N, G], g_idx [K] -> (codes - zero[:, g]) * scale[:, g], fp32."""
    g = g_idx.long()
    return (codes.float() - zero.float()[:, g]) * scale.float()[:, g]


def _g_idx(name: str, g_idx: Optional[torch.Tensor], k: int, groups: int) -> torch.Tensor:
    if g_idx is None:
        if k % groups:
            raise ValueError(f"{name}: {groups} scale groups do not divide {k} inputs")
        return torch.arange(k) // (k // groups)
    _check(name + ".g_idx", g_idx, (k,), _INTS)
    if k and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"{name}.g_idx: group indices outside [0, {groups})")
    return g_idx


def ct_dequantize(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """compressed-tensors pack-quantized parts of `name` -> W fp32 [N, K]."""
    shape = parts["weight_shape"]
    if shape.numel() != 2:
        raise ValueError(f"{name}.weight_shape: expected 2 values [N, K], got {shape.tolist()}")
    n, k = (int(v) for v in shape.tolist())
    _check(name + ".weight_packed", parts["weight_packed"], (n, -(-k // PACK)), (torch.int32,))
    scale = parts["weight_scale"]
    if scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"{name}.weight_scale: expected [{n}, groups], got {list(scale.shape)}")
    groups = scale.shape[1]
    _check(name + ".weight_scale", scale, (n, groups), _FLOATS)
    codes = unpack_int32(parts["weight_packed"], 1, k)
    zp = parts.get("weight_zero_point")
    if zp is None:
        zero = torch.full((n, groups), 8)
    else:
        _check(name + ".weight_zero_point", zp, (-(-n // PACK), groups), (torch.int32,))
        zero = unpack_int32(zp, 0, n)
    return _apply(codes, zero, scale, _g_idx(name, parts.get("weight_g_idx"), k, groups))



def _gptq_awq_parts(name: str, parts: dict[str, torch.Tensor], packed_along_k: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """Check the GPTQ / AWQ parts of `name` (both store scales and zero points transposed,
    [groups, N]; GPTQ packs qweight along K, [K/8, N], AWQ along N, [K, N/8]) ->
    (qweight, scales, groups, N, K)."""
    scales = parts["scales"]
    if scales.dim() != 2:
        raise ValueError(f"{name}.scales: expected [groups, N], got {list(scales.shape)}")
    groups, n = scales.shape
    qweight = parts["qweight"]
    if packed_along_k:
        if qweight.dim() != 2 or qweight.shape[1] != n:
            raise ValueError(f"{name}.qweight: expected [K/8, {n}], got {list(qweight.shape)}")
        k = qweight.shape[0] * PACK
        packed = (k // PACK, n)
    else:
        if qweight.dim() != 2 or qweight.shape[1] * PACK != n:
            raise ValueError(f"{name}.qweight: expected [K, {n // PACK}], got {list(qweight.shape)}")
        k = qweight.shape[0]
        packed = (k, n // PACK)
    _check(name + ".qweight", qweight, packed, (torch.int32,))
    _check(name + ".scales", scales, (groups, n), _FLOATS)
    _check(name + ".qzeros", parts["qzeros"], (groups, -(-n // PACK)), (torch.int32,))
    return qweight, scales, groups, n, k


def gptq_dequantize(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """GPTQ v1 parts of `name` -> W fp32 [N, K] (zero points stored minus one)."""
    qweight, scales, groups, n, k = _gptq_awq_parts(name, parts, packed_along_k=True)
    codes = unpack_int32(qweight, 0, k).T
    zero = (unpack_int32(parts["qzeros"], 1, n).to(torch.int16) + 1).T
    return _apply(codes, zero, scales.T, _g_idx(name, parts.get("g_idx"), k, groups))


def awq_dequantize(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """AWQ GEMM parts of `name` -> W fp32 [N, K]."""
    qweight, scales, groups, n, k = _gptq_awq_parts(name, parts, packed_along_k=False)
    codes = unpack_int32(qweight, 1, n, AWQ_ORDER).T
    zero = unpack_int32(parts["qzeros"], 1, n, AWQ_ORDER).T
    return _apply(codes, zero, scales.T, _g_idx(name, None, k, groups))

"""4-bit weight-only (W4A16, INT4, group 128) checkpoints: compressed-tensors pack-quantized, AWQ, GPTQ.

Written from the formats' public specifications (SGLang-free, pure torch). A weight W [N, K] (N
outputs, K inputs) is split into groups of `group_size` consecutive inputs; each (row, group) has one
scale s (and, asymmetric, one zero point z); the 4-bit code q of an element gives W = (q - z) * s.
Eight 4-bit codes are packed into one int32, code i of eight in bits 4i..4i+3.

- **compressed-tensors `pack-quantized`** (LLM Compressor W4A16; SGLang's ``CompressedTensorsConfig``):
  ``X.weight_packed`` int32 [N, ceil(K/8)] (packed along K; the signed code q in [-8, 7] stored as
  q + 8), ``X.weight_scale`` [N, K/g] in the model dtype, ``X.weight_shape`` int64 [N, K] (the
  unpadded shape); asymmetric schemes add ``X.weight_zero_point`` int32 [ceil(N/8), K/g] (signed
  zero points packed along N, stored + 8), act-order ``group`` adds ``X.weight_g_idx`` [K]. Symmetric
  scale: max|W| / 7.5 per group (``bit_range / 2``). Config: ``quant_method: compressed-tensors``,
  ``format: pack-quantized``, a config group with 4-bit int group weights and no input activations.
- **GPTQ** (AutoGPTQ / GPTQModel ``checkpoint_format: gptq``, also AutoRound's GPTQ export):
  ``X.qweight`` int32 [K/8, N] (packed along K), ``X.qzeros`` int32 [K/g, N/8] (packed along N,
  stored as z - 1: the "v1" format every GPTQ kernel, SGLang's moe_wna16 included, adds 1 back),
  ``X.scales`` fp16 [K/g, N], ``X.g_idx`` int32 [K] (group of each input; k // g without act-order).
  Symmetric (``sym: true``): z = 8, scale max|W| / 7.5.
- **AWQ** (AutoAWQ ``version: gemm``): ``X.qweight`` int32 [K, N/8] and ``X.qzeros`` int32 [K/g, N/8],
  both packed along N in AWQ's interleaved order (code i of an int32 holds column ``AWQ_ORDER[i]`` of
  its eight), ``X.scales`` fp16 [K/g, N]; asymmetric (``zero_point: true``): s = (max - min) / 15,
  z = round(-min / s).

Tiny checkpoints (``step35 tiny --quant w4a16|awq|gptq``) quantize what these exports quantize in
Step-3.5's decoder layers: attention q/k/v/o, the dense MLPs, the shared expert and the routed experts,
written per expert (``model.layers.L.moe.experts.E.gate_proj.*``, as quantizers write experts they
unfused into Linear modules). Kept BF16: embeddings, norms, the router (``moe.gate``, fp32 bias),
``lm_head``, ``g_proj`` (its output is one column per head: AWQ/GPTQ pack the output dimension by 8
and SGLang's Marlin linears need >= 64 outputs, neither holds for a head count per rank) and the MTP
layers (index >= num_hidden_layers; quantizers never see them), which stay whole and are named in
each format's exclude list (``ignore`` / ``dynamic`` "-:" rules / ``modules_to_not_convert``) so that
SGLang builds the MTP draft unquantized.
Scales are rounded to bfloat16 before the codes are chosen, so the fp16 scales AWQ/GPTQ store hold
bf16 values: loading them into a bf16 model changes no bit.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import torch

from sglang_step35.checkpoint import layer_index

NAMES = ("w4a16", "awq", "gptq")
GROUP_SIZE = 128
BITS = 4
PACK = 32 // BITS  # codes per int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack order: code i of an int32 is column AWQ_ORDER[i]

# BF16 Step-3.5 tensors (main layers) these exports quantize; routed experts are stacked [E, N, K].
_DENSE = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "share_expert.gate_proj.weight", "share_expert.up_proj.weight", "share_expert.down_proj.weight",
)
_EXPERTS = ("moe.gate_proj.weight", "moe.up_proj.weight", "moe.down_proj.weight")

# The parts of one quantized weight, per format (suffix after the module name).
CT_PARTS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_PARTS = ("qweight", "qzeros", "scales")


# ------------------------------------------------------------------------------------------------
# Which checkpoints
# ------------------------------------------------------------------------------------------------
def _ct_weight_schemes(qc: dict) -> list[dict]:
    return [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values()]


def _kind(qc: dict) -> Optional[str]:
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            return None
        for g in groups:
            w = g.get("weights") or {}
            fmt = g.get("format") or qc.get("format")
            if (fmt != "pack-quantized" or g.get("input_activations") or w.get("type") != "int"
                    or w.get("num_bits") != BITS or w.get("strategy") not in ("group", "channel")):
                return None
        return "ct"
    bits = qc.get("bits", qc.get("w_bit"))
    if method == "gptq" and bits == BITS and str(qc.get("checkpoint_format") or "gptq").lower() == "gptq":
        return "gptq"
    if method == "awq" and bits == BITS and str(qc.get("version") or "gemm").lower() == "gemm":
        return "awq"
    return None


def matches(quantization_config: dict) -> bool:
    """compressed-tensors pack-quantized 4-bit int weights without activation quantization, GPTQ
    (v1 `gptq` format) 4-bit, or AWQ GEMM 4-bit."""
    return _kind(dict(quantization_config or {})) is not None


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


def gptq_dequantize(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """GPTQ v1 parts of `name` -> W fp32 [N, K] (zero points stored minus one)."""
    scales = parts["scales"]
    if scales.dim() != 2:
        raise ValueError(f"{name}.scales: expected [groups, N], got {list(scales.shape)}")
    groups, n = scales.shape
    qweight = parts["qweight"]
    if qweight.dim() != 2 or qweight.shape[1] != n:
        raise ValueError(f"{name}.qweight: expected [K/8, {n}], got {list(qweight.shape)}")
    k = qweight.shape[0] * PACK
    _check(name + ".qweight", qweight, (k // PACK, n), (torch.int32,))
    _check(name + ".scales", scales, (groups, n), _FLOATS)
    _check(name + ".qzeros", parts["qzeros"], (groups, -(-n // PACK)), (torch.int32,))
    codes = unpack_int32(qweight, 0, k).T
    zero = (unpack_int32(parts["qzeros"], 1, n).to(torch.int16) + 1).T
    return _apply(codes, zero, scales.T, _g_idx(name, parts.get("g_idx"), k, groups))


def awq_dequantize(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """AWQ GEMM parts of `name` -> W fp32 [N, K]."""
    scales = parts["scales"]
    if scales.dim() != 2:
        raise ValueError(f"{name}.scales: expected [groups, N], got {list(scales.shape)}")
    groups, n = scales.shape
    qweight = parts["qweight"]
    if qweight.dim() != 2 or qweight.shape[1] * PACK != n:
        raise ValueError(f"{name}.qweight: expected [K, {n // PACK}], got {list(qweight.shape)}")
    k = qweight.shape[0]
    _check(name + ".qweight", qweight, (k, n // PACK), (torch.int32,))
    _check(name + ".scales", scales, (groups, n), _FLOATS)
    _check(name + ".qzeros", parts["qzeros"], (groups, n // PACK), (torch.int32,))
    codes = unpack_int32(qweight, 1, n, AWQ_ORDER).T
    zero = unpack_int32(parts["qzeros"], 1, n, AWQ_ORDER).T
    return _apply(codes, zero, scales.T, _g_idx(name, None, k, groups))


_DEQUANT = {"ct": ct_dequantize, "gptq": gptq_dequantize, "awq": awq_dequantize}
_PARTS = {"ct": CT_PARTS, "gptq": GPTQ_PARTS, "awq": AWQ_PARTS}


class Dequantizer:
    """Collects the parts of each quantized weight from a tensor stream (any order) and returns the
    fp32 weight under its BF16 name (``X.weight``) once all required parts were seen; other tensors
    pass through. Required: compressed-tensors packed/scale/shape (+ zero point when asymmetric,
    + g_idx for act-order ``group``); GPTQ qweight/qzeros/scales (+ g_idx with ``desc_act``; a g_idx
    seen is used, one arriving after its weight must be the trivial k // g); AWQ qweight/qzeros/scales."""

    def __init__(self, quantization_config: dict):
        qc = dict(quantization_config or {})
        kind = _kind(qc)
        if kind is None:
            raise ValueError(f"not a W4A16 (compressed-tensors pack-quantized / GPTQ / AWQ int4) "
                             f"quantization_config: {qc!r}")
        self.kind = kind
        self.group_size = int(qc.get("group_size", qc.get("q_group_size", GROUP_SIZE)) or GROUP_SIZE)
        required = {"ct": ["weight_packed", "weight_scale", "weight_shape"],
                    "gptq": ["qweight", "qzeros", "scales"], "awq": ["qweight", "qzeros", "scales"]}[kind]
        if kind == "ct":
            schemes = _ct_weight_schemes(qc)
            if any(not w.get("symmetric", True) for w in schemes):
                required.append("weight_zero_point")
            if any(str(w.get("actorder") or "").lower() == "group" for w in schemes):
                required.append("weight_g_idx")
            sizes = {w.get("group_size") for w in schemes if w.get("strategy") == "group"}
            self.group_size = sizes.pop() if len(sizes) == 1 else None
        elif kind == "gptq" and qc.get("desc_act"):
            required.append("g_idx")
        self.required = tuple(required)
        self._suffix = re.compile(r"^(.*)\.(" + "|".join(_PARTS[kind]) + r")$")
        self._pending: dict[str, dict[str, torch.Tensor]] = {}
        self._done: dict[str, tuple[int, int]] = {}  # base -> (K, groups), for a late GPTQ g_idx
        self._problems: list[str] = []

    def feed(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        m = self._suffix.match(name)
        if m is None:
            return [(name, tensor)]
        base, part = m.group(1), m.group(2)
        if base in self._done:
            if self.kind == "gptq" and part == "g_idx":
                k, groups = self._done[base]
                if not torch.equal(tensor.long(), torch.arange(k) // (k // groups)):
                    self._problems.append(f"{name}: act-order group indices after {base}'s weight was "
                                          "dequantized with k // group_size (set desc_act in quantization_config)")
            else:
                self._problems.append(f"{name}: second {part} for {base}")
            return []
        parts = self._pending.setdefault(base, {})
        if part in parts:
            self._problems.append(f"{name}: seen twice")
        parts[part] = tensor
        if not all(p in parts for p in self.required):
            return []
        del self._pending[base]
        try:
            w = _DEQUANT[self.kind](base, parts)
        except ValueError as e:
            self._problems.append(str(e))
            return []
        groups = (parts.get("weight_scale") if self.kind == "ct" else parts["scales"].T).shape[1]
        if self.group_size and w.shape[1] != groups * self.group_size and "g_idx" not in parts \
                and "weight_g_idx" not in parts:
            self._problems.append(f"{base}: {groups} scale groups over {w.shape[1]} inputs, but "
                                  f"quantization_config says group_size {self.group_size}")
            return []
        self._done[base] = (w.shape[1], groups)
        return [(base + ".weight", w)]

    def problems(self) -> list[str]:
        out = list(self._problems)
        for base, parts in sorted(self._pending.items()):
            missing = [p for p in self.required if p not in parts]
            out.append(f"{base}: has {', '.join(sorted(parts))} but no {', '.join(missing)}")
        return out


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:
    """Shape of checkpoint tensor `<module>.<leaf>` whose BF16 weight is `bf16_shape` ([..., N, K]);
    None: not a part of this format (e.g. `weight`, which these formats do not store quantized)."""
    *lead, n, k = bf16_shape
    qc = dict(quantization_config or {})
    kind = _kind(qc)
    group = None
    if kind == "ct":
        sizes = {w.get("group_size") for w in _ct_weight_schemes(qc) if w.get("strategy") == "group"}
        group = sizes.pop() if len(sizes) == 1 else None
        if group is None and {w.get("strategy") for w in _ct_weight_schemes(qc)} == {"channel"}:
            group = k
    elif kind is not None:
        group = int(qc.get("group_size", qc.get("q_group_size", GROUP_SIZE)) or GROUP_SIZE)
        group = k if group == -1 else group
    if group is None:
        return None
    g, up8 = k // group, lambda x: -(-x // PACK)
    shapes = {
        "ct": {"weight_packed": (n, up8(k)), "weight_scale": (n, g), "weight_shape": (2,),
               "weight_zero_point": (up8(n), g), "weight_g_idx": (k,)},
        "gptq": {"qweight": (k // PACK, n), "qzeros": (g, up8(n)), "scales": (g, n), "g_idx": (k,)},
        "awq": {"qweight": (k, n // PACK), "qzeros": (g, n // PACK), "scales": (g, n)},
    }[kind]
    return (*lead, *shapes[leaf]) if leaf in shapes else None


# ------------------------------------------------------------------------------------------------
# Writing tiny checkpoints
# ------------------------------------------------------------------------------------------------
def quantization_config(name: str, group: int = GROUP_SIZE, bf16_layers: Sequence[int] = ()) -> dict:
    """config.json `quantization_config` of a `name` export, as the quantizers write it. `bf16_layers`:
    decoder layers stored unquantized (the MTP layers), named in the format's exclude list so that
    SGLang builds them unquantized (each format matches it against the module prefix)."""
    layers = "|".join(str(i) for i in bf16_layers)
    if name == "w4a16":
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": BITS, "type": "int", "symmetric": True, "strategy": "group",
                            "group_size": group, "dynamic": False, "actorder": None, "observer": "minmax",
                            "block_structure": None, "observer_kwargs": {}},
                "input_activations": None, "output_activations": None, "format": "pack-quantized",
            }},
            # Module names (LLM Compressor `ignore`): the router and g_proj stay BF16, lm_head too.
            "ignore": ["lm_head", "re:.*moe\\.gate$", "re:.*self_attn\\.g_proj$"]
            + ([f"re:^model\\.layers\\.({layers})\\..*"] if layers else []),
            "kv_cache_scheme": None,
            "sparsity_config": {},
            "transform_config": {},
            "global_compression_ratio": None,
        }
    if name == "gptq":
        return {"quant_method": "gptq", "bits": BITS, "group_size": group, "desc_act": False, "sym": True,
                "lm_head": False, "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
                "checkpoint_format": "gptq",
                # GPTQModel's per-module rules: "-:" regexes are left unquantized.
                "dynamic": {"-:.*\\.g_proj$": {}, "-:.*\\.moe\\.gate$": {},
                            **({f"-:^model\\.layers\\.({layers})\\..*": {}} if layers else {})}}
    if name == "awq":
        return {"quant_method": "awq", "bits": BITS, "group_size": group, "zero_point": True, "version": "gemm",
                # Substrings of SGLang's module prefixes. Per projection, not `model.layers.{i}.`: SGLang
                # 0.5.23's MoeWNA16Config hands every skipped prefix an UnquantizedLinearMethod, and the
                # layer's RadixAttention (`...self_attn.attn`) cannot take one (TypeError at construction).
                "modules_to_not_convert": ["g_proj", "moe.gate", *(
                    f"model.layers.{i}.{m}" for i in bf16_layers
                    for m in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"))]}
    raise ValueError(f"unknown W4A16 checkpoint name {name!r}; use one of {', '.join(NAMES)}")


_WRITERS = {"w4a16": ct_tensors, "gptq": gptq_tensors, "awq": awq_tensors}


def quantized_name(name: str, num_hidden_layers: int) -> bool:
    """Whether BF16 checkpoint tensor `name` is 4-bit in these exports (main decoder layers only)."""
    i = layer_index(name)
    return i is not None and i < num_hidden_layers and name.endswith(_DENSE + _EXPERTS)


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str
                             ) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """BF16 Step-3.5 tensors -> the `name` export's tensors (routed experts per expert) and
    {"quantization_config": ...}. ValueError names a weight whose shape the format cannot hold."""
    n_layers = int(cfg["num_hidden_layers"])
    mtp = range(n_layers, n_layers + int(cfg.get("num_nextn_predict_layers") or 0))
    qc = quantization_config(name, bf16_layers=mtp)
    pack = _WRITERS[name]
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, t in weights.items():
        if not quantized_name(key, n_layers):
            out[key] = t
            continue
        stem = key[: -len(".weight")]
        if key.endswith(_EXPERTS):
            layer, proj = stem.rsplit(".", 1)  # model.layers.L.moe, gate_proj
            items = [(f"{layer}.experts.{e}.{proj}", t[e]) for e in range(t.shape[0])]
        else:
            items = [(stem, t)]
        for base, w in items:
            try:
                parts = pack(w, GROUP_SIZE)
            except ValueError as e:
                bad.append(f"{base} {list(w.shape)}: {e}")
                break
            out.update({f"{base}.{p}": v for p, v in parts.items()})
    if bad:
        raise ValueError(f"{name} tiny checkpoint: these weights cannot be stored as INT4 group {GROUP_SIZE} "
                         "(use sizes that are multiples of 128, e.g. tiny.FP8_TINY_SPEC): " + "; ".join(bad[:4])
                         + (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return out, {"quantization_config": qc}

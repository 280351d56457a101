"""4-bit weight-only (W4A16, INT4, groups of 128 or 32) checkpoints: compressed-tensors pack-quantized, AWQ, GPTQ.

This module is the checkpoint side (which configs, the streaming :class:`Dequantizer`, tensor
shapes, tiny checkpoints); the per-tensor pack / quantize / dequantize codecs are in
:mod:`sglang_step35.quant.int4_codec`, re-exported here.

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

Tiny checkpoints (``step35 tiny --quant w4a16|w4a16-g32|awq|gptq``) quantize what these exports quantize in
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
from sglang_step35.quant.int4_codec import (  # noqa: F401  (re-exported: the format's public names)
    AWQ_ORDER, BITS, GROUP_SIZE, PACK, awq_dequantize, awq_tensors, ct_dequantize, ct_tensors, gptq_dequantize,
    gptq_tensors, pack_int32, quantize_asymmetric, quantize_symmetric, unpack_int32,
)

NAMES = ("w4a16", "awq", "gptq", "w4a16-g32")
# compressed-tensors W4A16 with groups of 32 (LLM Compressor's W4A16 with group_size 32): the other group
# size SGLang's Triton W4A16 MoE takes (compressed_tensors.py: _is_wna16_triton_moe_supported).
TINY_GROUP = {"w4a16-g32": 32}


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
    group = TINY_GROUP.get(name, group)
    if name in ("w4a16", "w4a16-g32"):
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


_WRITERS = {"w4a16": ct_tensors, "gptq": gptq_tensors, "awq": awq_tensors, "w4a16-g32": ct_tensors}


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
    pack, group = _WRITERS[name], TINY_GROUP.get(name, GROUP_SIZE)
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
                parts = pack(w, group)
            except ValueError as e:
                bad.append(f"{base} {list(w.shape)}: {e}")
                break
            out.update({f"{base}.{p}": v for p, v in parts.items()})
    if bad:
        raise ValueError(f"{name} tiny checkpoint: these weights cannot be stored as INT4 group {group} "
                         "(use sizes that are multiples of 128, e.g. tiny.FP8_TINY_SPEC): " + "; ".join(bad[:4])
                         + (f"; and {len(bad) - 4} more" if len(bad) > 4 else ""))
    return out, {"quantization_config": qc}

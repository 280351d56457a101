"""AMD Quark MXFP4 Step-3.5 checkpoints (OCP MX FP4, W4A4; pure torch, SGLang-free).

MXFP4 (OCP Microscaling Formats spec v1.0): blocks of 32 E2M1 elements share one E8M0 scale, a
power of two ``2^(s - 127)`` stored as a uint8 ``s`` (255 = NaN). As AMD Quark exports it:
- ``X.weight``: uint8 [..., N, K/2], two E2M1 elements per byte (`quant/e2m1.py`);
- ``X.weight_scale``: uint8 [..., N, K/32], the E8M0 exponents;
``w = e2m1 * 2^(weight_scale - 127)``. The exponent is ``ceil(log2(amax(|block|) / 6))``, so a
block's largest element never saturates (ModelOpt's and SGLang's MXFP4 quantizers choose the
same). Activations are quantized dynamically (no input scales). Routed experts stay stacked as in
the BF16 checkpoint (``moe.gate_proj.weight`` [E, I, H/2], ``weight_scale`` [E, I, H/32]).

config.json ``quantization_config`` is Quark's export config: ``quant_method: quark``,
``global_quant_config`` (weight: fp4 per_group 32 static e8m0; input_tensors: the same, dynamic),
empty ``layer_quant_config`` / ``layer_type_quant_config``, ``exclude`` (the module names kept in
BF16, listed one by one as Quark writes them) and ``export`` (``pack_method: reorder``, no KV-cache
group). Quantized: attention q/k/v/o, dense MLPs, shared and routed experts of the main layers.
Excluded: ``lm_head``, each router ``moe.gate``, each ``g_proj`` (one output per head, narrower than
the MX GEMM tiles) and every Linear of the MTP layers (index >= num_hidden_layers).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from sglang_step35.quant import e2m1
from sglang_step35.quant.pairing import WeightScalePairs

# g_proj gets SGLang's method for this format, which reads the config (Quark's `exclude` says whether g_proj is quantized).
G_PROJ_BY_CONFIG = True
NAMES = ("mxfp4",)
GROUP = 32
E8M0_BIAS = 127
_QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MTP_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "self_attn.g_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "eh_proj",
                "shared_head.output")

_SPEC = {"dtype": "fp4", "qscheme": "per_group", "group_size": GROUP, "ch_axis": -1, "scale_format": "e8m0",
         "scale_calculation_mode": "even", "round_method": "half_even", "observer_cls": "PerBlockMXObserver",
         "symmetric": None, "is_scale_quant": False, "mx_element_dtype": None}
WEIGHT_SPEC = {**_SPEC, "is_dynamic": False}
INPUT_SPEC = {**_SPEC, "is_dynamic": True}


# ---------------------------------------------------------------- math
def quantize(w: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (packed uint8 [..., N, K/2], E8M0 exponents uint8 [..., N, K/group])."""
    *lead, n, k = w.shape
    if k % group:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {group}, got {list(w.shape)}")
    blocks = w.float().reshape(*lead, n, k // group, group)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    exp = torch.ceil(torch.log2(amax / e2m1.E2M1_MAX))
    exp = torch.where(amax > 0, exp, torch.full_like(exp, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = e2m1.encode(blocks / torch.exp2(exp)).reshape(*lead, n, k)
    return e2m1.pack(codes), (exp + E8M0_BIAS).to(torch.uint8).reshape(*lead, n, k // group).contiguous()


def dequantize(packed: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Inverse of :func:`quantize` -> fp32 [..., N, K]. ValueError names a part that does not fit."""
    if scale.dtype != torch.uint8:
        raise ValueError(f"weight_scale is {str(scale.dtype).removeprefix('torch.')}, expected uint8 (E8M0)")
    *lead, n, half = packed.shape
    want = (*lead, n, math.ceil(2 * half / group))
    if (2 * half) % group or tuple(scale.shape) != want:
        raise ValueError(f"weight_scale shape {list(scale.shape)} does not match weight {list(packed.shape)} "
                         f"(expected {list(want)}: one E8M0 scale per {group} elements)")
    vals = e2m1.decode(e2m1.unpack(packed)).reshape(*lead, n, 2 * half // group, group)
    mult = torch.exp2(scale.float() - E8M0_BIAS)
    mult = torch.where(scale == 255, torch.full_like(mult, float("nan")), mult)  # E8M0 NaN
    return (vals * mult.unsqueeze(-1)).reshape(*lead, n, 2 * half)


# ---------------------------------------------------------------- config
def _is_mxfp4(spec: Any, dynamic: bool) -> bool:
    return (isinstance(spec, dict) and spec.get("dtype") == "fp4" and spec.get("qscheme") == "per_group"
            and spec.get("group_size") == GROUP and spec.get("scale_format") == "e8m0"
            and bool(spec.get("is_dynamic")) == dynamic)


def matches(quantization_config: dict) -> bool:
    """A Quark export whose global config is MXFP4 weights with dynamic MXFP4 activations."""
    if str(quantization_config.get("quant_method", "")).lower() != "quark":
        return False
    g = quantization_config.get("global_quant_config") or {}
    return _is_mxfp4(g.get("weight"), False) and _is_mxfp4(g.get("input_tensors"), True)


def _layer(name: str) -> Optional[int]:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() else None


def _excluded_modules(weights: dict[str, torch.Tensor], cfg: dict) -> list[str]:
    n, m = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers", 0) or 0)
    out = ["lm_head"]
    for i in range(n):
        p = f"model.layers.{i}."
        out.append(p + "self_attn.g_proj")
        if p + "moe.gate.weight" in weights:
            out.append(p + "moe.gate")
    for i in range(n, n + m):
        out += [f"model.layers.{i}.{lin}" for lin in _MTP_LINEARS if f"model.layers.{i}.{lin}.weight" in weights]
    return out


def _quantized(name: str, n: int) -> bool:
    i = _layer(name)
    if i is None or i >= n or not name.endswith(".weight"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] in _QUANTIZED


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:  # noqa: ARG001
    """Shape of the checkpoint tensor `<module>.<leaf>` whose BF16 weight has `bf16_shape` ([..., N, K];
    None: not a tensor of this format)."""
    packed, scales = e2m1.checkpoint_shapes(bf16_shape, GROUP)
    return {"weight": packed, "weight_scale": scales}.get(leaf)


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:
    """BF16 Step-3.5 tensors -> Quark's MXFP4 export."""
    if name not in NAMES:
        raise ValueError(f"Quark MXFP4 format: unknown name {name!r}; use one of {NAMES}")
    n = int(cfg["num_hidden_layers"])
    bad = [f"{k} {list(t.shape)}" for k, t in weights.items() if _quantized(k, n) and t.shape[-1] % GROUP]
    if bad:
        raise ValueError(f"MXFP4 needs input dimensions that are multiples of {GROUP}: " + ", ".join(bad))
    out: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        if _quantized(key, n):
            q, s = quantize(t)
            out[key], out[key[: -len(".weight")] + ".weight_scale"] = q, s
        else:
            out[key] = t
    qc = {
        "quant_method": "quark",
        "global_quant_config": {"weight": dict(WEIGHT_SPEC), "input_tensors": dict(INPUT_SPEC),
                                "output_tensors": None, "bias": None, "target_device": None},
        "layer_quant_config": {},
        "layer_type_quant_config": {},
        "exclude": _excluded_modules(weights, cfg),
        "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                   "weight_format": "real_quantized", "weight_merge_groups": None},
        "algo_config": None,
        "quant_mode": "eager_mode",
        "version": "0.10",
    }
    return out, {"quantization_config": qc}


# ---------------------------------------------------------------- CPU dequantization
class Dequantizer(WeightScalePairs):
    """CPU path: pairs each uint8 ``X.weight`` with its E8M0 ``X.weight_scale`` (either order) and
    yields the fp32 weight under ``X.weight``; BF16 tensors (the excluded modules) pass through."""

    FORMAT, SCALE, WEIGHT_DTYPE = "MXFP4", ".weight_scale", torch.uint8

    def __init__(self, quantization_config: Optional[dict] = None, **_: Any):
        super().__init__()
        w = ((quantization_config or {}).get("global_quant_config") or {}).get("weight") or {}
        self.group = int(w.get("group_size") or GROUP)

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize(q, scale, self.group)

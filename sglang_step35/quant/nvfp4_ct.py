"""compressed-tensors NVFP4 Step-3.5 checkpoints (LLM Compressor's ``nvfp4-pack-quantized``; pure torch).

The same numbers as ModelOpt NVFP4 (`quant/nvfp4.py`: FP4 E2M1 elements, one FP8-E4M3 scale per 16
inputs, one fp32 global scale per tensor), stored the compressed-tensors way (its NVFP4
compressor and ``generate_gparam``, LLM Compressor's NVFP4 scheme):
- ``X.weight_packed``: uint8 [N, K/2], two E2M1 codes per byte, element 2i in the low nibble
  (`quant/e2m1.py`);
- ``X.weight_scale``: float8_e4m3fn [N, K/16];
- ``X.weight_global_scale``: float32 [1] (a scalar is read too), the *divisor*:
  ``w = e2m1 * weight_scale / weight_global_scale``, ``weight_global_scale = 448 * 6 / amax(|w|)``
  — the reciprocal of ModelOpt's ``weight_scale_2`` (compressed-tensors' own ModelOpt converter
  inverts it; SGLang's compressed-tensors NVFP4 schemes take ``1 / weight_global_scale`` after loading);
- ``X.input_global_scale``: float32 [1], the activations' global scale (same convention), calibrated by
  LLM Compressor; read only by the W4A4 GPU kernels (our tiny writes a nominal |x| <= 8 range).
Fused siblings (q/k/v; gate/up, per expert) share one global scale, as LLM Compressor fuses them
(SGLang's NVFP4 kernels take one per fused GEMM and refuse differing ones).

Routed experts are written per expert (``model.layers.L.moe.experts.E.gate_proj.weight_packed``), as
LLM Compressor exports the Linear modules it quantizes. Config: ``quant_method: compressed-tensors``,
``format: nvfp4-pack-quantized``, one config group targeting ``Linear`` with 4-bit float
``tensor_group`` weights and activations of group 16 (the NVFP4 preset; weight-only NVFP4A16, with no
``input_activations``, is recognised as well), and an ``ignore`` list: ``lm_head``, the routers
``moe.gate`` and the MTP layers (index >= num_hidden_layers, kept BF16 whole). Everything else that is
a Linear of a main layer is quantized, ``g_proj`` included (LLM Compressor targets every Linear it is
not told to ignore).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from sglang_step35.quant import e2m1, nvfp4
from sglang_step35.quant.pairing import ModuleParts

NAMES = ("nvfp4-ct",)
# g_proj follows the checkpoint's `ignore` list (SGLang's compressed-tensors method honours it).
G_PROJ_BY_CONFIG = True
GROUP = nvfp4.GROUP
FORMAT = "nvfp4-pack-quantized"
_GLOBAL_MAX = e2m1.E2M1_MAX * nvfp4.E4M3_MAX  # 6 * 448: an amax maps to the largest FP8 x FP4 product
_CT_METHODS = ("compressed-tensors", "compressed_tensors")
_PARTS = (".weight_global_scale", ".input_global_scale", ".weight_packed", ".weight_scale")
_NEEDED = (".weight_packed", ".weight_scale", ".weight_global_scale")
_LINEARS = nvfp4._LINEARS
_FUSED = nvfp4._FUSED
_MOE_STACKED = re.compile(r"^(model\.layers\.\d+\.moe\.)(gate|up|down)_proj$")


def _is_nvfp4_args(args: Any) -> bool:
    return (isinstance(args, dict) and str(args.get("type", "")).lower() == "float"
            and int(args.get("num_bits") or 0) == 4 and args.get("group_size") == GROUP
            and str(args.get("strategy", "")).lower() == "tensor_group")


def matches(quantization_config: dict) -> bool:
    """compressed-tensors whose every config group is NVFP4 weights (4-bit float, tensor_group, group
    16) with NVFP4 or no input activations."""
    qc = quantization_config
    groups = list((qc.get("config_groups") or {}).values())
    if str(qc.get("quant_method", "")).lower() not in _CT_METHODS or not groups:
        return False
    return all(_is_nvfp4_args(g.get("weights")) and (g.get("input_activations") is None
                                                     or _is_nvfp4_args(g.get("input_activations")))
               for g in groups)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' weight/input global scale for max |x| `amax` (fp32; 1 where amax is 0)."""
    a = amax.float()
    return torch.where(a > 0, _GLOBAL_MAX / torch.where(a > 0, a, 1.0), torch.ones_like(a))


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, weight_global_scale: torch.Tensor) -> torch.Tensor:
    """One Linear's parts -> fp32 [N, K]; ValueError names a part that does not fit. Multiplies by the
    reciprocal as SGLang's kernels do (they load ``1 / weight_global_scale`` as weight_scale_2)."""
    if weight_global_scale.numel() != 1:
        raise ValueError(f"weight_global_scale shape {list(weight_global_scale.shape)}: one per weight "
                         "([1] or a scalar)")
    if weight_global_scale.dtype != torch.float32:
        raise ValueError(f"weight_global_scale is {str(weight_global_scale.dtype).removeprefix('torch.')}, "
                         "expected float32")
    return nvfp4.dequantize(packed, block_scale, 1.0 / weight_global_scale.reshape(()))


# ---------------------------------------------------------------- writer
def _layer(name: str) -> Optional[int]:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _ignore(cfg: dict) -> list[str]:
    n, m = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers", 0) or 0)
    mtp = "|".join(str(i) for i in range(n, n + m))
    return ["lm_head", r"re:.*\.moe\.gate$"] + ([rf"re:^model\.layers\.({mtp})\..*"] if mtp else [])


def quantization_config(cfg: dict) -> dict:
    """config.json `quantization_config` of an LLM Compressor NVFP4 export."""
    args = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": GROUP, "strategy": "tensor_group",
            "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "weights": {**args, "dynamic": False},
            "input_activations": {**args, "dynamic": "local"}, "output_activations": None, "format": FORMAT}},
        "ignore": _ignore(cfg), "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None,
    }


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:
    """BF16 Step-3.5 tensors -> the compressed-tensors NVFP4 export (routed experts per expert)."""
    if name not in NAMES:
        raise ValueError(f"compressed-tensors NVFP4: unknown name {name!r}; use one of {NAMES}")
    n = int(cfg["num_hidden_layers"])
    modules = [k[: -len(".weight")] for k in weights
               if k.endswith(".weight") and k[: -len(".weight")].rsplit(".", 1)[-1] in _LINEARS
               and (_layer(k) is not None and _layer(k) < n)]
    bad = [f"{m}.weight {list(weights[m + '.weight'].shape)}" for m in modules if weights[m + ".weight"].shape[-1] % GROUP]
    if bad:
        raise ValueError(f"NVFP4 needs input dimensions that are multiples of {GROUP}: " + ", ".join(bad))
    groups: dict[str, list[str]] = {}  # fused siblings share one global scale
    for m in modules:
        parent, leaf = m.rsplit(".", 1)
        groups.setdefault(f"{parent}.{_FUSED[leaf]}" if leaf in _FUSED else m, []).append(m)
    quantized = set(modules)
    out = {k: t for k, t in weights.items() if k.removesuffix(".weight") not in quantized}
    for members in groups.values():
        ws = {m: weights[m + ".weight"] for m in members}
        amax = torch.stack([w.float().abs().amax(dim=(-2, -1)) for w in ws.values()]).amax(dim=0)
        gs = global_scale(amax)  # [] or [E] for stacked experts
        ins = global_scale(torch.tensor(8.0 * (1.0 + (_layer(members[0]) or 0) / 16))).reshape(1)
        for m, w in ws.items():
            packed, bs = nvfp4.quantize(w, 1.0 / gs)
            stacked = _MOE_STACKED.match(m)
            if stacked is None:
                out.update({m + ".weight_packed": packed, m + ".weight_scale": bs,
                            m + ".weight_global_scale": gs.reshape(1).clone(), m + ".input_global_scale": ins.clone()})
                continue
            for e in range(w.shape[0]):  # LLM Compressor exports each expert's Linear on its own
                base = f"{stacked.group(1)}experts.{e}.{stacked.group(2)}_proj"
                out.update({base + ".weight_packed": packed[e].contiguous(), base + ".weight_scale": bs[e].contiguous(),
                            base + ".weight_global_scale": gs[e].reshape(1).clone(),
                            base + ".input_global_scale": ins.clone()})
    return out, {"quantization_config": quantization_config(cfg)}


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:  # noqa: ARG001
    """Shape of checkpoint tensor `<module>.<leaf>` whose BF16 weight has `bf16_shape` ([..., N, K]).
    The global scales return None: exports write [1] or a scalar, and SGLang's per-tensor loaders
    take both (and name any other shape)."""
    packed, scales = e2m1.checkpoint_shapes(bf16_shape, GROUP)
    return {"weight_packed": packed, "weight_scale": scales}.get(leaf)


# ---------------------------------------------------------------- CPU dequantization
class Dequantizer(ModuleParts):
    """CPU path: collects each module's ``weight_packed`` / ``weight_scale`` / ``weight_global_scale``
    (any order) and yields the fp32 weight under ``X.weight``; ``input_global_scale`` only serves the
    GPU kernels and is dropped. Unquantized tensors pass through."""

    PARTS, DROPPED, WEIGHT = _PARTS, ".input_global_scale", ".weight_packed"

    def __init__(self, quantization_config: Optional[dict] = None, **_: Any):  # noqa: ARG002 (registry signature)
        super().__init__()

    def needs(self, parts: dict[str, torch.Tensor]) -> tuple[str, ...]:  # noqa: ARG002 (one fixed set)
        return _NEEDED

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return dequantize(parts[".weight_packed"], parts[".weight_scale"], parts[".weight_global_scale"])

    def incomplete(self, base: str, parts: dict[str, torch.Tensor], needs: Optional[tuple[str, ...]]) -> str:
        if ".weight_packed" not in parts:
            return f"{base}: {', '.join(p.lstrip('.') for p in sorted(parts))} without its weight_packed"
        return f"{base}.weight_packed: NVFP4 weight without {', '.join(base + p for p in needs if p not in parts)}"

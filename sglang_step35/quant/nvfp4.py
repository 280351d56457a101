"""ModelOpt NVFP4 Step-3.5 checkpoints, plain and MIXED_PRECISION (pure torch, SGLang-free).

NVFP4 (NVIDIA's FP4 with two-level scaling, as TensorRT Model Optimizer exports it):
- ``X.weight``: uint8 [..., N, K/2], FP4 E2M1 elements two per byte (`quant/e2m1.py`);
- ``X.weight_scale``: float8_e4m3fn [..., N, K/16], one scale per 16 consecutive input elements;
- ``X.weight_scale_2``: float32 global scale (a scalar for a Linear, [E] for stacked experts);
- ``X.input_scale``: float32 global activation scale (same shapes as weight_scale_2);
``w = e2m1 * weight_scale * weight_scale_2``. The export picks ``weight_scale_2 = amax(|w|) / (6 * 448)``
so that each block scale ``amax(|block|) / 6 / weight_scale_2`` fits E4M3. Fused siblings (q/k/v,
gate/up; per expert for the routed gate/up) share one ``weight_scale_2`` as ModelOpt's export makes
them: SGLang's NVFP4 linear takes the max of the shards' global scales for the fused GEMM.
Routed experts stay stacked as in the BF16 checkpoint (``moe.gate_proj.weight`` [E, I, H/2], scales
[E, I, H/16] and [E]): what SGLang's Step-3.5 loaders index per expert.

Configs (both written, as ModelOpt exports do): config.json ``quantization_config`` in the flat form
(``quant_method: modelopt``, ``quant_algo``, ``ignore``) and ``hf_quant_config.json`` in the nested one
(``{"producer": ..., "quantization": {"quant_algo", "exclude_modules", ...}}``).
- ``nvfp4``: ``quant_algo: NVFP4``, group 16. Quantized: attention q/k/v/o and g_proj, dense MLPs,
  shared and routed experts of the main layers. Excluded by name (glob patterns over checkpoint
  module names): ``lm_head``, the routers ``model.layers.*.moe.gate`` and the MTP layers
  (index >= num_hidden_layers, whole: ModelOpt recipes keep MTP in BF16).
- ``modelopt-mixed``: ``quant_algo: MIXED_PRECISION`` with ``quantized_layers`` keyed by checkpoint
  module names (``model.layers.3.moe.gate_proj`` for the stacked routed experts) mapping to
  ``{"quant_algo": "NVFP4", "group_size": 16}`` or ``{"quant_algo": "FP8"}`` (ModelOpt's per-tensor
  FP8: ``weight`` float8_e4m3fn [N, K], ``weight_scale`` and ``input_scale`` float32 scalars). The tiny
  export mixes both and leaves modules out: attention FP8 (layer 1: NVFP4; layer 2's o_proj not
  listed, so BF16), dense MLP NVFP4 except layer 0's (excluded by ``model.layers.0.mlp*``, BF16),
  shared experts FP8, routed experts NVFP4, ``g_proj``, routers, ``lm_head`` and MTP not listed (BF16).
There is no calibration data, so each ``input_scale`` is a nominal activation range (|x| <= 8, a
little larger per layer so tests can tell the tensors apart); it is read only by GPU kernels.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch

from sglang_step35.quant import e2m1
from sglang_step35.quant.pairing import ModuleParts

# g_proj gets SGLang's method for this format, which reads the config (ModelOpt's `ignore` / `quantized_layers` say whether g_proj is quantized).
G_PROJ_BY_CONFIG = True
NAMES = ("nvfp4", "modelopt-mixed")
GROUP = 16
FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
PRODUCER = {"name": "modelopt", "version": "0.37.0"}
_PARTS = (".weight_scale_2", ".weight_scale", ".input_scale", ".weight")  # longest suffix first
_MODELOPT_METHODS = ("modelopt", "modelopt_fp4", "modelopt_mixed")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj")
# Fused siblings share one global scale (the fused GEMM has one).
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


# ---------------------------------------------------------------- math
def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's weight_scale_2 for a (group of) tensor(s) with max |w| `amax` (fp32; 1 for zeros)."""
    s = amax.float() / (e2m1.E2M1_MAX * E4M3_MAX)
    return torch.where(s > 0, s, torch.ones_like(s))


def quantize(w: torch.Tensor, scale_2: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] with global scale `scale_2` (shape [...], one per leading index) ->
    (packed uint8 [..., N, K/2], E4M3 block scales [..., N, K/group])."""
    *lead, n, k = w.shape
    if k % group:
        raise ValueError(f"NVFP4 needs the input dimension to be a multiple of {group}, got {list(w.shape)}")
    s2 = scale_2.float().reshape(*lead, 1, 1, 1)
    blocks = w.float().reshape(*lead, n, k // group, group)
    block_scale = (blocks.abs().amax(dim=-1, keepdim=True) / (e2m1.E2M1_MAX * s2)).clamp(max=E4M3_MAX).to(FP8_DTYPE)
    denom = block_scale.float() * s2
    scaled = torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)
    codes = e2m1.encode(scaled).reshape(*lead, n, k)
    return e2m1.pack(codes), block_scale.reshape(*lead, n, k // group).contiguous()


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor,
               group: int = GROUP) -> torch.Tensor:
    """Inverse of :func:`quantize` -> fp32 [..., N, K]. ValueError names a part that does not fit."""
    if block_scale.dtype != FP8_DTYPE:
        raise ValueError(f"weight_scale is {str(block_scale.dtype).removeprefix('torch.')}, expected float8_e4m3fn")
    *lead, n, half = packed.shape
    want = (*lead, n, 2 * half // group)
    if (2 * half) % group or tuple(block_scale.shape) != want:
        raise ValueError(f"weight_scale shape {list(block_scale.shape)} does not match weight {list(packed.shape)} "
                         f"(expected {list(want)}: one E4M3 scale per {group} elements)")
    if scale_2.numel() not in (1, math.prod(lead)):
        raise ValueError(f"weight_scale_2 shape {list(scale_2.shape)} does not match weight {list(packed.shape)} "
                         f"(expected {list(lead) or '[] (a scalar)'})")
    vals = e2m1.decode(e2m1.unpack(packed)).reshape(*lead, n, 2 * half // group, group)
    s2 = scale_2.float().reshape(*lead, 1, 1, 1) if scale_2.numel() > 1 else scale_2.float().reshape(())
    return (vals * block_scale.float().unsqueeze(-1) * s2).reshape(*lead, n, 2 * half)


def quantize_fp8_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ModelOpt per-tensor FP8: w -> (float8_e4m3fn, fp32 scalar scale = amax / 448; 1 for zeros)."""
    amax = w.float().abs().amax()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (w.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE), scale.reshape(())


def dequantize_fp8_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() != 1:
        raise ValueError(f"weight_scale shape {list(scale.shape)}: ModelOpt FP8 has one scale per tensor")
    return q.float() * scale.float().reshape(())


# ---------------------------------------------------------------- config
def _section(qc: dict) -> dict:
    """The quantization settings of a flat (config.json) or nested (hf_quant_config.json) config."""
    inner = qc.get("quantization")
    return inner if isinstance(inner, dict) else qc


def _layer_algos(qc: dict) -> set[str]:
    return {str(v.get("quant_algo", "")).upper() for v in (_section(qc).get("quantized_layers") or {}).values()
            if isinstance(v, dict)}


def matches(quantization_config: dict) -> bool:
    """ModelOpt NVFP4, or ModelOpt MIXED_PRECISION with at least one NVFP4 layer (what SGLang's
    ModelConfig sends to its ``modelopt_mixed`` method; without NVFP4 layers it is another format)."""
    sec = _section(quantization_config)
    method = str(quantization_config.get("quant_method", sec.get("quant_method", "modelopt"))).lower()
    if method not in _MODELOPT_METHODS:
        return False
    algo = str(sec.get("quant_algo", "")).upper()
    return algo == "NVFP4" or (algo == "MIXED_PRECISION" and "NVFP4" in _layer_algos(quantization_config))


def _layer(name: str) -> Optional[int]:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _module(name: str) -> Optional[str]:
    """Checkpoint module of a main-model Linear weight `name`, else None."""
    if not name.endswith(".weight"):
        return None
    module = name[: -len(".weight")]
    leaf = module.rsplit(".", 1)[-1]
    return module if leaf in _LINEARS else None


def _mtp_patterns(cfg: dict) -> list[str]:
    n, m = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers", 0) or 0)
    return [f"model.layers.{i}.*" for i in range(n, n + m)]


def _mixed_algo(module: str) -> Optional[str]:
    """The tiny MIXED_PRECISION export's choice for a main-layer module (None: BF16, not listed)."""
    i, leaf = _layer(module), module.rsplit(".", 1)[-1]
    if leaf == "g_proj":
        return None
    if ".self_attn." in module:
        if i == 2 and leaf == "o_proj":
            return None
        return "NVFP4" if i == 1 else "FP8"
    if ".mlp." in module:
        return None if i == 0 else "NVFP4"
    if ".share_expert." in module:
        return "FP8"
    if ".moe." in module:
        return "NVFP4"
    return None


def _nominal_input_scale(layer: int) -> torch.Tensor:
    return torch.tensor(8.0 * (1.0 + layer / 16) / (e2m1.E2M1_MAX * E4M3_MAX), dtype=torch.float32)


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:
    """Shape of the checkpoint tensor `<module>.<leaf>` whose BF16 weight has `bf16_shape` ([..., N, K];
    None: not a tensor of this format, or not knowable from the leaf alone: in a MIXED_PRECISION
    checkpoint `weight` / `weight_scale` depend on the module's algorithm, FP8 or NVFP4)."""
    if leaf in ("weight_scale_2", "input_scale"):
        return tuple(bf16_shape[:-2])  # one per expert for stacked experts, a scalar for a Linear
    if str(_section(quantization_config).get("quant_algo", "")).upper() != "NVFP4":
        return None
    packed, scales = e2m1.checkpoint_shapes(bf16_shape, int(_section(quantization_config).get("group_size") or GROUP))
    return {"weight": packed, "weight_scale": scales}.get(leaf)


# ---------------------------------------------------------------- writer
def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:
    """BF16 Step-3.5 tensors -> the ModelOpt export `name` ("nvfp4" or "modelopt-mixed")."""
    if name not in NAMES:
        raise ValueError(f"ModelOpt format: unknown name {name!r}; use one of {NAMES}")
    n = int(cfg["num_hidden_layers"])
    algo_of: dict[str, str] = {}
    for key in weights:
        module, i = _module(key), _layer(key)
        if module is None or i is None or i >= n:
            continue
        algo = "NVFP4" if name == "nvfp4" else _mixed_algo(module)
        if algo is not None:
            algo_of[module] = algo
    bad = [f"{m}.weight {list(weights[m + '.weight'].shape)}" for m, a in algo_of.items()
           if a == "NVFP4" and weights[m + ".weight"].shape[-1] % GROUP]
    if bad:
        raise ValueError(f"NVFP4 needs input dimensions that are multiples of {GROUP}: " + ", ".join(bad))

    # One global scale per fused group (per expert for stacked experts).
    groups: dict[str, list[str]] = {}
    for module, algo in algo_of.items():
        parent, leaf = module.rsplit(".", 1)
        key = f"{parent}.{_FUSED[leaf]}" if algo == "NVFP4" and leaf in _FUSED else module
        groups.setdefault(key, []).append(module)
    out: dict[str, torch.Tensor] = {k: t for k, t in weights.items()
                                    if k.removesuffix(".weight") not in algo_of}
    for members in groups.values():
        ws = {m: weights[m + ".weight"] for m in members}
        insc = _nominal_input_scale(_layer(members[0]) or 0)
        if algo_of[members[0]] == "FP8":
            (m,) = members
            q, s = quantize_fp8_tensor(ws[m])
            out.update({m + ".weight": q, m + ".weight_scale": s, m + ".input_scale": insc.clone()})
            continue
        lead = ws[members[0]].shape[:-2]
        amax = torch.stack([w.float().abs().amax(dim=(-2, -1)) for w in ws.values()]).amax(dim=0)
        s2 = global_scale(amax)  # [] or [E]
        for m, w in ws.items():
            q, bs = quantize(w, s2)
            out.update({m + ".weight": q, m + ".weight_scale": bs, m + ".weight_scale_2": s2.clone(),
                        m + ".input_scale": insc.expand(lead).clone() if lead else insc.clone()})

    excludes = ["lm_head", "model.layers.*.moe.gate", *_mtp_patterns(cfg)]
    if name == "nvfp4":
        algo = {"quant_algo": "NVFP4", "group_size": GROUP, "kv_cache_quant_algo": None}
    else:
        excludes.insert(1, "model.layers.0.mlp*")
        layers = {m: ({"quant_algo": "NVFP4", "group_size": GROUP} if a == "NVFP4" else {"quant_algo": "FP8"})
                  for m, a in sorted(algo_of.items())}
        algo = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    flat = {"quant_method": "modelopt", **algo, "ignore": list(excludes), "producer": dict(PRODUCER)}
    nested = {"producer": dict(PRODUCER), "quantization": {**algo, "exclude_modules": list(excludes)}}
    return out, {"quantization_config": flat, "files": {"hf_quant_config.json": nested}}


# ---------------------------------------------------------------- CPU dequantization
class Dequantizer(ModuleParts):
    """CPU path: collects each module's parts (``weight``, ``weight_scale``, ``weight_scale_2``,
    ``input_scale``; any order) and yields the fp32 weight under ``X.weight`` once complete: NVFP4
    (uint8 weight: block and global scales needed) or ModelOpt per-tensor FP8 (float8 weight: its
    ``weight_scale``). ``input_scale`` only serves GPU kernels and is dropped. BF16 tensors pass."""

    PARTS, DROPPED, WEIGHT = _PARTS, ".input_scale", ".weight"

    def __init__(self, quantization_config: Optional[dict] = None, **_: Any):
        super().__init__()
        self.group = int(_section(quantization_config or {}).get("group_size") or GROUP)

    def passes(self, part: str, tensor: torch.Tensor) -> bool:
        return not part or (part == ".weight" and tensor.dtype not in (torch.uint8, FP8_DTYPE))

    def needs(self, parts: dict[str, torch.Tensor]) -> Optional[tuple[str, ...]]:
        w = parts.get(".weight")
        if w is None:
            return None
        return (".weight_scale", ".weight_scale_2") if w.dtype == torch.uint8 else (".weight_scale",)

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        w = parts[".weight"]
        if w.dtype == torch.uint8:
            return dequantize(w, parts[".weight_scale"], parts[".weight_scale_2"], self.group)
        return dequantize_fp8_tensor(w, parts[".weight_scale"])

    def incomplete(self, base: str, parts: dict[str, torch.Tensor], needs: Optional[tuple[str, ...]]) -> str:
        if needs is None:
            if set(parts) == {".input_scale"}:
                return f"{base}.input_scale: without its quantized weight"
            return f"{base}: {', '.join(p.lstrip('.') for p in sorted(parts))} without its quantized weight"
        missing = [base + p for p in needs if p not in parts]
        return f"{base}.weight: quantized weight without {', '.join(missing)}"

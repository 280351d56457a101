"""W8A8-INT8 Step-3.5 checkpoints: symmetric per-output-channel INT8 weights, dynamic per-token INT8
activations. Two exports of the same numbers (pure torch, SGLang-free):

- SGLang's own ``w8a8_int8`` (``quantization_config: {"quant_method": "w8a8_int8", "ignore": [...]}``,
  SGLang's ``W8A8Int8Config``): ``X.weight`` int8 [N, K] and ``X.weight_scale`` float32 [N, 1];
  ``w = weight * weight_scale``. Step-3.5's routed experts stay stacked as in the BF16 checkpoint
  (``moe.gate_proj.weight`` int8 [E, I, H], ``moe.gate_proj.weight_scale`` [E, I, 1]).
- compressed-tensors ``int-quantized`` (LLM Compressor's W8A8 scheme: ``config_groups`` with weights
  ``{"type": "int", "num_bits": 8, "symmetric": true, "strategy": "channel"}`` and dynamic per-token
  ``input_activations``, ``ignore`` list): the same ``weight`` / ``weight_scale`` [N, 1], the scale in
  the model dtype (bf16), and the routed experts unrolled per expert
  (``moe.experts.E.gate_proj.weight``), as LLM Compressor writes the Linear modules it quantizes.
  SGLang 0.5.23's compressed-tensors W8A8-INT8 MoE scheme raises "implemented only for NPU"; its
  ``w8a8_int8`` method reads the same tensors and has the Triton INT8 MoE, and SGLang accepts
  ``--quantization w8a8_int8`` on a compressed-tensors checkpoint (model_config.py's compatible
  methods), which is how this variant is served.

What is quantized (both): attention q/k/v/o, dense MLPs, shared and routed experts of the main layers;
kept BF16 (``ignore``): router ``moe.gate``, ``lm_head``, embeddings, norms and the MTP layers
(index >= num_hidden_layers, whole). ``g_proj`` is BF16 in SGLang's variant and quantized in the
compressed-tensors one (LLM Compressor targets every Linear it is not told to ignore).
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from sglang_step35.quant.pairing import WeightScalePairs

NAMES = ("w8a8-int8", "w8a8-int8-ct")
# g_proj follows the checkpoint's `ignore` list (SGLang's method for it honours the list).
G_PROJ_BY_CONFIG = True
# No KV-cache scales in either export: the attention is built without the quant config.
KV_CACHE_SCALES = False
SCALE = ".weight_scale"
INT8_MAX = 127

_CT_METHODS = ("compressed-tensors", "compressed_tensors")
# The --quantization value that serves these checkpoints on GPUs (quant.method_refusal).
SERVING_METHOD = "w8a8_int8"
_MOE_STACKED = re.compile(r"^(model\.layers\.\d+\.moe\.)(gate|up|down)_proj\.weight$")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _groups(qc: dict) -> list[dict]:
    return list((qc.get("config_groups") or {}).values())


def _is_int8_group(g: dict) -> bool:
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    return (w.get("type") == "int" and int(w.get("num_bits", 0)) == 8
            and a.get("type") == "int" and int(a.get("num_bits", 0)) == 8)


def matches(quantization_config: dict) -> bool:
    """SGLang's ``w8a8_int8``, or compressed-tensors whose every config group is INT8 weights and INT8
    activations (W8A8)."""
    method = str(quantization_config.get("quant_method", "")).lower()
    if method == "w8a8_int8":
        return True
    groups = _groups(quantization_config)
    return method in _CT_METHODS and bool(groups) and all(_is_int8_group(g) for g in groups)


def is_compressed_tensors(quantization_config: dict) -> bool:
    return str(quantization_config.get("quant_method", "")).lower() in _CT_METHODS


def config_problems(quantization_config: dict) -> list[str]:
    """What in a matching quantization_config SGLang's ``w8a8_int8`` method cannot run (it has
    per-channel symmetric weights and dynamic per-token activations only), each named."""
    out = []
    for key, g in (quantization_config.get("config_groups") or {}).items():
        w, a = g.get("weights") or {}, g.get("input_activations") or {}
        if w.get("strategy", "channel") != "channel":
            out.append(f"config_groups.{key}.weights.strategy={w.get('strategy')!r}: SGLang's w8a8_int8 "
                       "method has per-channel INT8 weights only (re-export with strategy 'channel')")
        if not w.get("symmetric", True):
            out.append(f"config_groups.{key}.weights.symmetric=false: asymmetric INT8 (zero points) is "
                       "not run by SGLang's w8a8_int8 method (re-export symmetric)")
        if not a.get("dynamic", True) or a.get("strategy", "token") != "token":
            out.append(f"config_groups.{key}.input_activations: static or non-per-token INT8 activations "
                       "(SGLang's w8a8_int8 quantizes activations dynamically per token; static input "
                       "scales would be ignored)")
    return out


def quantize_channel(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (int8 [..., N, K], scale [..., N, 1] in `scale_dtype`), symmetric:
    scale = amax(|row|) / 127 (zero rows: 1), weight = round(w / scale) in [-127, 127]. The scale is
    rounded to `scale_dtype` first so that weight * stored scale is what the export means."""
    wf = w.float()
    amax = wf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = torch.round(wf / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def dequantize_channel(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 [..., N, K] x scale [..., N, 1] -> fp32 (ValueError if the scale does not fit)."""
    want = (*q.shape[:-1], 1)
    if q.dtype != torch.int8:
        raise ValueError(f"weight is {str(q.dtype).removeprefix('torch.')}, expected int8")
    if tuple(scale.shape) != want:
        raise ValueError(f"weight_scale shape {list(scale.shape)} does not match weight {list(q.shape)} "
                         f"(expected {list(want)}: one scale per output channel)")
    return q.float() * scale.float()


def _quantized(name: str, n_layers: int, ct: bool) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m is None or int(m.group(1)) >= n_layers or not name.endswith(".weight"):
        return False  # embeddings, lm_head, final norm, MTP layers
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    if module == "g_proj":
        return ct
    return module in _LINEARS


def _ignore(cfg: dict, ct: bool) -> list[str]:
    n, m = int(cfg["num_hidden_layers"]), int(cfg.get("num_nextn_predict_layers", 0) or 0)
    mtp = "|".join(str(i) for i in range(n, n + m))
    out = ["lm_head", r"re:.*\.moe\.gate$"]
    if not ct:
        out.append(r"re:.*\.self_attn\.g_proj$")
    if mtp:
        out.append(rf"re:^model\.layers\.({mtp})\..*")
    return out


def write_checkpoint_tensors(weights: dict[str, torch.Tensor], cfg: dict, name: str) -> tuple[dict, dict]:
    """BF16 Step-3.5 tensors -> `name` ("w8a8-int8": SGLang's layout, stacked experts, fp32 scales;
    "w8a8-int8-ct": compressed-tensors, per-expert tensors, bf16 scales)."""
    if name not in NAMES:
        raise ValueError(f"int8 format: unknown name {name!r}; use one of {NAMES}")
    ct = name == "w8a8-int8-ct"
    n = int(cfg["num_hidden_layers"])
    scale_dtype = torch.bfloat16 if ct else torch.float32
    out: dict[str, torch.Tensor] = {}
    for key, t in weights.items():
        if not _quantized(key, n, ct):
            out[key] = t
            continue
        q, s = quantize_channel(t, scale_dtype)
        m = _MOE_STACKED.match(key)
        if ct and m:  # LLM Compressor exports each expert's Linear on its own
            for e in range(q.shape[0]):
                base = f"{m.group(1)}experts.{e}.{m.group(2)}_proj"
                out[base + ".weight"], out[base + SCALE] = q[e].contiguous(), s[e].contiguous()
        else:
            out[key], out[key[: -len(".weight")] + SCALE] = q, s
    if ct:
        qc: dict[str, Any] = {
            "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                            "dynamic": False, "observer": "minmax"},
                "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                      "dynamic": True, "observer": None},
            }},
            "ignore": _ignore(cfg, ct),
        }
    else:
        qc = {"quant_method": "w8a8_int8", "is_dynamic": True, "ignore": _ignore(cfg, ct)}
    return out, {"quantization_config": qc}


class Dequantizer(WeightScalePairs):
    """CPU path: pairs each int8 ``X.weight`` with ``X.weight_scale`` (either order in the stream) and
    yields the fp32 weight under ``X.weight`` (per-expert names stay per-expert: the loader takes
    both layouts); records unpaired / mis-shaped parts and what the config asks that cannot run."""

    FORMAT, SCALE, WEIGHT_DTYPE = "INT8", SCALE, torch.int8

    def __init__(self, quantization_config: dict):
        super().__init__()
        self._problems += [f"quantization_config: {p}" for p in config_problems(quantization_config)]

    def decode(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_channel(q, scale)


def checkpoint_shape(leaf: str, bf16_shape: tuple, quantization_config: dict) -> Optional[tuple]:  # noqa: ARG001 (registry signature)
    """Shape of the checkpoint tensor `<module>.<leaf>` whose BF16 weight has `bf16_shape` (None: not a
    tensor of this format)."""
    if leaf == "weight":
        return tuple(bf16_shape)
    if leaf == "weight_scale":
        return (*bf16_shape[:-1], 1)
    return None


def method_problems(quantization_config: dict, method: str) -> list[str]:
    """What keeps SGLang's quantization method `method` (its get_name()) from running this checkpoint
    on a GPU, each with what to use instead (empty: it runs)."""
    out = config_problems(quantization_config)
    if method in _CT_METHODS:
        out.append("a compressed-tensors W8A8-INT8 checkpoint under SGLang's compressed-tensors method: its "
                   "INT8 fused-MoE scheme is implemented only for NPU in SGLang 0.5.23; serve it with "
                   "--quantization w8a8_int8 (SGLang's W8A8Int8 method reads the same weight/weight_scale "
                   "tensors and runs the Triton INT8 fused MoE)")
    elif method != "w8a8_int8":
        out.append(f"a W8A8-INT8 checkpoint under SGLang's {method!r} method (use --quantization w8a8_int8 "
                   "or none)")
    return out

"""Registry of the quantized checkpoint formats Step-3.5 loads (issue #25).

One SGLang-free module per format, written from the format's public specification. Each exports
- ``NAMES``: the ``step35 tiny --quant`` names it writes;
- ``matches(quantization_config) -> bool``: whether a checkpoint's quantization_config (config.json's,
  or ModelOpt's hf_quant_config.json) is this format;
- ``write_checkpoint_tensors(weights, cfg, name) -> (tensors, extra)``: BF16 Step-3.5 tensors -> the
  format's tensors; ``extra["quantization_config"]`` goes into config.json, ``extra.get("files")`` maps
  side-file names to JSON objects;
- ``Dequantizer(quantization_config)`` with ``feed(name, tensor) -> [(name, fp32 tensor)]`` (all parts
  of a weight seen -> the weight under its BF16 name; unquantized tensors pass through) and
  ``problems() -> [str]`` (unpaired / mis-shaped parts, named), for the CPU path: SGLang's kernels for
  these formats do not run on a CPU without AMX, so there the model is built unquantized and the
  loader dequantizes while loading (models/quant_build.py ``cpu_dequant_fallback``).
Block FP8 (Step-3.5-Flash-FP8) lives in ``sglang_step35.fp8`` and is registered like the others.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

from sglang_step35 import fp8
from sglang_step35.quant import int8
from sglang_step35.quant import w4a16
from sglang_step35.quant import autoround, mxfp4, nvfp4, nvfp4_ct

# Allow-list: a format is loaded only once its module is listed here (one line per format).
FORMATS: tuple[ModuleType, ...] = (fp8, int8, w4a16, nvfp4, mxfp4, nvfp4_ct, autoround)


def format_for(quantization_config: Optional[dict]) -> Optional[ModuleType]:
    """The registered format module of a checkpoint's quantization_config; None for none (BF16) or a
    format no module claims (SGLang's own handling and our allow-list then decide)."""
    if not quantization_config:
        return None
    hits = [m for m in FORMATS if m.matches(dict(quantization_config))]
    if len(hits) > 1:  # two modules claiming one config is a registry bug, not a user error
        raise RuntimeError(f"quantization_config claimed by {[m.__name__ for m in hits]}: {quantization_config!r}")
    return hits[0] if hits else None


def tiny_names() -> list[str]:
    """Every `step35 tiny --quant` name, in registry order."""
    return [n for m in FORMATS for n in m.NAMES]


def format_for_tiny(name: str) -> ModuleType:
    """The format module writing tiny checkpoints named `name` (ValueError names the choices)."""
    for m in FORMATS:
        if name in m.NAMES:
            return m
    raise ValueError(f"unknown quantization {name!r} for a tiny checkpoint; use one of {', '.join(tiny_names())}")


def checkpoint_quantization_config(hf_config: Any) -> Optional[dict]:
    """The checkpoint's quantization_config as SGLang reads it: config.json's `quantization_config`
    (or `compression_config`, compressed-tensors' older key), else ModelOpt's hf_quant_config.json
    next to it (its `quantization` section merged with `producer`, as SGLang's ModelConfig does)."""
    get = hf_config.get if isinstance(hf_config, dict) else (lambda k, d=None: getattr(hf_config, k, d))
    for key in ("quantization_config", "compression_config"):
        qc = get(key, None)
        if qc:
            return dict(qc) if not isinstance(qc, dict) else qc
    where = get("_name_or_path", None)
    side = Path(where) / "hf_quant_config.json" if where else None
    if side is not None and side.is_file():
        raw = json.loads(side.read_text())
        merged = dict(raw.get("quantization", {}))
        merged.setdefault("quant_method", "modelopt")
        if "producer" in raw:
            merged["producer"] = raw["producer"]
        return merged
    return None


def g_proj_quant_config(quant_config: Any, hf_config: Any) -> Any:
    """The quant config to build the attention gate `g_proj` with. A format whose exports quantize it
    by their ignore lists (`G_PROJ_BY_CONFIG = True` in the format module, e.g. compressed-tensors'
    "every Linear not ignored") gets SGLang's method for it, which honours the list; otherwise (block
    FP8: Step-3.5-Flash-FP8 keeps g_proj BF16 without listing it) it is built unquantized."""
    if quant_config is None:
        return None
    fmt = format_for(checkpoint_quantization_config(hf_config))
    return quant_config if fmt is not None and getattr(fmt, "G_PROJ_BY_CONFIG", False) else None


def attention_quant_config(quant_config: Any, hf_config: Any) -> Any:
    """The quant config for RadixAttention (which takes one only for KV-cache scales). A format that
    has none (`KV_CACHE_SCALES = False`, e.g. W8A8-INT8) gets None: SGLang's W8A8Int8Config answers an
    attention whose prefix its `ignore` list matches (an MTP layer kept BF16 by a regex such as
    `re:model.layers.45.*`) with UnquantizedLinearMethod, which RadixAttention cannot use."""
    if quant_config is None:
        return None
    fmt = format_for(checkpoint_quantization_config(hf_config))
    return None if fmt is not None and not getattr(fmt, "KV_CACHE_SCALES", True) else quant_config


def method_refusal(quantization_config: Optional[dict], method: str, vendor: str) -> Optional[str]:
    """Why the checkpoint's registered format cannot be served under SGLang's quantization method
    ``method`` (its ``get_name()``) on ``vendor`` ("nvidia" / "amd"), as one message, or None. A format
    names its own problems with the method (``method_problems``) and, in ``SERVING_METHOD``, the
    ``--quantization`` value that serves it on GPUs; where the allow-list (sglang_step35/served.py)
    refuses that route on ``vendor`` too, the message says so in the same breath, so the user is not
    sent to a flag that only earns the next refusal (e.g. compressed-tensors W8A8-INT8 on ROCm: its
    compressed-tensors MoE is NPU-only, and w8a8_int8's dense INT8 GEMM CUDA-only). Asked at launch
    (launch/policy.quant_method_problems) and at construction (models/quant_build.refuse_unservable_quant)."""
    fmt = format_for(quantization_config)
    check = getattr(fmt, "method_problems", None)
    problems = check(quantization_config, method) if check else []
    if not problems:
        return None
    why = f"{fmt.NAMES[0]} checkpoint: " + "; ".join(problems)
    route = getattr(fmt, "SERVING_METHOD", None)
    if route and route != method and not check(quantization_config, route):
        from sglang_step35 import served
        from sglang_step35.moe.quant import launch_quant

        setting = served.Setting(vendor, quant=served.quant_label(launch_quant(route, quantization_config)),
                                 quant_method=route)
        after = served.refusal(served.QUANT, setting)
        if after:
            why += f" — but --quantization {route} is no route on {vendor} either: {after}"
    return why


_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def single_expert_ignores(quantization_config: Optional[dict], hf_config: Any) -> Optional[str]:
    """Why a checkpoint whose ``ignore`` list (compressed-tensors, SGLang's w8a8_int8) names single
    routed experts — ``model.layers.N.moe.experts.E.gate_proj``, as exports that unfuse the experts into
    Linear modules write them, exactly or by ``re:`` — cannot be built by SGLang's methods, or None.
    SGLang builds each MoE layer's routed experts as one FusedMoE under one scheme, chosen for the prefix
    ``model.layers.N.moe.experts`` (compressed_tensors/utils.should_ignore_layer): the named experts are
    built quantized while the checkpoint stores them BF16, which only the loader would notice (tensors
    in the wrong precision). Not asked on a CPU, where the model is built unquantized and BF16 experts
    load as they are. A layer whose whole ``moe.experts`` prefix is ignored is the method's business."""
    qc = dict(quantization_config or {})
    ignore = list(qc.get("ignore") or [])
    if not ignore or format_for(qc) is None:
        return None
    from sglang.srt.layers.quantization.compressed_tensors.utils import check_equal_or_regex_match

    from sglang_step35.config import cfg_get, moe_layer_ids
    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    mapped = Step3p5ForCausalLM.hf_to_sglang_mapper.apply_list(list(ignore))  # as SGLang's loader maps the list
    # SGLang's rule (_is_equal_or_regex_match: equal, or re.match of a "re:" pattern), precompiled: a
    # Step-3.5-Flash has 45 x 288 x 3 expert modules to try.
    exact = {t for t in ignore if not t.startswith("re:")}
    patterns = [re.compile(t[3:]) for t in ignore if t.startswith("re:")]
    experts = int(cfg_get(hf_config, "moe_num_experts") or 0)
    named: list[str] = []
    for i in sorted(moe_layer_ids(hf_config)):
        if check_equal_or_regex_match(f"model.layers.{i}.moe.experts", mapped):
            continue
        names = (f"model.layers.{i}.moe.experts.{e}.{p}" for e in range(experts) for p in _EXPERT_PROJS)
        named += [n for n in names if n in exact or any(r.match(n) for r in patterns)]
    if not named:
        return None
    shown = ", ".join(named[:4]) + (f" and {len(named) - 4} more" if len(named) > 4 else "")
    return (f"{format_for(qc).NAMES[0]} checkpoint: quantization_config.ignore keeps single routed experts "
            f"unquantized ({shown}): SGLang builds each MoE layer's routed experts as one FusedMoE under one "
            "quantization scheme, chosen for the prefix model.layers.N.moe.experts (compressed_tensors/utils.should_ignore_layer), so it would build these "
            "experts quantized while the checkpoint stores them BF16; re-export with every routed expert "
            "quantized, or serve the BF16 checkpoint")

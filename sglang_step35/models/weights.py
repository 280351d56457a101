"""Weight loader of Step3p5ForCausalLM: checkpoint names -> SGLang's fused parameters.

Shapes are checked against `sglang_step35.checkpoint.checkpoint_shapes`. Loading collects every
problem — missing, unexpected and mis-shaped tensors — and raises one error listing them all.

Block-FP8 checkpoints (Step-3.5-Flash-FP8) on a CPU without AMX: SGLang 0.5.23's Fp8LinearMethod /
Fp8MoEMethod assert AMX on CPU (`sglang/srt/layers/quantization/fp8.py`, "Fp8LinearMethod on CPU
requires that CPU has AMX support"), so the model is built unquantized there (`cpu_fp8_fallback`) and
each FP8 weight is dequantized with its `weight_scale_inv` while loading (`sglang_step35.fp8`).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Iterable, Iterator, Optional, Sequence, Tuple

import torch

from sglang.srt.model_loader.weight_utils import default_weight_loader

from sglang_step35 import fp8
from sglang_step35.checkpoint import checkpoint_shapes

logger = logging.getLogger(__name__)


class Step35WeightError(ValueError):
    """The checkpoint does not match the config; the message lists each tensor and shape."""


# (our parameter suffix, checkpoint suffix, shard id) for tensors SGLang fuses into one parameter.
STACKED_PARAMS = [
    ("self_attn.qkv_proj.weight", "self_attn.q_proj.weight", "q"),
    ("self_attn.qkv_proj.weight", "self_attn.k_proj.weight", "k"),
    ("self_attn.qkv_proj.weight", "self_attn.v_proj.weight", "v"),
    ("mlp.gate_up_proj.weight", "mlp.gate_proj.weight", 0),
    ("mlp.gate_up_proj.weight", "mlp.up_proj.weight", 1),
    ("moe.share_expert.gate_up_proj.weight", "share_expert.gate_proj.weight", 0),
    ("moe.share_expert.gate_up_proj.weight", "share_expert.up_proj.weight", 1),
]
# Checkpoint suffix -> our parameter suffix, for tensors loaded as they are.
RENAMED_PARAMS = {
    "share_expert.down_proj.weight": "moe.share_expert.down_proj.weight",
}
# Stacked routed experts [E, ...] -> FusedMoE parameter and its shard id, loaded expert by expert.
EXPERT_PARAMS = {
    "moe.gate_proj.weight": ("moe.experts.w13_weight", "w1"),
    "moe.up_proj.weight": ("moe.experts.w13_weight", "w3"),
    "moe.down_proj.weight": ("moe.experts.w2_weight", "w2"),
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def cpu_fp8_fallback(quant_config) -> Optional[list]:
    """The FP8 block size to dequantize at load, when `quant_config` is block FP8 and SGLang's FP8
    methods cannot run here (CPU engine without AMX); None otherwise (keep SGLang's FP8 path)."""
    if quant_config is None or quant_config.get_name() != "fp8":
        return None
    block = getattr(quant_config, "weight_block_size", None)
    from sglang.srt.utils import cpu_has_amx_support, is_cpu

    if not block or not is_cpu() or cpu_has_amx_support():
        return None
    logger.warning(
        "sglang-step35: block-FP8 checkpoint on a CPU without AMX (SGLang's FP8 kernels need AMX): "
        "dequantizing FP8 weights at load; the model runs unquantized in the server dtype"
    )
    return list(block)


class _Fp8Dequantizer:
    """Pairs each FP8 `X.weight` with its `X.weight_scale_inv` (either order in the stream), yields the
    dequantized fp32 weight under `X.weight`, and records unpaired / mis-shaped scales."""

    def __init__(self, block: Sequence[int]):
        self.block = tuple(block)
        self.problems: list[str] = []

    def _pair(self, name: str, q: torch.Tensor, scale: torch.Tensor):
        try:
            return fp8.dequantize_block(q, scale, torch.float32, self.block)
        except ValueError as e:
            self.problems.append(f"{name}{fp8.SCALE_SUFFIX}: {e}")
            return None

    def __call__(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> Iterator[Tuple[str, torch.Tensor]]:
        pending_w: dict[str, torch.Tensor] = {}
        pending_s: dict[str, torch.Tensor] = {}
        for name, t in weights:
            if name.endswith(fp8.SCALE_SUFFIX):
                base = name[: -len(fp8.SCALE_SUFFIX)]
                if base in pending_w:
                    w = self._pair(base, pending_w.pop(base), t)
                    if w is not None:
                        yield base, w
                else:
                    pending_s[base] = t
            elif t.dtype == fp8.FP8_DTYPE:
                if name in pending_s:
                    w = self._pair(name, t, pending_s.pop(name))
                    if w is not None:
                        yield name, w
                else:
                    pending_w[name] = t
            else:
                yield name, t
        self.problems += [f"{k}: FP8 weight without {k}{fp8.SCALE_SUFFIX}" for k in sorted(pending_w)]
        self.problems += [f"{k}{fp8.SCALE_SUFFIX}: scale without its FP8 weight" for k in sorted(pending_s)]


def _checkpoint_view(cfg):
    """The config as the checkpoint was written. SGLang's CPU engine pads `moe_intermediate_size` /
    `intermediate_size` to a multiple of tp x 32 (tp x block size for block-quantized checkpoints) in
    `adjust_config_with_unaligned_cpu_tp` (sglang/srt/configs/update_config.py) and keeps the
    checkpoint's value as `original_<name>`; its layers zero-fill the padding when loading."""
    originals = {k: cfg.__dict__["original_" + k] for k in ("moe_intermediate_size", "intermediate_size")
                 if cfg.__dict__.get("original_" + k) is not None}
    if not originals:
        return cfg
    view = copy.copy(cfg)
    view.__dict__.update(originals)
    return view


def load_step3p5_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load a real-layout checkpoint into Step3p5ForCausalLM; MTP layers are left to Step3p5MTP."""
    cfg = _checkpoint_view(model.config)
    n = cfg.num_hidden_layers
    expected = checkpoint_shapes(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected, misshaped = [], []
    seen: set[str] = set()  # checkpoint names present (fused params hide a missing q/k/v or gate/up shard)
    block = getattr(model, "fp8_dequant_block", None)
    dequantizer = _Fp8Dequantizer(block) if block else None
    if dequantizer is not None:
        weights = dequantizer(weights)

    for name, tensor in weights:
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= n:
            if name not in expected and not _is_mtp_variant(name, n):
                unexpected.append(name)
            continue  # MTP layer: Step3p5MTP's
        if name not in expected:
            unexpected.append(name)
            continue
        seen.add(name)
        if tuple(tensor.shape) != expected[name]:
            misshaped.append(f"{name}: expected {list(expected[name])}, got {list(tensor.shape)}")
            continue
        prefix, suffix = (f"model.layers.{m.group(1)}.", m.group(2)) if m else ("", name)
        for param_suffix, ckpt_suffix, shard in STACKED_PARAMS:
            if suffix == ckpt_suffix:
                pname = prefix + param_suffix
                params[pname].weight_loader(params[pname], tensor, shard)
                loaded.add(pname)
                break
        else:
            if suffix in EXPERT_PARAMS:
                pname_suffix, shard = EXPERT_PARAMS[suffix]
                pname = prefix + pname_suffix
                param = params[pname]
                for e in range(tensor.shape[0]):
                    param.weight_loader(param, tensor[e], pname, shard_id=shard, expert_id=e)
                loaded.add(pname)
            else:
                pname = prefix + RENAMED_PARAMS.get(suffix, suffix)
                param = params[pname]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(pname)

    if dequantizer is not None:
        misshaped += dequantizer.problems
    missing_tensors = sorted(k for k in checkpoint_shapes(cfg, include_mtp=False) if k not in seen)
    missing_params = sorted(set(params) - loaded)
    if unexpected or misshaped or missing_tensors or missing_params:
        lines = []
        if misshaped:
            lines.append("mis-shaped tensors:\n  " + "\n  ".join(misshaped))
        if unexpected:
            lines.append("unexpected tensors (not in a Step-3.5 checkpoint for this config):\n  "
                         + "\n  ".join(sorted(unexpected)))
        if missing_tensors:
            lines.append("missing tensors:\n  " + "\n  ".join(
                f"{k}: expected {list(expected[k])}" for k in missing_tensors))
        if missing_params:
            lines.append("parameters never loaded (tensors missing from the checkpoint):\n  "
                         + "\n  ".join(missing_params))
        raise Step35WeightError("Step-3.5 checkpoint does not match config.json:\n" + "\n".join(lines))


def _is_mtp_variant(name: str, n: int) -> bool:
    # Some checkpoints nest an MTP layer's decoder part under `.transformer.`, or keep a per-layer
    # copy of the embedding; both belong to the MTP model.
    return ".transformer." in name or name.endswith(".embed_tokens.weight")

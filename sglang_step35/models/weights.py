"""Weight loader of Step-3.5's SGLang modules: checkpoint names -> SGLang's (fused) parameters.

What a checkpoint must hold is derived from the module tree that SGLang built, with whatever
quantization method it chose per module, not from a fixed table of BF16 names: each parameter names
the checkpoint tensors that feed it (the model class's `stacked_params_mapping`, next to its
`load_weights` in models/step3p5.py and shared by the MTP draft), and a parameter's quantization
shows in the tree itself. Under SGLang's block `Fp8Config` a quantized linear or MoE
has an FP8 `weight` plus a `weight_scale_inv` parameter, so its checkpoint tensors are the FP8
weight and `<weight>_scale_inv` with one fp32 scale per block; a module the checkpoint's
`quantization_config` keeps unquantized (`modules_to_not_convert` / `ignored_layers`, matched by
SGLang against the module prefix) has a plain weight and expects a BF16 tensor. `RadixAttention`
under `Fp8Config` owns `k_scale`/`v_scale` (1.0 unless the checkpoint has them; SGLang marks them
`_skip_weight_check`), placed by SGLang's `maybe_remap_kv_scale_name` matched in the checkpoint's
naming (`kv_scale_targets`), so the MTP draft's layer takes its checkpoint layer's scales too. Full (unsplit) checkpoint shapes come from `sglang_step35.checkpoint`.

Loading collects every problem — missing, unexpected, mis-shaped and wrong-precision tensors — and
raises one error listing them all.

Block-FP8 checkpoints (Step-3.5-Flash-FP8) on a CPU without AMX: SGLang 0.5.23's Fp8LinearMethod /
Fp8MoEMethod assert AMX on CPU in `process_weights_after_loading` (`sglang/srt/layers/quantization/
fp8.py`, "Fp8LinearMethod on CPU requires that CPU has AMX support"), so there the model is built
unquantized (`cpu_fp8_fallback`) and each FP8 weight is dequantized with its `weight_scale_inv`
while loading (`sglang_step35.fp8`). Everywhere else SGLang's FP8 methods run as they are.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import torch

from sglang.srt.model_loader.weight_utils import default_weight_loader, maybe_remap_kv_scale_name

from sglang_step35 import fp8
from sglang_step35.checkpoint import checkpoint_shapes, layer_index

logger = logging.getLogger(__name__)


class Step35WeightError(ValueError):
    """The checkpoint does not match the config; the message lists each tensor and shape."""


_EXPERT_SHARDS = ("w1", "w2", "w3")
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor and where it goes."""

    param: str  # our parameter name
    shard: Union[str, int, None]
    shape: tuple[int, ...]  # full checkpoint shape
    quantized: bool  # the target is an FP8 weight (expects float8_e4m3fn) or its scale

    @property
    def per_expert(self) -> bool:
        return self.shard in _EXPERT_SHARDS


def param_is_fp8(param: torch.Tensor) -> bool:
    return param.dtype == fp8.FP8_DTYPE


def _block_of(module: torch.nn.Module) -> tuple[int, int]:
    """The weight block of the quantization method SGLang attached to `module`."""
    block = getattr(getattr(getattr(module, "quant_method", None), "quant_config", None), "weight_block_size", None)
    if not block:
        raise Step35WeightError(
            f"{type(module).__name__} has FP8 scale parameters but its quantization method "
            f"({type(getattr(module, 'quant_method', None)).__name__}) is not block-wise: Step-3.5 FP8 "
            "checkpoints are 128x128 block FP8 (quantization_config.weight_block_size)")
    return tuple(block)


def kv_scale_targets(
    model: torch.nn.Module, checkpoint_name: Callable[[str], Optional[tuple[str, str]]]
) -> dict[str, str]:
    """SGLang's name of each k/v-scale parameter in the checkpoint's naming -> our parameter name.

    RadixAttention under an FP8 config owns `attn.k_scale` / `attn.v_scale`; SGLang's
    `maybe_remap_kv_scale_name` maps a checkpoint's scale names (`self_attn.k_proj.k_scale`,
    `self_attn.k_scale`, ...) onto `<layer>.self_attn.attn.k_scale` in the *checkpoint's* layer
    naming. Our parameters need not be named that way (Step3p5MTP's are `layer.self_attn...`, its
    checkpoint layer is `model.layers.{45+i}`), so the remap is matched against these keys.
    Every RadixAttention is listed, also one built without scale parameters (unquantized)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    targets = {}
    for mname, module in model.named_modules():
        if not isinstance(module, RadixAttention):
            continue
        for scale in ("k_scale", "v_scale"):
            where = checkpoint_name(f"{mname}.{scale}")
            if where is not None:
                targets[where[0] + where[1]] = f"{mname}.{scale}"
    return targets


def _kv_scale_param(name: str, targets: dict[str, str]) -> Optional[str]:
    """Our parameter for checkpoint k/v-scale tensor `name`, or None. A name already in SGLang's
    form is taken as it is (the remap would add a second `.attn`)."""
    if name in targets:
        return targets[name]
    remapped = maybe_remap_kv_scale_name(name, targets)
    return targets.get(remapped) if remapped is not None else None


def checkpoint_sources(
    model: torch.nn.Module,
    layout: dict[str, tuple[int, ...]],
    checkpoint_name: Callable[[str], Optional[tuple[str, str]]],
) -> dict[str, Source]:
    """Checkpoint tensor name -> Source, for every parameter of `model` that must be loaded.

    `checkpoint_name(param_name)` gives (checkpoint prefix, parameter suffix within it), or None for a
    parameter that is not loaded from the checkpoint here; the suffix is looked up in the model's
    `stacked_params_mapping` (unlisted: the tensor of the same name). `layout` gives each BF16
    checkpoint tensor's full shape; scale shapes follow from it and the module's block size."""
    mapping = model.stacked_params_mapping
    modules = dict(model.named_modules())
    sources: dict[str, Source] = {}
    for pname, param in model.named_parameters():
        if getattr(param, "_skip_weight_check", False):
            continue  # k_scale / v_scale: optional (see kv-scale handling in load_checkpoint)
        where = checkpoint_name(pname)
        if where is None:
            continue
        ckpt_prefix, suffix = where
        is_scale = suffix.endswith(fp8.SCALE_SUFFIX)
        weight_suffix = suffix[: -len(fp8.SCALE_SUFFIX)] if is_scale else suffix
        feeds = mapping.get(weight_suffix, [(weight_suffix, None)])
        owner = modules[pname.rsplit(".", 1)[0]] if "." in pname else model
        for ckpt_suffix, shard in feeds:
            base = ckpt_prefix + ckpt_suffix
            if base not in layout:
                raise Step35WeightError(
                    f"parameter {pname} maps to checkpoint tensor {base}, which a Step-3.5 checkpoint for "
                    "this config does not have (model and layout disagree)")
            if is_scale:
                sources[base + fp8.SCALE_SUFFIX] = Source(pname, shard, fp8.scale_shape(layout[base], _block_of(owner)), True)
            else:
                sources[base] = Source(pname, shard, layout[base], param_is_fp8(param))
    return sources


class Fp8Dequantizer:
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


def cpu_fp8_fallback(quant_config) -> Optional[list]:
    """The FP8 block size to dequantize at load, when `quant_config` is block FP8 and SGLang's FP8
    methods cannot run on this platform (a CPU engine without AMX); None otherwise (keep SGLang's
    FP8 path)."""
    if quant_config is None or quant_config.get_name() != "fp8":
        return None
    block = getattr(quant_config, "weight_block_size", None)
    from sglang.srt.utils import cpu_has_amx_support

    from sglang_step35.platform import current_platform

    if not block or current_platform().has_accelerator or cpu_has_amx_support():
        return None
    logger.warning(
        "block-FP8 checkpoint on a CPU without AMX (SGLang's FP8 kernels need AMX): dequantizing FP8 "
        "weights at load; the model runs unquantized in the server dtype"
    )
    return list(block)


def checkpoint_view(cfg):
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


@dataclass
class LoadReport:
    """What one load pass found; `raise_if_bad` turns it into one Step35WeightError."""

    loaded: set
    seen: set
    unexpected: list
    misshaped: list
    precision: list

    def problems(self, sources: dict[str, Source], params: dict, allow_missing: Iterable[str] = ()) -> list[str]:
        allow = set(allow_missing)
        lines = []
        if self.misshaped:
            lines.append("mis-shaped tensors:\n  " + "\n  ".join(self.misshaped))
        if self.precision:
            lines.append("tensors in the wrong precision for the module SGLang built:\n  " + "\n  ".join(self.precision))
        if self.unexpected:
            lines.append("unexpected tensors (not in a Step-3.5 checkpoint for this config and quantization):\n  "
                         + "\n  ".join(sorted(self.unexpected)))
        missing_tensors = sorted(k for k in sources if k not in self.seen and sources[k].param not in allow)
        if missing_tensors:
            lines.append("missing tensors:\n  " + "\n  ".join(
                f"{k}: expected {list(sources[k].shape)}" for k in missing_tensors))
        missing_params = sorted(
            k for k, p in params.items()
            if k not in self.loaded and k not in allow and not getattr(p, "_skip_weight_check", False))
        if missing_params:
            lines.append("parameters never loaded (tensors missing from the checkpoint):\n  "
                         + "\n  ".join(missing_params))
        return lines


def load_checkpoint(
    model: torch.nn.Module,
    weights: Iterable[Tuple[str, torch.Tensor]],
    sources: dict[str, Source],
    skip: Callable[[str], bool] = lambda _name: False,
    kv_scales: Optional[dict[str, str]] = None,
) -> LoadReport:
    """Load every tensor of `weights` that `sources` names into `model`; skip the names `skip`
    accepts (tensors that belong to another model, e.g. MTP layers), record everything else.
    `kv_scales` (:func:`kv_scale_targets`) places the checkpoint's optional k/v scales."""
    params = dict(model.named_parameters())
    kv_scales = kv_scales or {}
    block = getattr(model, "fp8_dequant_block", None)
    dequantizer = Fp8Dequantizer(block) if block else None
    if dequantizer is not None:
        weights = dequantizer(weights)
    rep = LoadReport(set(), set(), [], [], [])
    ignored_kv: list[str] = []
    for name, tensor in weights:
        src = sources.get(name)
        if src is None:
            if name.endswith(_KV_SCALE_SUFFIXES) and not skip(name):
                target = _kv_scale_param(name, kv_scales)
                if target in params:
                    default_weight_loader(params[target], tensor)
                    rep.loaded.add(target)
                    continue
                if target is not None:
                    # The attention exists but was built without FP8 KV scales (unquantized, e.g.
                    # the CPU FP8 fallback above): its KV cache does not use them.
                    ignored_kv.append(name)
                    continue
            if not skip(name):
                rep.unexpected.append(name)
            continue
        rep.seen.add(name)
        if tuple(tensor.shape) != src.shape:
            rep.misshaped.append(f"{name}: expected {list(src.shape)}, got {list(tensor.shape)}")
            continue
        is_scale = name.endswith(fp8.SCALE_SUFFIX)
        if not is_scale and (tensor.dtype == fp8.FP8_DTYPE) != src.quantized:
            rep.precision.append(
                f"{name}: {str(tensor.dtype).removeprefix('torch.')}, but {src.param} is "
                + ("FP8 (the checkpoint's quantization_config quantizes this module; list it in "
                   "modules_to_not_convert if the checkpoint keeps it in BF16)" if src.quantized else
                   "unquantized (the checkpoint's quantization_config lists this module as not converted, "
                   "yet the tensor is FP8)"))
            continue
        param = params[src.param]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if src.per_expert:
            for e in range(tensor.shape[0]):
                loader(param, tensor[e], src.param, shard_id=src.shard, expert_id=e)
        elif src.shard is not None:
            loader(param, tensor, src.shard)
        else:
            loader(param, tensor)
        rep.loaded.add(src.param)
    if dequantizer is not None:
        rep.misshaped += dequantizer.problems
    if ignored_kv:
        logger.warning("%d checkpoint k/v scales ignored (e.g. %s): the attention layers were built "
                       "without FP8 KV scales (unquantized)", len(ignored_kv), ignored_kv[0])
    return rep


def _is_mtp_tensor(name: str, n: int, m: int) -> bool:
    """Tensors of the `m` MTP layers stored after the `n` main ones (Step3p5MTP loads them)."""
    i = layer_index(name)
    return i is not None and n <= i < n + m


def other_stage_tensor(name: str, n: int, start: int, end: int, first: bool, last: bool,
                       first_stage_tensors: Sequence[str], last_stage_tensors: Sequence[str]) -> bool:
    """Whether checkpoint tensor `name` belongs to another pipeline stage than the one holding main
    layers [start, end) (first / last: whether it is the first / last stage; the model class names
    the tensors outside the layers that each of those stages holds). Such tensors are
    skipped here and checked by the stage that owns them; everything else, including any stray name
    inside this stage's layers, is this stage's to load or to report."""
    i = layer_index(name)
    if i is not None:
        return i < n and not start <= i < end
    base = name[: -len(fp8.SCALE_SUFFIX)] if name.endswith(fp8.SCALE_SUFFIX) else name
    return (base in first_stage_tensors and not first) or (base in last_stage_tensors and not last)


def load_step3p5_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load a Step-3.5 checkpoint (BF16 or block FP8) into Step3p5ForCausalLM; MTP layers are left to
    Step3p5MTP. Under pipeline parallelism each stage loads (and checks) only its own tensors."""
    cfg = checkpoint_view(model.config)
    n, m = cfg.num_hidden_layers, int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    sources = checkpoint_sources(model, checkpoint_shapes(cfg, include_mtp=False), model.checkpoint_name)
    start, end = model.start_layer, model.end_layer
    pp = model.pp_group
    first, last = pp.is_first_rank, pp.is_last_rank

    # Other stages' tensors leave the stream before loading (and before any FP8 dequantization).
    firsts, lasts = model.first_stage_tensors, model.last_stage_tensors
    mine = ((k, t) for k, t in weights if not other_stage_tensor(k, n, start, end, first, last, firsts, lasts))
    rep = load_checkpoint(model, mine, sources, skip=lambda name: _is_mtp_tensor(name, n, m),
                          kv_scales=kv_scale_targets(model, model.checkpoint_name))
    lines = rep.problems(sources, dict(model.named_parameters()))
    if lines:
        where = "" if pp.world_size == 1 else (
            f" (pipeline stage {pp.rank_in_group} of {pp.world_size}: layers {start}-{end - 1}"
            + (", embedding" if first else "") + (", norm and lm_head" if last else "") + ")")
        raise Step35WeightError(f"Step-3.5 checkpoint does not match config.json{where}:\n" + "\n".join(lines))

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

Other formats (sglang_step35.quant: W8A8-INT8, ...) load the same way: a quantized module's
parameters (`weight`, `weight_scale`, ..., experts' `w13_<leaf>` / `w2_<leaf>`) are fed by the
checkpoint tensors `<module>.<leaf>` (experts: `moe.{gate,up,down}_proj.<leaf>`), stacked [E, ...] or
per expert (`moe.experts.E.gate_proj.<leaf>`, as LLM Compressor exports them); the format module
gives each tensor's shape.

On a CPU, SGLang's kernels for these formats do not run (its FP8 methods assert AMX in
`process_weights_after_loading`, "Fp8LinearMethod on CPU requires that CPU has AMX support"; its
W8A8-INT8 ones need AMX or Arm64), so there the model is built unquantized (models/quant_build.py)
and the format's `Dequantizer` turns each quantized weight back into fp32 while loading. Block FP8 on
an AMX CPU and everything on GPUs keep SGLang's methods as they are.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence, Tuple, Union

import torch

from sglang.srt.model_loader.weight_utils import default_weight_loader, maybe_remap_kv_scale_name

from sglang_step35 import fp8, quant
from sglang_step35.checkpoint import checkpoint_shapes, layer_index
from sglang_step35.models.quant_build import quant_format_of

logger = logging.getLogger(__name__)


class Step35WeightError(ValueError):
    """The checkpoint does not match the config; the message lists each tensor and shape."""


_EXPERT_SHARDS = ("w1", "w2", "w3")
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".kv_scale")
# Dtypes of quantized weights (FP8, INT8, packed INT4/FP4 words): a checkpoint weight in one of them
# feeds only a module SGLang built quantized, a floating one only an unquantized module.
_QUANTIZED_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.uint8, torch.int32)
# One expert's tensor as LLM Compressor / ModelOpt export them: model.layers.N.moe.experts.E.gate_proj.<leaf>.
_PER_EXPERT = re.compile(r"^(.*\.moe\.)experts\.(\d+)\.((?:gate|up|down)_proj\..+)$")


@dataclass(frozen=True)
class Source:
    """One checkpoint tensor and where it goes."""

    param: str  # our parameter name
    shard: Union[str, int, None]
    shape: Optional[tuple[int, ...]]  # full checkpoint shape (None: the format does not say; SGLang's loader checks)
    quantized: bool  # the target parameter is a quantized weight (expects a _QUANTIZED_DTYPES tensor)
    leaf: str = "weight"  # the checkpoint tensor's last name part (weight, weight_scale_inv, weight_scale, ...)

    @property
    def per_expert(self) -> bool:
        return self.shard in _EXPERT_SHARDS


def param_is_fp8(param: torch.Tensor) -> bool:
    return param.dtype == fp8.FP8_DTYPE


def derived_after_loading(name: str) -> bool:
    """Parameters a quantization method creates and recomputes in `process_weights_after_loading`
    from loaded ones, which no checkpoint holds: ModelOpt NVFP4 MoE's `w13_blockscale_swizzled` /
    `w2_blockscale_swizzled` (the kernels' swizzled copy of `w*_weight_scale`; SGLang's built-in
    Step-3.5 loader skips them too). compressed-tensors W4A16 MoE (`CompressedTensorsWNA16MoE.
    create_weights`) creates `w13/w2_weight_g_idx` and `*_g_idx_sort_indices` for every checkpoint:
    the sort indices are computed after loading, and the act-order indices exist only in `actorder:
    group` exports, which SGLang's Triton W4A16 MoE does not run (`_is_wna16_triton_moe_supported`;
    such an export's `weight_g_idx` tensors are then named as unexpected)."""
    return name.endswith(("_blockscale_swizzled", "_g_idx_sort_indices")) or bool(
        re.search(r"\bexperts\.w(13|2)_weight_g_idx$", name))


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    return dtype in _QUANTIZED_DTYPES


def _kind(dtype: torch.dtype) -> str:
    """How an error names a quantized parameter's storage."""
    return {torch.float8_e4m3fn: "FP8", torch.float8_e5m2: "FP8", torch.int8: "INT8"}.get(dtype, "packed quantized")


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


def _feeds(mapping: dict, suffix: str) -> tuple[str, list[tuple[str, Union[str, int, None]]]]:
    """(leaf, [(checkpoint suffix, shard)]) for our parameter `suffix` (within a decoder layer).

    `stacked_params_mapping` is keyed by each fused module's `weight`; any other parameter of the same
    module (a quantization method's `weight_scale`, `weight_scale_inv`, `input_scale`, ...) is fed by
    the same checkpoint modules' tensor of that name. Experts: `moe.experts.w13_<leaf>` <-
    `moe.{gate,up}_proj.<leaf>`, `w2_<leaf>` <- `moe.down_proj.<leaf>` (SGLang's FusedMoE naming)."""
    module, _, leaf = suffix.rpartition(".")
    m = re.match(r"^(.*\bexperts\.)(w13|w2)_(.+)$", suffix)
    if m:
        key, leaf = f"{m.group(1)}{m.group(2)}_weight", m.group(3)
    else:
        key = f"{module}.weight" if module else "weight"
    if key not in mapping:
        return leaf, [(suffix, None)]
    return leaf, [(c[: -len("weight")] + leaf, shard) for c, shard in mapping[key]]


def checkpoint_sources(
    model: torch.nn.Module,
    layout: dict[str, tuple[int, ...]],
    checkpoint_name: Callable[[str], Optional[tuple[str, str]]],
    fmt=None,
    quantization_config: Optional[dict] = None,
) -> dict[str, Source]:
    """Checkpoint tensor name -> Source, for every parameter of `model` that must be loaded.

    `checkpoint_name(param_name)` gives (checkpoint prefix, parameter suffix within it), or None for a
    parameter that is not loaded from the checkpoint here; the suffix is looked up in the model's
    `stacked_params_mapping` (unlisted: the tensor of the same name). `layout` gives each BF16
    checkpoint tensor's full shape; quantized tensors' shapes follow from it and the format module
    `fmt` (sglang_step35.quant; FP8 scales from the module's block size)."""
    mapping = model.stacked_params_mapping
    modules = dict(model.named_modules())
    sources: dict[str, Source] = {}
    for pname, param in model.named_parameters():
        if getattr(param, "_skip_weight_check", False) or derived_after_loading(pname):
            continue  # k_scale / v_scale: optional (see kv-scale handling in load_checkpoint)
        where = checkpoint_name(pname)
        if where is None:
            continue
        ckpt_prefix, suffix = where
        leaf, feeds = _feeds(mapping, suffix)
        owner = modules[pname.rsplit(".", 1)[0]] if "." in pname else model
        for ckpt_suffix, shard in feeds:
            name = ckpt_prefix + ckpt_suffix
            # A BF16 tensor (weight, norm, router bias) is in the layout; a quantization method's extra
            # tensor (`<module>.weight_scale`, ...) is sized from its module's BF16 weight.
            base = name if name in layout else name[: -len(leaf)] + "weight"
            if base not in layout:
                raise Step35WeightError(
                    f"parameter {pname} maps to checkpoint tensor {name}, which a Step-3.5 checkpoint for "
                    "this config does not have (model and layout disagree)")
            if base == name and fmt is not None and is_quantized_dtype(param.dtype):
                # A quantized weight's own shape is the format's (packed FP4: [..., N, K/2]).
                shape = fmt.checkpoint_shape(leaf, layout[base], quantization_config or {})
            elif base == name:
                shape = layout[base]
            elif leaf == "weight" + fp8.SCALE_SUFFIX:
                shape = fp8.scale_shape(layout[base], _block_of(owner))
            else:
                shape = fmt.checkpoint_shape(leaf, layout[base], quantization_config or {}) if fmt else None
            sources[name] = Source(pname, shard, shape, leaf == "weight" and is_quantized_dtype(param.dtype), leaf)
    return sources


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
    experts_seen: dict = field(default_factory=dict)  # stacked name -> experts given per expert

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
        missing = []
        for k in sorted(sources):
            src = sources[k]
            if k in self.seen or src.param in allow:
                continue
            got = self.experts_seen.get(k)
            if got is None:
                missing.append(f"{k}: expected {list(src.shape) if src.shape is not None else 'a tensor'}")
                continue
            n = src.shape[0] if src.shape is not None else None
            if n is not None and len(got) < n:
                gone = sorted(set(range(n)) - got)
                stem = k.replace(".moe.", ".moe.experts.{E}.", 1)
                missing.append(f"{stem}: experts {gone} missing (per-expert tensors of {k})")
        if missing:
            lines.append("missing tensors:\n  " + "\n  ".join(missing))
        missing_params = sorted(
            k for k, p in params.items()
            if k not in self.loaded and k not in allow and not getattr(p, "_skip_weight_check", False)
            and not derived_after_loading(k))
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
    qc = getattr(model, "cpu_dequant", None)
    dequantizer = quant.format_for(qc).Dequantizer(qc) if qc else None
    if dequantizer is not None:
        weights = (out for name, t in weights for out in dequantizer.feed(name, t))
    rep = LoadReport(set(), set(), [], [], [])
    ignored_kv: list[str] = []
    for name, tensor in weights:
        src, expert = sources.get(name), None
        if src is None:
            m = _PER_EXPERT.match(name)
            stacked = f"{m.group(1)}{m.group(3)}" if m else None
            if stacked in sources and sources[stacked].per_expert:
                src, expert = sources[stacked], int(m.group(2))
                if src.shape is not None and expert >= src.shape[0]:
                    rep.unexpected.append(f"{name} (the config has {src.shape[0]} experts)")
                    continue
                name_for_report, name = name, stacked
        if src is None:
            if name.endswith(_KV_SCALE_SUFFIXES) and not skip(name):
                target = _kv_scale_param(name, kv_scales)
                if target in params:
                    default_weight_loader(params[target], tensor)
                    rep.loaded.add(target)
                    continue
                if target is not None:
                    # The attention exists but was built without FP8 KV scales (unquantized, e.g.
                    # the CPU dequant fallback above): its KV cache does not use them.
                    ignored_kv.append(name)
                    continue
            if not skip(name):
                rep.unexpected.append(name)
            continue
        shown = name if expert is None else name_for_report
        want = src.shape if expert is None or src.shape is None else src.shape[1:]
        if expert is None:
            rep.seen.add(name)
        else:
            rep.experts_seen.setdefault(name, set()).add(expert)
        if want is not None and tuple(tensor.shape) != want:
            rep.misshaped.append(f"{shown}: expected {list(want)}, got {list(tensor.shape)}")
            continue
        if src.leaf == "weight" and is_quantized_dtype(tensor.dtype) != src.quantized:
            rep.precision.append(
                f"{shown}: {str(tensor.dtype).removeprefix('torch.')}, but {src.param} is "
                + (f"{_kind(params[src.param].dtype)} (the checkpoint's quantization_config quantizes this module; list it in "
                   "modules_to_not_convert / ignore if the checkpoint keeps it in BF16)" if src.quantized else
                   "unquantized (the checkpoint's quantization_config lists this module as not converted, "
                   "yet the tensor is quantized)"))
            continue
        param = params[src.param]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if expert is not None:
                loader(param, tensor, src.param, shard_id=src.shard, expert_id=expert)
            elif src.per_expert:
                for e in range(tensor.shape[0]):
                    loader(param, tensor[e], src.param, shard_id=src.shard, expert_id=e)
            elif src.shard is not None:
                loader(param, tensor, src.shard)
            else:
                loader(param, tensor)
        except (AssertionError, RuntimeError, ValueError) as e:
            # A shape the format module does not state (src.shape None) is checked by SGLang's loader.
            rep.misshaped.append(f"{shown}: {list(tensor.shape)} does not fit {src.param} "
                                 f"{list(param.shape)} ({type(e).__name__}: {e})")
            continue
        rep.loaded.add(src.param)
    if dequantizer is not None:
        rep.misshaped += dequantizer.problems()
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
    base = name.rsplit(".", 1)[0] + ".weight" if "." in name else name  # lm_head.weight_scale -> lm_head.weight
    return (base in first_stage_tensors and not first) or (base in last_stage_tensors and not last)


def load_step3p5_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load a Step-3.5 checkpoint (BF16 or block FP8) into Step3p5ForCausalLM; MTP layers are left to
    Step3p5MTP. Under pipeline parallelism each stage loads (and checks) only its own tensors."""
    cfg = checkpoint_view(model.config)
    n, m = cfg.num_hidden_layers, int(getattr(cfg, "num_nextn_predict_layers", 0) or 0)
    sources = checkpoint_sources(model, checkpoint_shapes(cfg, include_mtp=False), model.checkpoint_name,
                                 *quant_format_of(model))
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

"""How Step-3.5's quantized weights are stored: one :class:`QuantSpec` per format, the bytes of a
linear weight (scales, zero points and per-tensor scalars included) and the multiple a
tensor-parallel split of an intermediate dimension must keep for SGLang's kernels.

The layout rule (:mod:`.layout`), the launch guard (:mod:`.policy`), the model's MoE block, the
allow-list's labels (:func:`sglang_step35.served.quant_label`) and the planner's memory sums all read
these specs; nothing else in the package knows a format's bytes. Whether a format is *served* on a
platform is not decided here but by the allow-list (:mod:`sglang_step35.served`).

The split multiples, read from SGLang 0.5.23's quantization methods
(``sglang/srt/layers/quantization/``):

* block FP8 (128, 128): ``fp8.py: Fp8MoEMethod.create_weights`` raises unless
  ``intermediate_size_per_partition % block_n == 0``, and ``fp8_utils.py:
  validate_block_quant_shapes`` holds dense linears to the same -> 128 (sglang #26107).
* W8A8-INT8: ``w8a8_int8.py: W8A8Int8MoEMethod.create_weights`` / ``W8A8Int8LinearMethod`` keep
  one fp32 scale per output channel, which a split of either dimension keeps whole; the Triton INT8
  MoE masks ragged tiles -> 1.
* W4A16 (int4 packed 8 per int32, groups of 128 or 32 along the input): the experts run
  ``moe_wna16.py: MoeWNA16Method.create_weights``, which halves the group down to 32 until it
  divides the partition; the dense linears (shared expert, dense MLP) run Marlin, whose
  ``marlin_utils.py: verify_marlin_supports_shape`` needs ``input_size_per_partition %
  GPTQ_MARLIN_MIN_THREAD_K (128)`` -> 128 for both group sizes (the stricter of the two, since one
  multiple governs the whole MoE block).
* NVFP4 (fp4 e2m1, one fp8-e4m3 scale per 16 inputs, fp32 global scales): ``modelopt_quant.py:
  ModelOptNvFp4FusedMoEMethod.create_weights`` needs whole 16-groups per partition and, for the
  FlashInfer TRT-LLM gated layout, rounds the partition up to 64 (a padded shard the checkpoint's
  160-wide TP8 slice does not fill; vllm #48921, #48624: Step-3.7-Flash-NVFP4 at TP8); the CUTLASS
  path swizzles the gated ``2N`` scale rows in tiles of 128 (``ModelOptFp4LinearMethod.
  process_weights_after_loading``: ``assert rows % 128 == 0``) -> N % 64.
* MXFP4 (fp4 e2m1, one e8m0 scale per 32 inputs): ``quark/schemes/quark_w4a4_mxfp4_moe.py:
  QuarkW4A4MXFp4MoE.create_weights`` refuses a partition that is not a multiple of
  ``OCP_MX_BLOCK_SIZE`` (32): a block of ``down_proj`` would straddle two ranks -> 32. (AITER's CK
  4-bit MoE adds N % 256 on ROCm: :func:`.layout.backend_multiple`.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..config import Step35ConfigError


@dataclass(frozen=True)
class QuantSpec:
    """How one quantized linear weight is stored (what the layout rule and the memory plan need)."""

    name: str  # the format ("bf16", "fp8", "int4", "w8a8-int8", "w4a16", "nvfp4", "mxfp4"): the allow-list's label
    weight_bits: int
    block: Optional[tuple[int, int]] = None  # 2-D (block_n, block_k): one scale per block (block FP8)
    group_size: Optional[int] = None  # 1-D groups along the input dim: one scale per group per output row
    scale_bytes: Optional[int] = None  # bytes of one scale (default: fp32 per block, bf16 per group)
    per_channel: bool = False  # one scale per output row (W8A8-INT8)
    zero_bits: int = 0  # asymmetric int4 (AWQ/GPTQ): a packed zero point per group per output row
    tensor_scale_bytes: int = 0  # per-weight scalars (NVFP4: fp32 weight_scale_2 + input_scale)
    split: int = 0  # the TP split multiple SGLang's kernels need (0: the block / group size)
    split_note: str = ""  # where that multiple comes from (for refusals)
    # Which kernel SGLang picks depends on it too (not the bytes): act-order (compressed-tensors
    # `actorder`, GPTQ `desc_act`: a g_idx per input), which SGLang's Triton int4 MoE cannot take.
    act_order: bool = False

    @property
    def split_multiple(self) -> int:
        """A TP partition of an expert/MLP intermediate must be a multiple of this."""
        if self.split:
            return self.split
        if self.block:
            return max(self.block)  # N is the out dim of gate/up and the in dim of down
        if self.group_size:
            return self.group_size
        return 1

    @property
    def _scale(self) -> int:
        if self.scale_bytes is not None:
            return self.scale_bytes
        return 4 if self.block or self.per_channel else 2

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes for one [out, in] weight of this quantization, scales included."""
        weight = out_features * in_features * self.weight_bits // 8
        if self.block:
            bn, bk = self.block
            scales = math.ceil(out_features / bn) * math.ceil(in_features / bk) * self._scale
        elif self.group_size:
            groups = out_features * math.ceil(in_features / self.group_size)
            scales = groups * self._scale + groups * self.zero_bits // 8
        elif self.per_channel:
            scales = out_features * self._scale
        else:
            scales = 0
        return weight + scales + self.tensor_scale_bytes


BF16 = QuantSpec("bf16", 16)
FP8_BLOCK128 = QuantSpec("fp8", 8, block=(128, 128))
INT4_G128 = QuantSpec("int4", 4, group_size=128)
W8A8_INT8 = QuantSpec("w8a8-int8", 8, per_channel=True, scale_bytes=4)
_MARLIN_K = "Marlin's dense int4 GEMM needs K % 128 (marlin_utils.py: verify_marlin_supports_shape)"
W4A16_G128 = QuantSpec("w4a16", 4, group_size=128, scale_bytes=2, split=128, split_note=_MARLIN_K)
# Named "w4a16" too: the same kernels and the same allow-list row; `step35 plan --quant w4a16-g32`.
W4A16_G32 = QuantSpec("w4a16", 4, group_size=32, scale_bytes=2, split=128, split_note=_MARLIN_K)
NVFP4 = QuantSpec("nvfp4", 4, group_size=16, scale_bytes=1, tensor_scale_bytes=8, split=64,
                  split_note="NVFP4 MoE gated tile (modelopt_quant.py: ModelOptNvFp4FusedMoEMethod; vllm #48921)")
# compressed-tensors NVFP4: NVFP4's bytes (weight_global_scale + input_global_scale for ModelOpt's two
# scalars), its own allow-list label (other SGLang kernels: compressed_tensors_w4a16_nvfp4_moe.py's FP4
# Marlin, which also needs intermediate_size_per_partition % 64; w4a4_nvfp4_moe.py on sm100).
NVFP4_CT = QuantSpec("nvfp4-ct", 4, group_size=16, scale_bytes=1, tensor_scale_bytes=8, split=64,
                     split_note="compressed-tensors NVFP4 MoE (compressed_tensors_w4a16_nvfp4_moe.py: "
                                "intermediate_size_per_partition % 64)")


def autoround_spec(group: int = 128, route: str = "autoround") -> QuantSpec:
    """AutoRound's own config (quant_method auto-round): GPTQ's (or AWQ's) tensors, qzeros stored
    either way, under SGLang's AutoRoundConfig, which picks Marlin or MoeWNA16 per layer: labelled by
    the methods it builds (``route``: quant/autoround.sglang_route); Marlin's dense linears need K % 128
    per partition."""
    return QuantSpec(route, 4, group_size=group, zero_bits=4, split=128, split_note=_MARLIN_K)


def _autoround(value: Mapping) -> QuantSpec:
    from sglang_step35.quant.autoround import sglang_route  # pure torch; the planner imports this module

    return autoround_spec(int(value.get("group_size") or 128), sglang_route(dict(value)))


MXFP4 = QuantSpec("mxfp4", 4, group_size=32, scale_bytes=1,
                  split_note="OCP MX block (quark_w4a4_mxfp4_moe.py: QuarkW4A4MXFp4MoE.create_weights)")
# `step35 plan --quant` names: the formats of `step35 tiny --quant` plus bf16 / fp8 / int4.
QUANTS = {"bf16": BF16, "fp8": FP8_BLOCK128, "int4": INT4_G128, "w8a8-int8": W8A8_INT8, "w4a16": W4A16_G128,
          "w4a16-g32": W4A16_G32, "nvfp4": NVFP4, "mxfp4": MXFP4}


def _weights_scheme(value: Mapping) -> Optional[Mapping]:
    """compressed-tensors: the first config group's ``weights`` scheme."""
    groups = value.get("config_groups") or {}
    for group in groups.values():
        if isinstance(group, Mapping) and isinstance(group.get("weights"), Mapping):
            return group["weights"]
    return None


def _w4a16(weights: Mapping) -> QuantSpec:
    """compressed-tensors 4-bit int weights: group size (channel strategy: one scale per row, group
    0), symmetric or with zero points, act-order or not (``actorder``: "group" / "weight", any set
    value keeps SGLang off its Triton MoE, compressed_tensors.py: _is_wna16_triton_moe_supported)."""
    channel = str(weights.get("strategy") or "group").lower() == "channel"
    group = 0 if channel else int(weights.get("group_size") or 128)
    zeros, act_order = not weights.get("symmetric", True), bool(weights.get("actorder"))
    if not (zeros or act_order or channel) and group in (32, 128):
        return W4A16_G32 if group == 32 else W4A16_G128
    return QuantSpec("w4a16", 4, group_size=group or None, per_channel=channel, scale_bytes=2,
                     zero_bits=4 if zeros else 0, split=max(128, group), split_note=_MARLIN_K, act_order=act_order)


def _from_config(value: Mapping) -> QuantSpec:
    """A checkpoint's ``quantization_config`` (or ModelOpt's merged hf_quant_config.json)."""
    method = str(value.get("quant_method", "")).lower()
    if method == "fp8":
        block = value.get("weight_block_size")
        return QuantSpec("fp8", 8, block=tuple(block)) if block else QuantSpec("fp8", 8)
    if method == "w8a8_int8":
        return W8A8_INT8
    algo = str(value.get("quant_algo", "")).upper()
    if method == "modelopt" or algo:
        if "NVFP4" in algo or algo == "MIXED_PRECISION":
            return NVFP4  # MIXED_PRECISION: the experts' format (NVFP4 in Step exports), dense FP8 aside
        if algo == "FP8":
            return QuantSpec("fp8", 8)
    if method in ("compressed-tensors", "compressed_tensors"):
        w = _weights_scheme(value) or {}
        bits, kind = int(w.get("num_bits") or 0), str(w.get("type", "int")).lower()
        if bits == 8 and kind == "int":
            return W8A8_INT8
        if bits == 4 and kind == "float":
            return NVFP4_CT if w.get("group_size") == 16 else NVFP4
        if bits == 4 and kind == "int":
            return _w4a16(w)
    if method == "quark":
        text = str(value).lower()
        if "fp4" in text:
            return MXFP4
        if "int8" in text:
            return W8A8_INT8
    if method in ("auto-round", "auto_round"):
        return _autoround(value)
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "auto-round", "auto_round", "moe_wna16") or int(
        value.get("bits", value.get("w_bit", 0)) or 0
    ) == 4:
        group = int(value.get("group_size", value.get("q_group_size", 128)) or 128)
        # AWQ and GPTQ store qzeros (4-bit, packed 8 per int32) per group; labelled "int4" as SGLang's
        # awq/gptq/moe_wna16 method names are (quant_spec_of), so launch and construction agree.
        zeros = 4 if method in ("awq", "gptq", "awq_marlin", "gptq_marlin") else 0
        return QuantSpec("int4", 4, group_size=group, zero_bits=zeros, act_order=bool(value.get("desc_act")))
    raise Step35ConfigError(
        f"unsupported quantization_config {dict(value)!r}; use one of {', '.join(QUANTS)}"
    )


def parse_quant(value: Any) -> QuantSpec:
    """A QuantSpec from a CLI name, SGLang's ``--quantization`` value or a ``quantization_config``."""
    if value is None or value in ("", "bf16", "bfloat16", "unquant", "none"):
        return BF16
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        if value in QUANTS:
            return QUANTS[value]
        if value in ("w8a8_fp8", "modelopt_fp8"):
            return FP8_BLOCK128
        if value in ("awq", "awq_marlin", "gptq", "gptq_marlin", "moe_wna16"):
            return INT4_G128
        if value == "w8a8_int8":
            return W8A8_INT8
        if value in ("auto-round", "auto_round"):
            return autoround_spec()
        if value in ("modelopt_fp4", "w4a4_nvfp4"):
            return NVFP4
        if value in ("mxfp4", "quark_mxfp4"):
            return MXFP4
        raise Step35ConfigError(f"unsupported quantization {value!r}; use one of {', '.join(QUANTS)}")
    if isinstance(value, Mapping):
        return _from_config(value)
    raise Step35ConfigError(f"cannot read a quantization from {value!r}")


def launch_quant(flag: Any, checkpoint_config: Any) -> QuantSpec:
    """What SGLang will build for ``--quantization flag`` on a checkpoint with ``checkpoint_config``:
    the checkpoint's own quantization_config when it has one (SGLang reads it; the flag only has to
    agree), else the flag as SGLang's *online* quantization of BF16 weights — for ``fp8`` that is
    Fp8Config without ``weight_block_size``, i.e. per-tensor FP8, not the 128x128 blocks of an FP8
    checkpoint (reading the flag as block FP8 let an unverified per-tensor MoE through the guard)."""
    if checkpoint_config:
        return parse_quant(checkpoint_config)
    if flag in ("fp8", "w8a8_fp8"):
        return QuantSpec("fp8", 8)
    return parse_quant(flag)


def quant_spec_of(quant_config: Any) -> QuantSpec:
    """The QuantSpec of an SGLang ``QuantizationConfig`` (None = unquantized) as the model holds it."""
    if quant_config is None:
        return BF16
    name = str(quant_config.get_name()).lower()
    if name == "fp8":
        block = getattr(quant_config, "weight_block_size", None)
        return QuantSpec("fp8", 8, block=tuple(block)) if block else QuantSpec("fp8", 8)
    if name == "modelopt_mixed":
        return NVFP4  # the experts of Step's MIXED_PRECISION exports (dense layers FP8)
    if name == "auto-round":  # AutoRoundConfig keeps no raw config, only what it parsed
        return _autoround({"quant_method": name, "bits": quant_config.weight_bits, "group_size": quant_config.group_size,
                           "sym": quant_config.sym, "packing_format": quant_config.packing_format,
                           "backend": quant_config.backend})
    # One method name, several formats: read the checkpoint config SGLang keeps
    # (QuarkConfig.quant_config, CompressedTensorsConfig.config; MoeWNA16Config.full_config: AWQ or GPTQ).
    raw = {"quark": "quant_config", "compressed_tensors": "config", "moe_wna16": "full_config"}.get(name)
    if raw is not None:
        config = getattr(quant_config, raw, None)
        if isinstance(config, Mapping):
            method = {"quark": "quark", "compressed_tensors": "compressed-tensors"}.get(name, config.get("quant_method"))
            return _from_config({**config, "quant_method": method})
    return parse_quant(name)

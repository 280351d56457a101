"""How Step-3.5's quantized weights are stored: one :class:`QuantSpec` per format, the bytes of a
linear weight (scales included) and the multiple a tensor-parallel split must keep.

The layout rule (:mod:`.layout`), the launch guard (:mod:`.policy`), the model's MoE block and the
planner's memory sums all read these specs; nothing else in the package knows a format's bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ..config import Step35ConfigError


@dataclass(frozen=True)
class QuantSpec:
    """How one quantized linear weight is stored (what the layout rule and the memory plan need)."""

    name: str  # "bf16" | "fp8" | "int4"
    weight_bits: int
    block: Optional[tuple[int, int]] = None  # FP8 (block_n, block_k), fp32 inverse scale per block
    group_size: Optional[int] = None  # INT4: one bf16 scale per group along the input dim

    @property
    def split_multiple(self) -> int:
        """A TP partition of an expert/MLP intermediate must be a multiple of this."""
        if self.block:
            return max(self.block)  # N is the out dim of gate/up and the in dim of down
        if self.group_size:
            return self.group_size
        return 1

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes for one [out, in] weight of this quantization, scales included."""
        if self.block:
            bn, bk = self.block
            return out_features * in_features + math.ceil(out_features / bn) * math.ceil(in_features / bk) * 4
        if self.group_size:
            return out_features * in_features // 2 + out_features * math.ceil(in_features / self.group_size) * 2
        return out_features * in_features * self.weight_bits // 8


BF16 = QuantSpec("bf16", 16)
FP8_BLOCK128 = QuantSpec("fp8", 8, block=(128, 128))
INT4_G128 = QuantSpec("int4", 4, group_size=128)
QUANTS = {"bf16": BF16, "fp8": FP8_BLOCK128, "int4": INT4_G128}


def parse_quant(value: Any) -> QuantSpec:
    """A QuantSpec from a CLI name, SGLang's ``--quantization`` value or a ``quantization_config``."""
    if value is None or value in ("", "bf16", "bfloat16", "unquant", "none"):
        return BF16
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        if value in ("fp8", "w8a8_fp8", "modelopt_fp8"):
            return FP8_BLOCK128
        if value in ("int4", "awq", "awq_marlin", "gptq", "gptq_marlin", "moe_wna16"):
            return INT4_G128
        raise Step35ConfigError(f"unsupported quantization {value!r}; use bf16, fp8 or int4")
    if isinstance(value, Mapping):
        method = str(value.get("quant_method", "")).lower()
        if method == "fp8":
            block = value.get("weight_block_size")
            return QuantSpec("fp8", 8, block=tuple(block)) if block else QuantSpec("fp8", 8)
        if int(value.get("bits", value.get("w_bit", 0)) or 0) == 4:
            group = int(value.get("group_size", value.get("q_group_size", 128)) or 128)
            return QuantSpec("int4", 4, group_size=group)
        raise Step35ConfigError(f"unsupported quantization_config {dict(value)!r}; use bf16, fp8 or int4")
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
    return parse_quant(name)

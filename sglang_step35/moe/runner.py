"""The SGLang MoE method subclasses that keep a SwiGLU-clamped Step-3.5 layer on SGLang's Triton
runner under ``SGLANG_USE_AITER=1`` (AITER's CK MoE has no clamped SwiGLU), and the method a
:attr:`~.policy.RoutedRunner.FUSED_TRITON` layer gets per quantization. Which runner a layer gets,
and why, is decided in :mod:`.policy`, on the platform :func:`sglang_step35.platform.current_platform`
reports. These subclass SGLang's methods, so they import SGLang; ``platform/rocm.py`` (the AITER
switch) stays importable without it for the planner.
"""

from __future__ import annotations

from typing import Optional

from sglang.srt.layers.moe.moe_runner import MoeRunner
from sglang.srt.layers.moe.utils import MoeRunnerBackend
from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod


class ClampHonouringMoEMethod(UnquantizedFusedMoEMethod):
    """SGLang's unquantized MoE method, for a clamped layer: Triton runner, weights in Triton's layout.

    Overrides exactly one SGLang decision: whether AITER's CK MoE may serve the layer. SGLang asks
    ``_aiter_ck_moe_unsupported_reason`` both before building the AITER runner and before shuffling
    the weights into AITER's layout, so a reason here keeps both off for this layer only.
    """

    def _aiter_ck_moe_unsupported_reason(self, layer) -> Optional[str]:
        limit = layer.moe_runner_config.gemm1_clamp_limit
        if limit is not None:
            return f"Step-3.5 SwiGLU clamp (limit {limit}) has no AITER CK kernel (vllm #36193)"
        return super()._aiter_ck_moe_unsupported_reason(layer)


class ClampHonouringFp8MoEMethod(Fp8MoEMethod):
    """SGLang's block-FP8 MoE method, for a clamped layer: Triton runner, weights in Triton's layout.

    Overrides exactly one SGLang decision: the runner ``create_moe_runner`` picks (AITER for every
    layer under SGLANG_USE_AITER). With the Triton runner, SGLang's own code does the rest for this
    layer: ``process_weights_after_loading`` shuffles into AITER's layout only when the runner is
    AITER, and ``apply`` takes the Triton branch (``get_triton_quant_info``: block scales, and the
    clamp from ``gemm1_clamp_limit``).
    """

    def create_moe_runner(self, layer, moe_runner_config) -> None:
        super().create_moe_runner(layer, moe_runner_config)
        runner = getattr(self, "runner", None)
        if moe_runner_config.gemm1_clamp_limit is not None and runner is not None and runner.runner_backend.is_aiter():
            self.runner = MoeRunner(MoeRunnerBackend.TRITON, moe_runner_config)


# SGLang 0.5.23's int4 MoE methods (moe_wna16, awq, gptq) and its W8A8-INT8 one (W8A8Int8MoEMethod:
# MoeRunner(TRITON) in create_moe_runner) have no AITER path at all: SGLANG_USE_AITER does not change
# their runner, so there is nothing to override (as on CUDA).
_TRITON_ONLY_QUANTS = ("moe_wna16", "awq", "gptq", "w8a8_int8")


def clamp_honouring_method(quant_config):
    """The method a :attr:`.policy.RoutedRunner.FUSED_TRITON` layer's ``FusedMoE`` gets, for its quantization
    (None: SGLang's own, which already runs on Triton)."""
    if quant_config is None:
        return ClampHonouringMoEMethod()
    if isinstance(quant_config, Fp8Config) and quant_config.weight_block_size is not None:
        return ClampHonouringFp8MoEMethod(quant_config)
    if str(quant_config.get_name()).lower() in _TRITON_ONLY_QUANTS:
        return None
    raise NotImplementedError(
        f"no Triton-pinned MoE method for {type(quant_config).__name__} experts on a SwiGLU-clamped layer "
        "under SGLANG_USE_AITER=1 (BF16 and block FP8 have one); set SGLANG_USE_AITER=0"
    )

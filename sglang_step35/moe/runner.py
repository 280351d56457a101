"""Which runner computes a Step-3.5 MoE layer's routed experts, per platform and layer: the one home
of that rule (the model, the docs table in docs/correctness.md and the tests all read it).

The facts it encodes (SGLang 0.5.23, read in site-packages):
- SGLang's Triton MoE runner computes Step's clamp exactly, ``min(silu(gate), L) * clamp(up, -L, L)``
  (``_swiglu_silu_clamp_mul`` in ``moe_runner/triton_utils/fused_moe.py``), when ``FusedMoE`` gets
  ``gemm1_clamp_limit=L``; unquantized and block-FP8 experts alike (the FP8 path keeps its block
  scales). So on GPUs every layer runs on FusedMoE, clamped ones included, and CUDA graphs capture it.
- AITER's CK fused MoE has no clamped SwiGLU (vllm #36193, #39436). SGLang itself sends layers with
  ``gemm1_clamp_limit`` to Triton only on gfx95x (``_aiter_ck_moe_unsupported_reason``); on MI300X
  (gfx942) it would run AITER and drop the clamp. Clamped layers therefore get
  :class:`ClampHonouringMoEMethod` (BF16) or :class:`ClampHonouringFp8MoEMethod` (block FP8): no
  AITER runner and no AITER weight shuffle for that layer, the other layers stay on AITER (the
  per-layer fallback of vllm #39436). SGLang's ``Fp8MoEMethod`` would hand every layer to AITER,
  whose FP8 MoE passes ``swiglu_limit`` but not ``gemm1_clamp_limit`` (``maybe_get_hip_aiter_quant_info``).
- SGLang's CPU MoE (``moe_forward_native``) ignores ``gemm1_clamp_limit`` and indexes with the -1 ids
  of non-local experts under EP: only there do the clamped layers (and every layer under EP) run our
  own expert loop (``models/expert_compute.py``). CPU is never captured in a CUDA graph.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Optional

from sglang.srt.layers.moe.moe_runner import MoeRunner
from sglang.srt.layers.moe.utils import MoeRunnerBackend
from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod
from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod


class RoutedRunner(str, enum.Enum):
    FUSED = "fused"  # SGLang's FusedMoE with the platform's runner (Triton/AITER/...), clamp passed in
    FUSED_TRITON = "fused-triton"  # FusedMoE pinned to SGLang's Triton runner (clamped layers under AITER)
    EXPERT_LOOP = "expert-loop"  # our loop on FusedMoE's weights (CPU only)


@dataclass(frozen=True)
class RoutedPlan:
    runner: RoutedRunner
    clamp_by: Optional[str]  # who computes the clamp; None on unclamped layers

    @property
    def uses_fused_moe(self) -> bool:
        return self.runner is not RoutedRunner.EXPERT_LOOP


def routed_plan(
    swiglu_limit: float,
    *,
    device: str,
    ep_size: int,
    aiter: bool,
    quantized: bool = False,
    quant: Any = None,
    a2a_backend: Optional[str] = None,
    runner_backend: Optional[str] = None,
    layer_id: Optional[int] = None,
    ep_num_redundant_experts: int = 0,
    enable_eplb: bool = False,
    init_expert_location: str = "trivial",
) -> RoutedPlan:
    """The runner of one MoE layer.

    ``device``: "cuda", "rocm" or "cpu" (see :func:`current_device`); ``aiter``: SGLang's AITER MoE
    is active (``SGLANG_USE_AITER=1`` on ROCm); ``quant``: the experts' quantization (anything
    ``moe.layout.parse_quant`` reads; default: block FP8 if ``quantized`` else BF16);
    ``a2a_backend`` / ``runner_backend`` / ``ep_num_redundant_experts`` / ``enable_eplb`` /
    ``init_expert_location``: SGLang's values of those flags. A combination outside the allow-list
    (:mod:`sglang_step35.served`, which the launch guard asks too) raises
    :class:`~sglang_step35.served.NotServedError` naming it.
    """
    from sglang_step35 import served

    from .layout import _a2a_name

    if swiglu_limit < 0:
        raise ValueError(f"swiglu_limit must be >= 0, got {swiglu_limit}")
    clamped = swiglu_limit > 0
    if device not in ("cuda", "rocm", "cpu"):
        raise ValueError(f"unknown device {device!r}; expected 'cuda', 'rocm' or 'cpu'")
    vendor = {"cuda": "nvidia", "rocm": "amd", "cpu": "cpu"}[device]
    layers = ((layer_id if layer_id is not None else "of this layer"),) if clamped else ()
    served.check(served.Setting(
        vendor, moe_runner_backend=str(runner_backend or "auto").lower(), moe_a2a_backend=_a2a_name(a2a_backend) or "none",
        quant=served.quant_label(quant if quant is not None else ("fp8" if quantized else None)), aiter=aiter,
        clamped_layers=layers, ep_num_redundant_experts=ep_num_redundant_experts, enable_eplb=enable_eplb,
        init_expert_location=init_expert_location,
    ))
    if device == "cpu":
        if clamped or ep_size > 1:
            return RoutedPlan(RoutedRunner.EXPERT_LOOP, "sglang-step35 expert loop" if clamped else None)
        return RoutedPlan(RoutedRunner.FUSED, None)
    if not clamped:
        return RoutedPlan(RoutedRunner.FUSED, None)
    if device == "rocm" and aiter:
        return RoutedPlan(RoutedRunner.FUSED_TRITON, "SGLang Triton runner (gemm1_clamp_limit)")
    return RoutedPlan(RoutedRunner.FUSED, "SGLang Triton runner (gemm1_clamp_limit)")


def current_device() -> str:
    """The platform SGLang runs on, with SGLang's own probes."""
    from sglang.srt.utils import is_cuda, is_hip

    if is_hip():
        return "rocm"
    if is_cuda():
        return "cuda"
    return "cpu"


def aiter_moe_active() -> bool:
    """SGLang's AITER MoE switch, read where SGLang reads it (``unquant._use_aiter``)."""
    from sglang.srt.layers.quantization import unquant

    return bool(unquant._use_aiter)


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


# SGLang 0.5.23's int4 MoE methods (moe_wna16, awq, gptq) have no AITER path at all: SGLANG_USE_AITER
# does not change their runner, so there is nothing to override (as on CUDA).
_TRITON_ONLY_QUANTS = ("moe_wna16", "awq", "gptq")


def clamp_honouring_method(quant_config):
    """The method a :attr:`RoutedRunner.FUSED_TRITON` layer's ``FusedMoE`` gets, for its quantization
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

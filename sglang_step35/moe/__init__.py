"""Mixture-of-experts rules for Step-3.5 under expert/tensor parallelism, one module per job.

- :mod:`.placement` — which EP rank holds which routed expert (SGLang's contiguous-block layout).
- :mod:`.layout` — whether TP may split the experts, the shared expert and the dense MLP for a given
  backend/quantization, and where the MoE block's shared expert lives (split or replicated).
- :mod:`.quant` — each quantization's bytes and TP split multiple (:class:`~.quant.QuantSpec`).
- :mod:`.policy` — which runner serves each layer, the refusals of the allow-list, and the launch
  guard :func:`~.policy.guard_moe_layout` the plugin calls before SGLang builds the model.
- :mod:`.runner` — the SGLang MoE method subclasses that keep clamped layers on the Triton runner
  (imports SGLang; the other modules do not).
The plain-torch reference of EP dispatch/combine semantics the tests use is
tests/reference/ep_reference.py (its expert math: sglang_step35/reference.py).
"""

from .layout import LayoutVerdict, check_moe_layout
from .placement import ExpertPlacement, place_experts, valid_ep_sizes
from .policy import Decision, guard_moe_layout

__all__ = [
    "Decision",
    "ExpertPlacement",
    "LayoutVerdict",
    "check_moe_layout",
    "guard_moe_layout",
    "place_experts",
    "valid_ep_sizes",
]

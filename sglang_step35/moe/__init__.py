"""Mixture-of-experts placement and layout rules for Step-3.5 under expert/tensor parallelism.

- :mod:`.placement` — which EP rank holds which routed expert (SGLang's contiguous-block layout).
- :mod:`.layout` — whether TP may split the experts for a given backend/quantization, and the
  runtime guard :func:`guard_moe_layout` that the plugin calls before SGLang builds the model.
The plain-torch reference of EP dispatch/combine semantics the tests use is
tests/reference/ep_reference.py (its expert math: sglang_step35/reference.py).
"""

from .layout import Decision, LayoutVerdict, check_moe_layout, guard_moe_layout
from .placement import ExpertPlacement, place_experts, valid_ep_sizes

__all__ = [
    "Decision",
    "ExpertPlacement",
    "LayoutVerdict",
    "check_moe_layout",
    "guard_moe_layout",
    "place_experts",
    "valid_ep_sizes",
]

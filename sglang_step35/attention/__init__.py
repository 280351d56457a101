"""Attention support for Step-3.5: backend selection that refuses backends which would ignore the
sliding window (see :mod:`sglang_step35.attention.select`), and the window value each backend needs
(:mod:`sglang_step35.attention.window`)."""

from sglang_step35.attention.select import (
    NO_WINDOW,
    WINDOW_CAPABLE,
    Choice,
    choose_attention_backend,
    guard_window_conventions,
    window_capable_backends,
)
from sglang_step35.attention.window import (
    CONVENTIONS,
    model_radix_sliding_window_size,
    model_runner_sliding_window_size,
    radix_sliding_window_size,
    runner_sliding_window_size,
)

__all__ = [
    "NO_WINDOW",
    "WINDOW_CAPABLE",
    "Choice",
    "choose_attention_backend",
    "guard_window_conventions",
    "model_radix_sliding_window_size",
    "model_runner_sliding_window_size",
    "radix_sliding_window_size",
    "runner_sliding_window_size",
    "CONVENTIONS",
    "window_capable_backends",
]

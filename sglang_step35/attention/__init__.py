"""Attention support for Step-3.5: backend selection that refuses backends which would ignore the
sliding window (see :mod:`sglang_step35.attention.select`)."""

from sglang_step35.attention.select import (
    NO_WINDOW,
    WINDOW_CAPABLE,
    Choice,
    PlatformInfo,
    choose_attention_backend,
    detect_platform,
    window_capable_backends,
)

__all__ = [
    "NO_WINDOW",
    "WINDOW_CAPABLE",
    "Choice",
    "PlatformInfo",
    "choose_attention_backend",
    "detect_platform",
    "window_capable_backends",
]

"""Attention-backend selection for Step-3.5 on faked platforms (the probe: tests/test_platform.py).

The property that matters most (sglang #18970): no path - default or explicit flag - may hand a
model with sliding-window layers to a backend that ignores the window.
"""

from __future__ import annotations

import pytest

from sglang_step35.attention.select import (
    NO_WINDOW,
    WINDOW_CAPABLE,
    Choice,
    choose_attention_backend,
    window_capable_backends,
)
from sglang_step35.platform import Platform

CPU = Platform("cpu")
H100 = Platform("nvidia", compute_capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
B200 = Platform("nvidia", compute_capability=(10, 0), device_name="NVIDIA B200")
B300 = Platform("nvidia", compute_capability=(10, 3))
RTX_PRO_6000 = Platform("nvidia", compute_capability=(12, 0))
A100_FI = Platform("nvidia", compute_capability=(8, 0), flashinfer_available=True)
A100 = Platform("nvidia", compute_capability=(8, 0))
L40S = Platform("nvidia", compute_capability=(8, 9), flashinfer_available=True)
V100 = Platform("nvidia", compute_capability=(7, 0), flashinfer_available=True)
MI300X = Platform("amd", gcn_arch="gfx942", aiter_available=True)
MI325X_NO_AITER = Platform("amd", gcn_arch="gfx942", aiter_available=False)
MI355X = Platform("amd", gcn_arch="gfx950", aiter_available=True)
ALL = [CPU, H100, B200, B300, RTX_PRO_6000, A100_FI, A100, L40S, V100, MI300X, MI325X_NO_AITER, MI355X]


@pytest.mark.parametrize(
    "platform,expected",
    [
        (CPU, "torch_native"),
        (H100, "fa3"),
        (B200, "fa4"),
        (B300, "fa4"),
        (RTX_PRO_6000, "fa4"),
        (A100_FI, "flashinfer"),
        (L40S, "flashinfer"),
        (A100, "triton"),
        (V100, "triton"),  # flashinfer needs sm75+
        (MI300X, "aiter"),
        (MI355X, "aiter"),
        (MI325X_NO_AITER, "triton"),
    ],
)
def test_defaults_per_platform(platform, expected):
    choice = choose_attention_backend(platform, None, has_sliding_layers=True)
    assert isinstance(choice, Choice)
    assert choice.backend == expected
    assert choice.reason


@pytest.mark.parametrize("platform", ALL, ids=lambda p: f"{p.kind}-{p.sm or p.gcn_arch}")
def test_default_always_honours_sliding_windows(platform):
    choice = choose_attention_backend(platform, None, has_sliding_layers=True)
    assert choice.backend in WINDOW_CAPABLE
    # and it is the first suggestion for that platform, so error messages and defaults agree
    assert window_capable_backends(platform)[0] == choice.backend


def test_blackwell_default_is_not_trtllm_mha_and_says_why():
    choice = choose_attention_backend(B200, None, True)
    assert choice.backend != "trtllm_mha"
    assert "18970" in choice.reason


def test_aiter_with_sliding_layers_requests_unified_attention_env():
    choice = choose_attention_backend(MI300X, None, True)
    assert choice.env == {"SGLANG_USE_AITER_UNIFIED_ATTN": "1"}
    assert choose_attention_backend(MI300X, None, False).env == {}
    assert choose_attention_backend(MI325X_NO_AITER, "aiter", True).env == {"SGLANG_USE_AITER_UNIFIED_ATTN": "1"}


@pytest.mark.parametrize("backend", ["fa3", "triton", "flashinfer", "trtllm_mha", "torch_native", "aiter", "fa4"])
def test_explicit_window_capable_flag_wins(backend):
    # even where it is not the default (e.g. triton on Hopper, trtllm_mha on B200)
    for platform in (H100, B200, CPU):
        choice = choose_attention_backend(platform, backend, True)
        assert choice.backend == backend
        assert "explicit" in choice.reason


@pytest.mark.parametrize("backend", sorted(NO_WINDOW))
def test_explicit_flag_without_window_support_is_refused(backend):
    with pytest.raises(ValueError) as err:
        choose_attention_backend(H100, backend, has_sliding_layers=True)
    msg = str(err.value)
    assert "--attention-backend" in msg and backend in msg
    assert "fa3" in msg and "flashinfer" in msg  # the alternatives on this platform


def test_refusal_lists_platform_specific_alternatives():
    with pytest.raises(ValueError, match="aiter, triton"):
        choose_attention_backend(MI355X, "wave", True)
    with pytest.raises(ValueError, match="torch_native"):
        choose_attention_backend(CPU, "flex_attention", True)
    with pytest.raises(ValueError, match="fa4"):
        choose_attention_backend(RTX_PRO_6000, "hpc_ops", True)


def test_unknown_backend_is_refused_for_sliding_models_but_allowed_otherwise():
    with pytest.raises(ValueError, match="not known to apply sliding windows"):
        choose_attention_backend(H100, "my_plugin_attn", True)
    assert choose_attention_backend(H100, "my_plugin_attn", False).backend == "my_plugin_attn"


def test_flag_wins_for_models_without_sliding_layers():
    assert choose_attention_backend(H100, "flex_attention", has_sliding_layers=False).backend == "flex_attention"


def test_capability_tables_are_disjoint():
    assert not set(WINDOW_CAPABLE) & set(NO_WINDOW)

"""Attention-backend selection for Step-3.5 on faked platforms, and the side-effect-free probe.

The property that matters most (sglang #18970): no path - default or explicit flag - may hand a
model with sliding-window layers to a backend that ignores the window.
"""

from __future__ import annotations

import types

import pytest

from sglang_step35.attention import select
from sglang_step35.attention.select import (
    NO_WINDOW,
    WINDOW_CAPABLE,
    Choice,
    PlatformInfo,
    choose_attention_backend,
    detect_platform,
    window_capable_backends,
)

CPU = PlatformInfo("cpu")
H100 = PlatformInfo("nvidia", compute_capability=(9, 0), device_name="NVIDIA H100 80GB HBM3")
B200 = PlatformInfo("nvidia", compute_capability=(10, 0), device_name="NVIDIA B200")
B300 = PlatformInfo("nvidia", compute_capability=(10, 3))
RTX_PRO_6000 = PlatformInfo("nvidia", compute_capability=(12, 0))
A100_FI = PlatformInfo("nvidia", compute_capability=(8, 0), flashinfer_available=True)
A100 = PlatformInfo("nvidia", compute_capability=(8, 0))
L40S = PlatformInfo("nvidia", compute_capability=(8, 9), flashinfer_available=True)
V100 = PlatformInfo("nvidia", compute_capability=(7, 0), flashinfer_available=True)
MI300X = PlatformInfo("amd", gcn_arch="gfx942", aiter_available=True)
MI325X_NO_AITER = PlatformInfo("amd", gcn_arch="gfx942", aiter_available=False)
MI355X = PlatformInfo("amd", gcn_arch="gfx950", aiter_available=True)
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


def test_platform_info_validation_and_properties():
    with pytest.raises(ValueError):
        PlatformInfo("tpu")
    with pytest.raises(ValueError):
        PlatformInfo("nvidia")
    assert H100.is_hopper and not H100.is_blackwell and H100.sm == 90
    assert RTX_PRO_6000.is_blackwell and B300.sm == 103
    assert CPU.sm == 0 and not MI300X.is_hopper


# --- detect_platform with faked torch / NVML / sysfs -------------------------------------------------
def _fake_torch(*, cuda=None, hip=None, available=False, initialized=False, cc=(9, 0), name="GPU", gcn="gfx942:sramecc+:xnack-"):
    calls = []

    def record(fn_name, value):
        def fn(*a, **k):
            calls.append(fn_name)
            return value

        return fn

    cuda_mod = types.SimpleNamespace(
        is_available=record("is_available", available),
        is_initialized=record("is_initialized", initialized),
        get_device_capability=record("get_device_capability", cc),
        get_device_name=record("get_device_name", name),
        get_device_properties=record("get_device_properties", types.SimpleNamespace(gcnArchName=gcn)),
    )
    return types.SimpleNamespace(version=types.SimpleNamespace(cuda=cuda, hip=hip), cuda=cuda_mod), calls


def test_detect_cpu_only_build():
    torch_mod, calls = _fake_torch(cuda=None, hip=None)
    assert detect_platform(torch_mod) == PlatformInfo("cpu")


def test_detect_cuda_build_without_gpu_is_cpu():
    torch_mod, _ = _fake_torch(cuda="12.8", available=False)
    assert detect_platform(torch_mod).kind == "cpu"


def test_detect_nvidia_prefers_nvml_and_does_not_touch_the_device(monkeypatch):
    monkeypatch.setattr(select, "_nvml_capability_and_name", lambda: ((10, 0), "NVIDIA B200"))
    torch_mod, calls = _fake_torch(cuda="12.8", available=True, initialized=False)
    info = detect_platform(torch_mod)
    assert info.compute_capability == (10, 0) and info.device_name == "NVIDIA B200"
    # no call that would create a CUDA context
    assert "get_device_capability" not in calls and "get_device_properties" not in calls
    assert choose_attention_backend(info, None, True).backend == "fa4"


def test_detect_nvidia_falls_back_to_torch_without_nvml(monkeypatch):
    monkeypatch.setattr(select, "_nvml_capability_and_name", lambda: (None, ""))
    torch_mod, calls = _fake_torch(cuda="12.4", available=True, cc=(9, 0), name="NVIDIA H200")
    info = detect_platform(torch_mod)
    assert info.compute_capability == (9, 0) and info.device_name == "NVIDIA H200"


def _kfd(tmp_path, versions):
    for i, v in enumerate(versions):
        node = tmp_path / str(i)
        node.mkdir()
        (node / "properties").write_text(f"cpu_cores_count 0\ngfx_target_version {v}\nsimd_count 0\n")
    return str(tmp_path)


def test_detect_amd_from_sysfs_without_initialising_hip(tmp_path):
    torch_mod, calls = _fake_torch(hip="6.4", available=True, initialized=False)
    info = detect_platform(torch_mod, kfd_nodes=_kfd(tmp_path, [0, 90500]))  # node 0 is the CPU
    assert info.kind == "amd" and info.gcn_arch == "gfx950"
    assert "get_device_properties" not in calls


def test_detect_amd_falls_back_to_torch_when_initialised(tmp_path):
    torch_mod, _ = _fake_torch(hip="6.4", available=True, initialized=True)
    info = detect_platform(torch_mod, kfd_nodes=str(tmp_path / "missing"))
    assert info.gcn_arch == "gfx942"


@pytest.mark.parametrize("version,name", [(90402, "gfx942"), (90500, "gfx950"), (90010, "gfx90a"), (110000, "gfx1100")])
def test_gfx_name(version, name):
    assert select.gfx_name(version) == name


def test_detect_platform_on_this_machine_is_consistent():
    import torch

    info = detect_platform()
    expected = "cpu" if not torch.cuda.is_available() else ("amd" if torch.version.hip else "nvidia")
    assert info.kind == expected

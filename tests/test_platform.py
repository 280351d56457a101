"""The one platform probe (sglang_step35.platform): what it reports on faked machines, that it never
creates a CUDA/HIP context, SGLang's AITER switch read as SGLang reads it, and that one forced
platform reaches every caller (launch policy, ops dispatch, doctor)."""

from __future__ import annotations

import types

import pytest
import torch

from sglang_step35 import platform
from sglang_step35.attention.select import choose_attention_backend
from sglang_step35.platform import Platform, current_platform, for_arch, kind_of, probe as probe_mod
from sglang_step35.platform.probe import probe
from sglang_step35.platform.rocm import aiter_switch

H100 = Platform("nvidia", compute_capability=(9, 0))
B300 = Platform("nvidia", compute_capability=(10, 3))
MI300X = Platform("amd", gcn_arch="gfx942", aiter_available=True)


def test_platform_validation_and_properties():
    with pytest.raises(ValueError, match="unknown platform kind 'tpu'"):
        Platform("tpu")
    with pytest.raises(ValueError, match="compute_capability"):
        Platform("nvidia")
    assert H100.is_hopper and not H100.is_blackwell and H100.sm == 90 and H100.arch == "sm90"
    assert B300.is_blackwell and B300.sm == 103
    assert Platform("cpu").sm == 0 and not MI300X.is_hopper and MI300X.arch == "gfx942"
    assert [p.device for p in (H100, MI300X, Platform("cpu"))] == ["cuda", "rocm", "cpu"]
    assert [p.kernel_impl for p in (H100, MI300X, Platform("cpu"))] == ["cuda", "rocm", "torch"]
    assert [p.has_accelerator for p in (H100, MI300X, Platform("cpu"))] == [True, True, False]


# --- the probe with faked torch / NVML / sysfs ------------------------------------------------------
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


def test_cpu_only_build():
    torch_mod, _ = _fake_torch(cuda=None, hip=None)
    assert probe(torch_mod) == Platform("cpu")


def test_cuda_build_without_gpu_is_cpu():
    torch_mod, _ = _fake_torch(cuda="12.8", available=False)
    assert probe(torch_mod).kind == "cpu"


def test_nvidia_prefers_nvml_and_does_not_touch_the_device(monkeypatch):
    monkeypatch.setattr(probe_mod, "_nvml_capability_and_name", lambda: ((10, 0), "NVIDIA B200"))
    torch_mod, calls = _fake_torch(cuda="12.8", available=True, initialized=False)
    info = probe(torch_mod)
    assert info.compute_capability == (10, 0) and info.device_name == "NVIDIA B200"
    # no call that would create a CUDA context
    assert "get_device_capability" not in calls and "get_device_properties" not in calls
    assert choose_attention_backend(info, None, True).backend == "fa4"


def test_nvidia_falls_back_to_torch_without_nvml(monkeypatch):
    monkeypatch.setattr(probe_mod, "_nvml_capability_and_name", lambda: (None, ""))
    torch_mod, _ = _fake_torch(cuda="12.4", available=True, cc=(9, 0), name="NVIDIA H200")
    info = probe(torch_mod)
    assert info.compute_capability == (9, 0) and info.device_name == "NVIDIA H200"


def _kfd(tmp_path, versions):
    for i, v in enumerate(versions):
        node = tmp_path / str(i)
        node.mkdir()
        (node / "properties").write_text(f"cpu_cores_count 0\ngfx_target_version {v}\nsimd_count 0\n")
    return str(tmp_path)


def test_amd_from_sysfs_without_initialising_hip(tmp_path):
    torch_mod, calls = _fake_torch(hip="6.4", available=True, initialized=False)
    info = probe(torch_mod, kfd_nodes=_kfd(tmp_path, [0, 90500]))  # node 0 is the CPU
    assert info.kind == "amd" and info.gcn_arch == "gfx950"
    assert "get_device_properties" not in calls


def test_amd_falls_back_to_torch_when_initialised(tmp_path):
    torch_mod, _ = _fake_torch(hip="6.4", available=True, initialized=True)
    info = probe(torch_mod, kfd_nodes=str(tmp_path / "missing"))
    assert info.gcn_arch == "gfx942"


@pytest.mark.parametrize("version,name", [(90402, "gfx942"), (90500, "gfx950"), (90010, "gfx90a"), (110000, "gfx1100")])
def test_gfx_name(version, name):
    assert probe_mod.gfx_name(version) == name


def test_this_machine_is_what_torch_and_sglang_say():
    from sglang.srt.utils import is_cuda, is_hip

    expected = "cpu" if not torch.cuda.is_available() else ("amd" if is_hip() else "nvidia")
    assert current_platform().kind == expected
    assert current_platform().has_accelerator == torch.cuda.is_available()
    assert not is_cuda() or current_platform().kind == "nvidia"


# --- SGLang's AITER switch ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "0", "false", "yes", "on", ""])
def test_aiter_switch_reads_the_variable_as_sglang_does(value, monkeypatch):
    """SGLang's MoE reads `get_bool_env_var("SGLANG_USE_AITER") and _is_hip` (unquant._use_aiter):
    "yes" is off there, so it is off here too (the old launch guard read it as on)."""
    from sglang.srt.utils.common import get_bool_env_var

    monkeypatch.setenv("SGLANG_USE_AITER", value)
    sglang_reads = get_bool_env_var("SGLANG_USE_AITER")
    assert aiter_switch("amd") == sglang_reads
    assert aiter_switch("nvidia") is False and aiter_switch("cpu") is False  # `and _is_hip`
    assert Platform("amd", gcn_arch="gfx942").aiter == sglang_reads


def test_aiter_switch_off_when_unset(monkeypatch):
    monkeypatch.delenv("SGLANG_USE_AITER", raising=False)
    assert not Platform("amd", gcn_arch="gfx942").aiter
    assert Platform("amd", gcn_arch="gfx942", use_aiter=True).aiter  # a planned node's value wins
    assert not Platform("nvidia", compute_capability=(9, 0), use_aiter=True).aiter


# --- one vocabulary ----------------------------------------------------------------------------------
@pytest.mark.parametrize("value,kind", [("cuda", "nvidia"), ("rocm", "amd"), ("hip", "amd"), ("mi300x", "amd"),
                                        ("cpu", "cpu"), ("nvidia", "nvidia"), (MI300X, "amd")])
def test_kind_of_every_vocabulary(value, kind):
    assert kind_of(value) == kind


def test_kind_of_an_unknown_object_is_refused_by_name():
    with pytest.raises(ValueError, match="cannot tell the platform kind from 42"):
        kind_of(42)


def test_planner_targets():
    assert for_arch("hopper").is_hopper and for_arch("blackwell").is_blackwell
    assert for_arch("cdna3").gcn_arch == "gfx942" and for_arch("cdna3").aiter  # AMD plans run SGLANG_USE_AITER=1
    assert not for_arch("hopper").aiter
    with pytest.raises(ValueError, match="unknown GPU architecture 'volta'; expected one of ampere"):
        for_arch("volta")


# --- one forced platform reaches every caller ---------------------------------------------------------
def test_forced_platform_reaches_ops_dispatch_and_the_doctor(monkeypatch):
    from sglang_step35 import doctor, ops

    on_device = types.SimpleNamespace(device=torch.device("cuda"))  # what backend_for reads of a tensor
    monkeypatch.setattr(platform, "forced", MI300X)
    assert ops.backend_for(on_device) == "rocm"  # HIP devices are "cuda" tensors: the platform tells
    assert ops.backend_for(torch.zeros(2)) == "torch"  # CPU tensors always take the reference
    info = doctor.platform_info()
    assert (info["kind"], info["arch"], info["accelerator"]) == ("amd", "gfx942", True)
    monkeypatch.setattr(platform, "forced", H100)
    assert doctor.platform_info()["arch"] == "sm90" and ops.backend_for(on_device) == "cuda"


@pytest.mark.parametrize("value,sglang_aiter", [("1", True), ("TRUE", True), ("yes", False), ("0", False)])
def test_launch_guard_judges_the_aiter_switch_sglang_will_build(value, sglang_aiter, monkeypatch):
    """The MoE launch guard reads SGLANG_USE_AITER through the same rule: "yes" (which SGLang's unquant
    reads as off) no longer gets the AITER verdict the model would never run."""
    from sglang_step35.config import read_config
    from sglang_step35.moe import guard_moe_layout

    per_tensor = dict(read_config(), quantization_config={"quant_method": "fp8"})
    args = {"tp_size": 4, "ep_size": 4}
    monkeypatch.setenv("SGLANG_USE_AITER", value)
    decided = guard_moe_layout(args, per_tensor, "rocm").message
    assert decided == guard_moe_layout(args, per_tensor, "rocm", aiter=sglang_aiter).message
    assert decided != guard_moe_layout(args, per_tensor, "rocm", aiter=not sglang_aiter).message

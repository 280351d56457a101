"""Describe the local accelerator without creating a CUDA/HIP context.

NVIDIA: compute capability from NVML (what SGLang's get_device_sm does before torch.cuda is
initialised), falling back to torch only if torch already owns a context. AMD: the gfx target from
the KFD topology in sysfs. AITER / FlashInfer availability is checked with
``importlib.util.find_spec`` rather than importing them (AITER's import can start JIT builds).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from sglang_step35.platform import Platform

_KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"


def probe(torch_module: Any = None, kfd_nodes: str = _KFD_NODES) -> Platform:
    """The :class:`Platform` of this machine (``torch_module`` and ``kfd_nodes`` are injectable for
    tests). A torch build whose devices are not visible (``torch.cuda.is_available()`` false) is cpu."""
    if torch_module is None:
        import torch as torch_module  # noqa: PLC0415 - keep module import cheap

    aiter = _module_present("aiter")
    flashinfer = _module_present("flashinfer")
    if getattr(torch_module.version, "hip", None):
        if not torch_module.cuda.is_available():
            return Platform("cpu")
        arch = _gfx_arch_from_sysfs(kfd_nodes)
        if arch is None and torch_module.cuda.is_initialized():
            arch = torch_module.cuda.get_device_properties(0).gcnArchName.split(":")[0]
        return Platform("amd", gcn_arch=arch, aiter_available=aiter, device_name=arch or "")
    if getattr(torch_module.version, "cuda", None) and torch_module.cuda.is_available():
        cc, name = _nvml_capability_and_name()
        if cc is None or torch_module.cuda.is_initialized():
            cc = tuple(torch_module.cuda.get_device_capability(0))
            name = torch_module.cuda.get_device_name(0)
        return Platform("nvidia", compute_capability=cc, flashinfer_available=flashinfer, device_name=name or "")
    return Platform("cpu")


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _nvml_capability_and_name() -> tuple[tuple[int, int] | None, str]:
    try:
        import pynvml  # noqa: PLC0415 - optional (nvidia-ml-py)

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(_first_visible_index())
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            return (int(major), int(minor)), name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - NVML missing or unusable: caller falls back to torch
        return None, ""


def _first_visible_index() -> int:
    # NVML ignores CUDA_VISIBLE_DEVICES; honour a leading integer entry (UUIDs: fall back to 0).
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def gfx_name(target_version: int) -> str:
    """KFD ``gfx_target_version`` (major*10000 + minor*100 + stepping) -> 'gfx942' style name."""
    major, rest = divmod(int(target_version), 10000)
    minor, stepping = divmod(rest, 100)
    return f"gfx{major}{minor:x}{stepping:x}"


def _gfx_arch_from_sysfs(kfd_nodes: str) -> str | None:
    try:
        nodes = sorted(os.listdir(kfd_nodes))
    except OSError:
        return None
    for node in nodes:
        try:
            with open(os.path.join(kfd_nodes, node, "properties")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    # CPU nodes report gfx_target_version 0.
                    if key == "gfx_target_version" and int(value) > 0:
                        return gfx_name(int(value))
        except (OSError, ValueError):
            continue
    return None

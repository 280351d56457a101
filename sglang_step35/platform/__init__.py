"""The platform sglang-step35 runs on: one probe, one vocabulary (vllm-ascend's `platform` style).

:func:`current_platform` answers, once per process, what every decision that depends on the machine
reads: the launch policy (CPU defaults, attention backend, MoE guard), the model (which runner
computes a MoE layer), ops dispatch (which kernels serve a tensor) and the planner (which asks the
same rules about a target GPU through :func:`for_arch`). A :class:`Platform` says:

- ``kind``: ``"nvidia"``, ``"amd"`` or ``"cpu"`` (no CUDA/ROCm device visible to torch);
- the architecture: ``compute_capability`` on NVIDIA (``sm``), ``gcn_arch`` on AMD (gfx942, gfx950);
- ``aiter``: SGLang's AITER switch as SGLang decides it (``SGLANG_USE_AITER`` on ROCm, read with
  SGLang's own truth values: :func:`sglang_step35.platform.rocm.aiter_switch`), and whether AITER
  and FlashInfer are importable (``aiter_available``, ``flashinfer_available``).

The probe (:mod:`.probe`) never creates a CUDA/HIP context: SGLang forks its scheduler processes
after argument resolution, and an early context poisons ``fork()``. What only CPUs need lives in
:mod:`.cpu`, what only AMD needs in :mod:`.rocm`.

Tests, and anything that asks "what would happen on that machine", set :data:`forced` (e.g. with
``monkeypatch.setattr(sglang_step35.platform, "forced", Platform(...))``): every caller reads the
platform through :func:`current_platform`, so one assignment fakes it everywhere.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, Optional

PlatformKind = Literal["cpu", "nvidia", "amd"]
KINDS = ("cpu", "nvidia", "amd")


@dataclass(frozen=True)
class Platform:
    """What the rules need to know about the accelerator.

    ``compute_capability`` is (major, minor) on NVIDIA: (9, 0) Hopper, (10, 0)/(10, 3) datacenter
    Blackwell (B200/GB200/B300), (12, 0) consumer/workstation Blackwell, (8, x) Ampere/Ada.
    ``gcn_arch`` is the AMD target: gfx942 (MI300X/MI325X), gfx950 (MI350X/MI355X).
    ``use_aiter``: SGLang's AITER switch when known (the planner's target sets it); None reads it the
    way SGLang does, from the environment (:attr:`aiter`).
    """

    kind: PlatformKind
    compute_capability: tuple[int, int] | None = None
    gcn_arch: str | None = None
    aiter_available: bool = False
    flashinfer_available: bool = False
    device_name: str = ""
    use_aiter: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown platform kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "nvidia" and self.compute_capability is None:
            raise ValueError("an nvidia Platform needs compute_capability=(major, minor)")

    @property
    def has_accelerator(self) -> bool:
        return self.kind != "cpu"

    @property
    def aiter(self) -> bool:
        """SGLang's AITER switch (its MoE and attention kernels): ``unquant._use_aiter`` in SGLang."""
        if self.use_aiter is not None:
            return self.kind == "amd" and self.use_aiter
        from sglang_step35.platform.rocm import aiter_switch

        return aiter_switch(self.kind)

    @property
    def device(self) -> str:
        """SGLang's device vocabulary (``--device``, ``is_cuda``/``is_hip``): cuda, rocm or cpu."""
        return {"nvidia": "cuda", "amd": "rocm", "cpu": "cpu"}[self.kind]

    @property
    def kernel_impl(self) -> str:
        """Which of our kernel packages serves device tensors: cuda (kernels_cuda), rocm
        (kernels_rocm, same Triton bodies with AMD launch configs) or torch (the references)."""
        return {"nvidia": "cuda", "amd": "rocm", "cpu": "torch"}[self.kind]

    @property
    def arch(self) -> Optional[str]:
        """sm90 / gfx942 style, None on CPU."""
        if self.kind == "nvidia":
            return f"sm{self.sm}"
        return self.gcn_arch if self.kind == "amd" else None

    @property
    def sm(self) -> int:
        """Compute capability as SGLang writes it (90, 100, 120...); 0 off NVIDIA."""
        if self.kind != "nvidia" or self.compute_capability is None:
            return 0
        major, minor = self.compute_capability
        return major * 10 + minor

    @property
    def is_hopper(self) -> bool:
        return self.kind == "nvidia" and self.sm // 10 == 9

    @property
    def is_blackwell(self) -> bool:
        # Same major set as sglang.srt.utils.common.is_blackwell: sm100/103, sm110, sm120/121.
        return self.kind == "nvidia" and self.sm // 10 in (10, 11, 12)


# A value set here answers every current_platform() call of this process (see the module docstring).
forced: Optional[Platform] = None


@functools.lru_cache(maxsize=1)
def _probed() -> Platform:
    from sglang_step35.platform.probe import probe

    return probe()


def current_platform() -> Platform:
    """This process's platform: probed once (the hardware does not change under a process), or
    :data:`forced`. Its :attr:`Platform.aiter` reads the environment at each access, as the value
    SGLang's processes start with."""
    return forced if forced is not None else _probed()


def kind_of(platform: Any) -> PlatformKind:
    """A platform's kind from a :class:`Platform`, a kind ("nvidia", "amd", "cpu"), SGLang's device
    vocabulary ("cuda", "rocm", "hip") or a planner GPU name ("mi300x"...): the one translation for
    callers that take a platform from a user or another library."""
    if isinstance(platform, Platform):
        return platform.kind
    if isinstance(platform, str):
        p = platform.lower()
        if p in ("rocm", "hip", "amd") or p.startswith("mi3"):
            return "amd"
        if p == "cpu":
            return "cpu"
        return "nvidia"
    for attr, kind in (("is_hip", "amd"), ("is_rocm", "amd"), ("is_cuda", "nvidia"), ("is_cpu", "cpu")):
        probe = getattr(platform, attr, None)
        if probe is not None and (probe() if callable(probe) else probe):
            return kind
    raise ValueError(f"cannot tell the platform kind from {platform!r}; expected a Platform, "
                     "'nvidia'/'amd'/'cpu' or 'cuda'/'rocm'")


# The platform each GPU architecture of the planner stands for: a deployment node has SGLang's
# default kernels installed (flashinfer on NVIDIA, AITER on AMD), and the AMD plans run
# SGLANG_USE_AITER=1 (AITER attention + MoE kernels, what the AMD seed deployments run).
_ARCH = {
    "ampere": dict(kind="nvidia", compute_capability=(8, 0), flashinfer_available=True),
    "ada": dict(kind="nvidia", compute_capability=(8, 9), flashinfer_available=True),
    "hopper": dict(kind="nvidia", compute_capability=(9, 0), flashinfer_available=True),
    "blackwell": dict(kind="nvidia", compute_capability=(10, 0), flashinfer_available=True),
    "cdna3": dict(kind="amd", gcn_arch="gfx942", aiter_available=True, use_aiter=True),
    "cdna4": dict(kind="amd", gcn_arch="gfx950", aiter_available=True, use_aiter=True),
}
ARCHS = tuple(_ARCH)


def for_arch(arch: str) -> Platform:
    """The platform a node of GPU architecture ``arch`` (the planner's names: ampere, ada, hopper,
    blackwell, cdna3, cdna4) presents to the launch policy and the model."""
    try:
        return Platform(**_ARCH[arch])
    except KeyError:
        raise ValueError(f"unknown GPU architecture {arch!r}; expected one of {', '.join(_ARCH)}") from None


__all__ = ["ARCHS", "KINDS", "Platform", "PlatformKind", "current_platform", "for_arch", "forced", "kind_of"]

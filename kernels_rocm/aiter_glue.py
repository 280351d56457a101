"""Optional AITER (ROCm kernel library) integration: what it offers Step-3.5, and where it must not
be used.

The fact that drives this module: AITER's fused MoE has no *clamped* SwiGLU. Its activations are
plain SiLU/GELU gating and ``ActivationType.Swiglu``, which is gpt-oss's SwiGLU-OAI with alpha=1.702
and ``up + 1`` baked in (SGLang 0.5.23 ``layers/moe/moe_runner/aiter.py`` only maps configs with
exactly those constants onto it) - neither is Step-3.5's ``min(silu(gate), L) * clamp(up, -L, L)``. Mapping Step's clamped layers onto AITER's
plain activation dropped GSM8K from ~0.85 to ~0.55 elsewhere (vllm #36193, #39436; ROCm/aiter
#2484); the fix that worked was a Triton fallback for the clamped layers only (43 and 44 in
Step-3.5-Flash) while every unclamped layer keeps AITER. That rule lives in
``sglang_step35.moe.policy`` (the one home of "which runner serves which layer"); this module only
reports, in ``aiter_capabilities``, what the installed AITER offers.

Importing this module never imports AITER; only ``aiter_capabilities()`` does, once, on demand
(AITER's import may trigger JIT builds, so it must not happen as a side effect).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class AiterCapabilities:
    available: bool
    version: str | None = None
    import_error: str | None = None
    fused_moe: bool = False  # aiter.fused_moe importable
    moe_activations: tuple[str, ...] = ()  # names in aiter.ActivationType, for the report
    unified_attention: bool = False  # what SGLang's aiter backend uses for sliding-window layers
    # Always False: no AITER activation computes Step-3.5's clamped SwiGLU (see module docstring).
    # An activation merely *named* like swiglu is gpt-oss's form and must not be mapped onto Step.
    clamped_swiglu: bool = False

    def summary(self) -> str:
        if not self.available:
            return f"AITER not available ({self.import_error or 'not installed'}): all Step-3.5 MoE layers use Triton"
        acts = ", ".join(self.moe_activations) or "unknown"
        return (
            f"AITER {self.version or '(unknown version)'}: fused_moe={'yes' if self.fused_moe else 'no'} "
            f"(activations: {acts}); unified attention={'yes' if self.unified_attention else 'no'}; "
            "clamped SwiGLU=no -> layers with swiglu_limit > 0 must use the Triton MoE path"
        )


def probe_aiter(importer: Callable[[str], object] = importlib.import_module) -> AiterCapabilities:
    """Import AITER (via ``importer``, injectable for tests) and report what it provides."""
    try:
        aiter = importer("aiter")
    except Exception as exc:  # noqa: BLE001 - any import failure (missing, ABI, JIT) means "unavailable"
        return AiterCapabilities(available=False, import_error=f"{type(exc).__name__}: {exc}")
    version = getattr(aiter, "__version__", None)
    fused_moe = _importable(importer, "aiter.fused_moe")
    act_enum = getattr(aiter, "ActivationType", None)
    acts = tuple(getattr(act_enum, "__members__", {}).keys()) if act_enum is not None else ()
    # The module SGLang 0.5.23's aiter attention backend imports for sliding-window layers.
    unified = _importable(importer, "aiter.ops.triton.attention.unified_attention")
    return AiterCapabilities(
        available=True,
        version=str(version) if version is not None else None,
        fused_moe=fused_moe,
        moe_activations=acts,
        unified_attention=unified,
    )


@functools.cache
def aiter_capabilities() -> AiterCapabilities:
    """Cached :func:`probe_aiter` for the real environment."""
    return probe_aiter()


def _importable(importer: Callable[[str], object], name: str) -> bool:
    try:
        importer(name)
        return True
    except Exception:  # noqa: BLE001
        return False

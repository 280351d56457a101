"""What only AMD (ROCm) needs: SGLang's AITER switch, read as SGLang reads it.

SGLang 0.5.23 turns its AITER kernels on with ``SGLANG_USE_AITER`` on HIP builds only:
``unquant._use_aiter = get_bool_env_var("SGLANG_USE_AITER") and _is_hip`` (its MoE runner and the
weight shuffle follow it). ``get_bool_env_var`` accepts "1"/"true" (any case) and treats every other
value, "yes" included, as off; :func:`aiter_switch` applies the same rule so the launch guard, the
model and the planner agree with what SGLang will build (tests/test_platform.py runs SGLang's
function on the same values). This module imports neither torch nor SGLang: the planner uses it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

USE_AITER_ENV = "SGLANG_USE_AITER"
_TRUE = ("true", "1")  # sglang.srt.utils.common.get_bool_env_var's truthy values
_ENVBOOL_TRUE = ("true", "1", "yes", "y")  # sglang.srt.environ.EnvBool's (envs.SGLANG_USE_AITER)


def aiter_switch(kind: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """SGLang's AITER switch on a platform of ``kind`` with environment ``env`` (default: ours)."""
    env = os.environ if env is None else env
    return kind == "amd" and str(env.get(USE_AITER_ENV, "false")).lower() in _TRUE


def aiter_env_refusal(kind: str, env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Why the ``SGLANG_USE_AITER`` value cannot be served on ``kind``, or None. SGLang 0.5.23 reads the
    variable two ways: ``fp8.py`` (the FP8 MoE runner) through ``envs.SGLANG_USE_AITER`` (EnvBool:
    "yes"/"y" are on) and every other module through ``get_bool_env_var`` ("yes"/"y" are off). With such
    a value FP8 experts run on AITER, whose FP8 MoE drops Step-3.5's SwiGLU clamp, while the model
    (and SGLang's unquantized path) plan for no AITER: the clamped layers would silently change."""
    env = os.environ if env is None else env
    raw = env.get(USE_AITER_ENV)
    if kind != "amd" or raw is None:
        return None
    value = str(raw).lower()
    if (value in _TRUE) == (value in _ENVBOOL_TRUE):
        return None
    return (f"{USE_AITER_ENV}={raw}: SGLang 0.5.23 reads this value as on where it picks the FP8 MoE runner "
            "(quantization/fp8.py, envs.SGLANG_USE_AITER) and as off everywhere else (unquant.py and the other "
            "layers, get_bool_env_var), so FP8 experts would run on AITER, which drops Step-3.5's SwiGLU clamp, "
            f"while the rest of the model plans without it. Use {USE_AITER_ENV}=1 (AITER) or {USE_AITER_ENV}=0")

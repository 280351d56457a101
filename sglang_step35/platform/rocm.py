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


def aiter_switch(kind: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """SGLang's AITER switch on a platform of ``kind`` with environment ``env`` (default: ours)."""
    env = os.environ if env is None else env
    return kind == "amd" and str(env.get(USE_AITER_ENV, "false")).lower() in _TRUE

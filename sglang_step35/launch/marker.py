"""Proof that the launch policy ran: a marker in the environment, checked when a Step-3.5 model is built.

The policy (:mod:`.policy`) runs in the launcher process, before SGLang resolves its arguments and
spawns its scheduler processes. Everything it guarantees (config validation, attention backend and
window conventions, MoE layout and the allow-list, MTP and PP checks, CPU defaults) is lost if it does
not decide on the checkpoint: a hub repo id whose config.json it could not fetch (offline, no
network, a gated repo without a token) while SGLang's own fetch moments later succeeds, or a launch
that never reached the policy. So the policy writes its outcome into :data:`MARKER_ENV` (the
processes SGLang spawns inherit it), and :func:`require_launch_policy`, called by
``Step3p5ForCausalLM`` and ``Step3p5MTP`` at construction, refuses to build unless the outcome is
"applied". Other models never read it. :data:`ALLOW_ENV` is the documented way to serve anyway.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger("sglang_step35")

MARKER_ENV = "SGLANG_STEP35_LAUNCH_POLICY"  # written by the policy, inherited by SGLang's processes
ALLOW_ENV = "SGLANG_STEP35_ALLOW_WITHOUT_LAUNCH_POLICY"  # =1: build anyway (warning)
APPLIED = "applied"
NOT_STEP = "not-step"
UNREAD = "unread"


class Step35LaunchPolicyError(RuntimeError):
    """A Step-3.5 model is being built in a launch the launch policy did not decide on."""


def record(outcome: str, model_path: Any, reason: str = "") -> None:
    """Write this launch's outcome (:data:`APPLIED`, :data:`NOT_STEP`, :data:`UNREAD` with ``reason``)
    for the processes the launcher spawns; it replaces whatever a parent process left there."""
    value = f"{outcome}:{model_path}"
    if reason:
        value += f": {reason[:400]}"  # enough to name the failure; the launcher's log has the rest
    os.environ[MARKER_ENV] = value


def _outcome() -> tuple[Optional[str], str]:
    value = os.environ.get(MARKER_ENV)
    if not value:
        return None, ""
    outcome, _, rest = value.partition(":")
    return outcome, rest


def _allowed() -> bool:
    return os.environ.get(ALLOW_ENV, "0").lower() in ("1", "true", "yes")


def require_launch_policy(class_name: str, config: Any = None) -> None:
    """Raise :class:`Step35LaunchPolicyError` unless the launch policy applied to this launch (or
    :data:`ALLOW_ENV` is set, which logs a warning instead). The message names the model, what
    failed and the fixes."""
    outcome, detail = _outcome()
    if outcome == APPLIED:
        return
    model = getattr(config, "_name_or_path", None) or "this model"
    if outcome == UNREAD:
        path, _, reason = detail.partition(": ")
        what = (f"sglang-step35's launch policy could not read the config.json of {path} in the launcher "
                f"({reason or 'no reason recorded'}), so none of its checks and defaults were applied")
        fix = (f"pass a local checkpoint directory as --model-path (e.g. `hf download {path} --local-dir DIR`), "
               f"or run with HF_HUB_OFFLINE=1 and the model already in the Hugging Face cache, or give access "
               f"to a gated repo (HF_TOKEN)")
    elif outcome == NOT_STEP:
        what = (f"sglang-step35's launch policy decided that {detail} is not a Step-3.5 checkpoint (its config.json "
                f"has no model_type 'step3p5'), so none of its checks and defaults were applied")
        fix = "fix the checkpoint's config.json (model_type 'step3p5')"
    else:
        what = (f"sglang-step35's launch policy did not run for this launch ({MARKER_ENV} is not set: the model "
                f"is being built without `sglang serve` / `Engine(...)` resolving its server arguments in a "
                f"process where sglang-step35 is registered), so none of its checks and defaults were applied")
        fix = "launch with `sglang serve` or `sglang.Engine(...)` with sglang-step35 installed"
    message = (f"{class_name} for {model}: {what} (config validation, attention backend and sliding-window "
               f"conventions, the MoE allow-list, MTP and pipeline-parallel checks). Fix: {fix}; or set "
               f"{ALLOW_ENV}=1 to serve without them")
    if _allowed():
        logger.warning("%s (%s=1: building anyway)", message, ALLOW_ENV)
        return
    raise Step35LaunchPolicyError(message)

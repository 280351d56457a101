"""The Step-3.5 launch policy: what sglang-step35 decides before SGLang resolves its server arguments.

:func:`install` puts two hooks in SGLang (``register()`` calls it): :func:`apply_server_policy`
before ``ServerArgs.resolve_once`` and, for MTP on CPU, :func:`~sglang_step35.platform.cpu.keep_cpu_spec_attention`
around SGLang's platform fallbacks. The policy is the ordered list :data:`~.policy.STEPS` of named
steps (:mod:`.policy`), each a function of one :class:`~.policy.Launch`; :mod:`.parallel_guard`
holds the pipeline-parallel rules its PP step applies.
"""

from __future__ import annotations

from sglang_step35.launch.policy import STEPS, Launch, apply_server_policy, run_steps

POLICY_TARGET = "sglang.srt.server_args.ServerArgs.resolve_once"
SPEC_FALLBACK_TARGET = "sglang.srt.arg_groups.overrides.run_post_process_pass"


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sglang_step35.platform.cpu import keep_cpu_spec_attention

    HookRegistry.register(POLICY_TARGET, apply_server_policy, HookType.BEFORE)
    HookRegistry.register(SPEC_FALLBACK_TARGET, keep_cpu_spec_attention, HookType.AROUND)


__all__ = ["STEPS", "Launch", "apply_server_policy", "install", "run_steps"]

"""Every place sglang-step35 touches SGLang (or transformers), as a named list with two probes each.

One :class:`Touchpoint` per row of docs/integration.md that `plugin.register()` or the launch policy
it installs changes (hooks, registry entries, environment variables set, the `sgl_kernel` overlay,
`torch.ops` ops, server-argument defaults). Each carries:

- ``applied()``: is it in place in *this* process (read from live SGLang state, not from a flag we set)?
  Launch-time ones (server-argument defaults, variables the policy sets) report "armed" once the
  policy hook is in place: their values depend on the command line (`step35 doctor -- ARGS` shows them).
- ``needed()``: does the installed SGLang/transformers still behave the way the touchpoint works
  around? The probe runs the upstream code where that is cheap and side-effect free (e.g. transformers'
  own `step3p5` config class, SGLang's `import_model_classes` on a broken module, the pynccl choice of
  `init_model_parallel_group`), reads a declared default otherwise, and says which it did. A workaround
  upstream fixed reports "not needed" and can be deleted. Product features (our model classes,
  parsers, the launch policy) are needed by definition and say so.

`docs/integration.md` rows that are read-only reliance (nothing installed) are listed in
:data:`READ_ONLY_ROWS`; tests/test_doctor.py keeps both lists and the doc in sync. This module is
importable without SGLang; the probes (touchpoint_probes.py) import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from sglang_step35 import touchpoint_probes as probes
from sglang_step35.touchpoint_probes import Probe

@dataclass(frozen=True)
class Touchpoint:
    name: str
    kind: str  # hook | registry | env | overlay | torch.ops | server-arg | process
    target: str  # what in SGLang / transformers it touches
    why: str
    doc_rows: tuple[tuple[str, str], ...]  # (docs/integration.md section, row's first code span up to '(')
    applied: Callable[[], Probe]
    needed: Callable[[], Probe]
    scope: str = "all"  # all | cpu (GPU-less hosts only) | amd


# --- the list ---------------------------------------------------------------------------------------

POLICY_TARGET = probes.POLICY_TARGET
H, R, E, A = "Hooks", "Registries and module state", "Environment variables", "Server-argument defaults"
_CPU_ATTN_TARGET = ("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                    "_build_full_attention_backend_from_str")


def _hook(name, target, why, needed, scope="all") -> Touchpoint:
    return Touchpoint(name, "hook", target, why, ((H, target),), probes.hook_applied(target), needed, scope)


def _state(name, kind, target, why, row, applied, needed, scope="all") -> Touchpoint:
    return Touchpoint(name, kind, target, why, (row,), applied, needed, scope)


def _launch(name, field, why, needed, scope="all", kind="server-arg", section=A) -> Touchpoint:
    return Touchpoint(name, kind, field, why, ((section, field),), probes.policy_armed, needed, scope)


TOUCHPOINTS: tuple[Touchpoint, ...] = (
    _hook("launch-policy", POLICY_TARGET, "Step-3.5 launch policy (config, PP, MTP, attention, MoE, CPU defaults)",
          probes.always("the policy entry point (product)")),
    _hook("keep-cpu-spec-attention", "sglang.srt.arg_groups.overrides.run_post_process_pass",
          "SGLang swaps intel_amx for torch_native on CPUs without AMX; its EAGLE draft refuses torch_native",
          probes.spec_attention_needed),
    _hook("check-resolved-model", "sglang.srt.models.registry._ModelRegistry.resolve_model_cls",
          "SGLang skips an external model module that fails to import and serves its built-in class",
          probes.resolve_check_needed),
    _hook("gloo-only-groups", "sglang.srt.distributed.parallel_state.init_model_parallel_group",
          "SGLang turns pynccl on for CPU groups; PyNcclCommunicator raises on cpu", probes.gloo_needed, "cpu"),
    _hook("swa-torch-native-read", _CPU_ATTN_TARGET,
          "torch_native reads sliding layers' KV at full-pool slots over a hybrid SWA pool", probes.swa_read_needed, "cpu"),
    _hook("reasoning-effort-request",
          "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._convert_to_internal_request",
          "reasoning_effort / thinking_budget become a reasoning-token budget", probes.effort_needed),
    _hook("reasoning-budget-grammar", "sglang.srt.constrained.grammar_manager.GrammarManager.process_req_with_grammar",
          "the budget is enforced as a grammar object (MTP verify applies grammars)", probes.budget_grammar_needed),
    Touchpoint("model-package", "env", "SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_step35.models",
               "our Step3p5ForCausalLM / Step3p5MTP replace SGLang's",
               ((R, "SGLANG_EXTERNAL_MODEL_PACKAGE=sglang_step35.models"), (E, "SGLANG_EXTERNAL_MODEL_PACKAGE")),
               probes.model_package_applied, probes.always("our model classes (product)")),
    # name, kind, target, why, (section, row), applied, needed[, scope]
    *(_state(*row) for row in (
        ("model-registry-update", "registry", "sglang.srt.models.registry.ModelRegistry.models",
         "the registry reads the variable once, at import", (R, "ModelRegistry.models"),
         probes.registry_applied, probes.registry_needed),
        ("step3p5-autoconfig", "registry", "transformers AutoConfig 'step3p5'",
         "transformers maps step3p5 to a config that raises AmbiguousGlobalPerLayerAttributeError",
         (R, "AutoConfig.register"), probes.config_applied, probes.transformers_config_needed),
        ("step3p5-sglang-config-registry", "registry", "sglang.srt.utils.hf_transformers.common._CONFIG_REGISTRY",
         "SGLang re-reads configs of its registered model types with that class", (R, '_CONFIG_REGISTRY["step3p5"]'),
         probes.sglang_config_registry_applied, probes.transformers_config_needed),
        ("step3p5-parsers", "registry", "ReasoningParser.DetectorMap / FunctionCallParser.ToolCallParserEnum",
         "--reasoning-parser / --tool-call-parser step3p5", (R, 'ReasoningParser.DetectorMap["step3p5"]'),
         probes.parsers_applied, probes.always("our parsers (product)")),
        ("sgl-kernel-standin", "overlay", "sys.modules['sgl_kernel'], sys.path overlay",
         "SGLang imports the CUDA-only sgl_kernel", (R, 'sys.modules["sgl_kernel"]'),
         probes.overlay_applied, probes.sgl_kernel_needed, "cpu"),
        ("sgl-kernel-torch-ops", "torch.ops", "torch.ops.sgl_kernel",
         "SGLang's CPU engine calls torch.ops.sgl_kernel.*_cpu", (R, "torch.ops.sgl_kernel"),
         probes.torch_ops_applied, probes.sgl_kernel_needed, "cpu"),
        ("logger", "process", "logging.getLogger('sglang_step35')",
         "our one line per process must survive SGLang's logging setup", (R, "sglang_step35"),
         probes.logger_applied, probes.logger_needed),
        ("registration-stops-process", "process", "sglang.srt.plugins.load_plugins",
         "a failed register() must stop the process, not leave SGLang's built-in classes serving",
         (R, "Step35RegistrationError"), probes.registration_error_applied, probes.load_plugins_needed),
        ("cpu-engine-env", "env", "SGLANG_USE_CPU_ENGINE=1", "SGLang's CPU engine is off unless set",
         (E, "SGLANG_USE_CPU_ENGINE=1"), probes.env_is("SGLANG_USE_CPU_ENGINE", "1"), probes.cpu_engine_needed, "cpu"),
    )),
    _launch("cpu-thread-binding", "SGLANG_CPU_OMP_THREADS_BIND", "one core share per TP x PP rank",
            probes.thread_bind_needed, "cpu", "env", E),
    _launch("aiter-unified-attention", "SGLANG_USE_AITER_UNIFIED_ATTN=1", "AITER's unified attention honours windows",
            probes.aiter_unified_needed, "amd", "env", E),
    _launch("cpu-device", "device", "no GPU", probes.device_needed, "cpu"),
    _launch("attention-backend", "attention_backend", "a backend that honours sliding windows (torch_native on CPU)",
            probes.default_differs("attention_backend", "chosen per platform")),
    _launch("cpu-kv-budget", "max_total_tokens", "SGLang sizes the CPU KV pool from RAM",
            probes.default_differs("max_total_tokens", 16384), "cpu"),
    _launch("cpu-sleep-on-idle", "sleep_on_idle", "SGLang's scheduler busy-polls a core while idle",
            probes.default_differs("sleep_on_idle", True), "cpu"),
    _launch("cpu-quant-dtype", "dtype", "SGLang's AWQ config accepts float16 only, also on CPU",
            probes.awq_dtype_needed, "cpu"),
    _launch("launch-policy-marker", "SGLANG_STEP35_LAUNCH_POLICY",
            "our model classes build only in a launch the policy applied to (launch/marker.py)",
            probes.always("the launch policy's outcome (product)"), "all", "env", E),
    _launch("swa-ratio", "swa_full_tokens_ratio", "planned hybrid SWA pool ratio instead of SGLang's 0.8",
            probes.default_differs("swa_full_tokens_ratio", "planned")),
    _launch("moe-ep-switch", "ep_size", "an expert TP split the kernel cannot run becomes EP = TP",
            probes.always("Step-3.5 MoE layout policy (product)")),
)

# docs/integration.md rows that install nothing (SGLang internals read or driven; the doc names the
# test that pins each). Keyed like Touchpoint.doc_rows.
READ_ONLY_ROWS: dict[tuple[str, str], str] = {
    (R, "hub.launch_config"): "the policy reads a repo id's config.json; nothing is installed",
    (R, "Step35Config.num_attention_heads_per_layer"): "a property of our config class that SGLang reads",
    (R, "Step35BudgetGrammar"): "a grammar object SGLang drives; installed by the reasoning-budget-grammar hook",
    (R, "HybridSWAPoolConfigurator"): "step35 plan only",
    (R, "MOE_RUNNER_BACKEND_CHOICES"): "read by the allow-list",
    (R, "get_exec"): "read at model construction",
    (R, "fused_moe"): "make gpu-check-here calls SGLang's kernels and glue; nothing installed",
    (R, "HookRegistry._hooks"): "read by step35 doctor",
    (R, "W8A8Int8Config.ignore"): "mapped on the config object SGLang builds, at each model's construction",
}


def platform_scope() -> str:
    """This host in Touchpoint.scope's vocabulary (the probe the launch policy uses)."""
    from sglang_step35.platform import current_platform

    return current_platform().kind  # cpu | nvidia | amd


def in_scope(tp: Touchpoint, host: str) -> bool:
    return tp.scope == "all" or tp.scope == host


def _run(probe: Callable[[], Probe]) -> Probe:
    try:
        return probe()
    except Exception as e:  # noqa: BLE001 - a probe that cannot run is a finding, not a crash
        return False, f"probe failed: {type(e).__name__}: {e}"


def status(tp: Touchpoint, host: str, check_needed: bool = True) -> dict:
    """One touchpoint's report: applied / needed with what each probe saw."""
    out = {"name": tp.name, "kind": tp.kind, "target": tp.target, "why": tp.why, "scope": tp.scope}
    if not in_scope(tp, host):
        out.update(applied=None, applied_detail=f"n/a on this host ({host}; {tp.scope} only)")
    else:
        ok, detail = _run(tp.applied)
        out.update(applied=ok, applied_detail=detail)
    if check_needed:
        ok, detail = _run(tp.needed)
        out.update(needed=ok, needed_detail=detail)
    return out


def applied_summary(host: str | None = None) -> str:
    """One line for the launch log (cheap state probes only; register() runs before SGLang applies
    hooks, so a hook counts once it is registered). Never raises: it must not stop a launch."""
    try:
        return _applied_summary(host or platform_scope())
    except Exception as e:  # noqa: BLE001
        return f"touchpoint summary unavailable ({type(e).__name__}: {e}); run `step35 doctor`"


def _applied_summary(host: str) -> str:
    scoped = [tp for tp in TOUCHPOINTS if in_scope(tp, host)]
    missing = []
    for tp in scoped:
        ok, detail = _run(tp.applied)
        if not ok and "not yet applied" not in detail:
            missing.append(tp.name)
    hooks = sum(1 for tp in scoped if tp.kind == "hook")
    tail = f"; NOT in place: {', '.join(missing)}" if missing else ""
    return (f"{len(scoped) - len(missing)}/{len(scoped)} touchpoints for this {host} host in place ({hooks} hooks)"
            f"{tail}; `step35 doctor` says which are still needed")

"""`register()`: the one place sglang-step35 touches SGLang's global state.

SGLang 0.5.23 calls it (entry point group `sglang.srt.plugins`) in every process it starts — launcher,
scheduler, detokenizer, engine — before parsing CLI arguments. It is idempotent. It:
- points `SGLANG_EXTERNAL_MODEL_PACKAGE` at `sglang_step35.models`, so our `Step3p5ForCausalLM` and
  `Step3p5MTP` replace SGLang's same-named classes (the names must stay: SGLang switches the hybrid
  SWA pool and multi-layer EAGLE on them). `SGLANG_STEP35_USE_BUILTIN_MODEL=1` keeps SGLang's classes;
- installs our `step3p5` config class (transformers 5.19 maps `step3p5` to a Step3p7 config that makes
  SGLang's loader raise AmbiguousGlobalPerLayerAttributeError on every real checkpoint);
- registers our `step3p5` reasoning and tool-call parsers;
- on a machine with no CUDA/ROCm device: makes the pure-torch `sgl_kernel` stand-in importable in this
  and every spawned process and turns on SGLang's CPU engine (for every model: SGLang cannot run on
  such a host without them), and for Step-3.5 launches fills CPU-safe server defaults (device cpu,
  torch_native attention, a KV budget that fits RAM) the user did not set.

docs/integration.md lists every hook, registry entry, environment variable and default it touches,
with the SGLang code it targets and why. Supported SGLang: exactly SUPPORTED_SGLANG (the hooks
name private SGLang functions); another version is refused unless SGLANG_STEP35_ALLOW_SGLANG_VERSION=1.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

from sglang_step35 import __version__

logger = logging.getLogger("sglang_step35")

SUPPORTED_SGLANG = "0.5.23"
ALLOW_VERSION_ENV = "SGLANG_STEP35_ALLOW_SGLANG_VERSION"
MODEL_PACKAGE = "sglang_step35.models"
USE_BUILTIN_ENV = "SGLANG_STEP35_USE_BUILTIN_MODEL"
# KV budget (tokens) when the user gives none on CPU: SGLang would otherwise size the pool from RAM
# (15 GB on a 24 GB machine). Override with --max-total-tokens or this variable.
CPU_KV_TOKENS_ENV = "SGLANG_STEP35_CPU_MAX_TOTAL_TOKENS"
DEFAULT_CPU_KV_TOKENS = 16384

_OVERLAY_DIR = str(Path(__file__).parent / "cpu" / "overlay")
_registered = False


def _setup_logger() -> None:
    # SGLang configures logging after plugins run (and differently per process); our one-per-process
    # line must appear regardless, so the logger carries its own handler.
    if not logger.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("[%(asctime)s] sglang-step35: %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def use_builtin_model() -> bool:
    return os.environ.get(USE_BUILTIN_ENV, "0").lower() in ("1", "true", "yes")


def has_accelerator() -> bool:
    import torch

    return bool(torch.cuda.is_available())  # true on ROCm builds with a visible AMD GPU as well


def _install_model_package() -> str:
    if use_builtin_model():
        # A parent process that ran register() (a launcher script, a test runner) leaves our package
        # in the environment its children inherit; the built-in switch must win over it.
        if os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE") == MODEL_PACKAGE:
            del os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"]
        return "sglang.srt.models.step3p5 (built-in; SGLANG_STEP35_USE_BUILTIN_MODEL=1)"
    current = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    if current and current != MODEL_PACKAGE:
        logger.warning(
            "SGLANG_EXTERNAL_MODEL_PACKAGE=%s is set by the user; sglang-step35's model classes are NOT active",
            current,
        )
        return f"{current} (user's SGLANG_EXTERNAL_MODEL_PACKAGE)"
    os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = MODEL_PACKAGE
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.models.registry._ModelRegistry.resolve_model_cls", _check_resolved_model, HookType.AFTER
    )
    # The registry reads the variable once, at import; if it was imported already, update it directly.
    registry = sys.modules.get("sglang.srt.models.registry")
    if registry is not None:
        registry.ModelRegistry.models.update(registry.import_model_classes(MODEL_PACKAGE))
    return f"{MODEL_PACKAGE}.step3p5"


# Every architecture name our model package serves, with the module that defines it (its EntryClass;
# tests/test_model_resolution.py keeps the two in sync). SGLang resolves these names through its
# registry: the target from config.json, the MTP draft as "Step3p5MTP" (multi-layer EAGLE).
OUR_ARCHITECTURES = {"Step3p5ForCausalLM": "step3p5", "Step3p5MTP": "step3p5_mtp"}


def _check_resolved_model(result, *args, **kwargs):
    """SGLang skips external model modules that fail to import and silently serves its built-in
    class instead (for the draft: SGLang's MTP next to our target, with another window convention
    and other layer ids); make that a loud error naming the real cause."""
    cls, arch = result
    module = OUR_ARCHITECTURES.get(arch)
    if module is not None and not cls.__module__.startswith("sglang_step35."):
        import importlib

        importlib.import_module(f"{MODEL_PACKAGE}.{module}")  # re-raises the import error, if any
        raise RuntimeError(f"sglang-step35 is active but SGLang resolved {arch} to {cls.__module__}")
    return None


def _install_config() -> None:
    from transformers import AutoConfig

    from sglang_step35.config import Step35Config

    AutoConfig.register("step3p5", Step35Config, exist_ok=True)
    # SGLang re-reads configs whose model_type is in its own registry with that class; use ours.
    from sglang.srt.utils.hf_transformers import common

    common._CONFIG_REGISTRY["step3p5"] = Step35Config


def _install_parsers() -> None:
    from sglang_step35.parsers import register_parsers
    from sglang_step35.reasoning_effort import install_reasoning_effort

    register_parsers()
    install_reasoning_effort()  # reasoning_effort / thinking_budget for --reasoning-parser step3p5


def _install_cpu_support() -> None:
    from sglang_step35.cpu import swa_attention
    from sglang_step35.cpu.standin import install_torch_ops_namespace, make_module

    # Spawned SGLang processes inherit sys.path: the overlay makes `import sgl_kernel` find the
    # stand-in there before the CUDA-only package.
    if _OVERLAY_DIR not in sys.path:
        sys.path.insert(0, _OVERLAY_DIR)
    existing = sys.modules.get("sgl_kernel")
    if existing is None or not getattr(existing, "IS_SGLANG_STEP35_STANDIN", False):
        sys.modules["sgl_kernel"] = make_module()
    install_torch_ops_namespace()
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.distributed.parallel_state.init_model_parallel_group", _gloo_only_groups, HookType.AROUND
    )
    # torch_native reads sliding layers' KV at full-pool slots: translate them (cpu/swa_attention.py).
    HookRegistry.register("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                          "_build_full_attention_backend_from_str", swa_attention.build_attention_backend, HookType.AROUND)


def _gloo_only_groups(original, *args, **kwargs):
    # SGLang 0.5.23 turns pynccl on for CPU groups too, and PyNcclCommunicator raises "Expected a
    # cuda device, but got: cpu": `--tp 2` could not start on CPU. Gloo alone serves CPU ranks.
    kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


def _cpu_thread_binding(tp_size: int) -> Optional[str]:
    """SGLANG_CPU_OMP_THREADS_BIND value giving each TP rank an equal share of this process's cores
    (SGLang otherwise asserts one NUMA node per rank, which a laptop does not have)."""
    cores = sorted(os.sched_getaffinity(0))
    if tp_size <= 1 or len(cores) < tp_size:
        return None
    per = len(cores) // tp_size
    return "|".join(",".join(str(c) for c in cores[r * per:(r + 1) * per]) for r in range(tp_size))


def _install_server_policy() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.srt.server_args.ServerArgs.resolve_once", apply_server_policy, HookType.BEFORE)
    HookRegistry.register(
        "sglang.srt.arg_groups.overrides.run_post_process_pass", _keep_cpu_spec_attention, HookType.AROUND
    )


def _keep_cpu_spec_attention(original, server_args, fn, *args, **kwargs):
    """EAGLE/MTP on CPU needs SGLang's `intel_amx` attention backend (its draft factory refuses
    torch_native, which also cannot verify); SGLang swaps intel_amx for torch_native on CPUs without
    AMX. Our stand-in implements that backend's ops in pure torch, so keep it for speculative runs."""
    if (
        getattr(fn, "__name__", "") == "_attention_backend_platform_fallbacks"
        and not has_accelerator()
        and getattr(server_args, "speculative_algorithm", None)
        and getattr(server_args, "attention_backend", None) == "intel_amx"
    ):
        return None
    return original(server_args, fn, *args, **kwargs)


def apply_server_policy(server_args, *args, **kwargs):
    """Before SGLang resolves the server arguments of a Step-3.5 model: CPU defaults, attention
    backend choice (windows must be honoured), and the MoE layout guard (no expert split a backend
    cannot run). Explicit user flags win unless they would silently give wrong results."""
    if getattr(server_args, "_resolution_finished", False):
        return None
    from sglang_step35.swa_ratio import apply_swa_ratio_policy, resolving_placeholder

    if resolving_placeholder():  # SGLang's placeholder ServerArgs our ratio policy has it resolve
        return None
    from sglang_step35.hub import launch_config

    model_path = getattr(server_args, "model_path", None)
    # A repo id gets the config.json SGLang itself reads moments later (same revision, hub and
    # cache rules), so it gets the decisions of the same checkpoint on disk.
    cfg = launch_config(
        model_path, getattr(server_args, "revision", None), getattr(server_args, "download_dir", None)
    ) if model_path else None
    is_step = cfg is not None and cfg.get("model_type") == "step3p5"
    if is_step:
        from sglang_step35.config import validate

        # A malformed config.json fails here, in the launcher, with one named error.
        validate(cfg, tp_size=int(getattr(server_args, "tp_size", 1) or 1))
        from sglang_step35.parallel_guard import guard_pipeline_parallel

        guard_pipeline_parallel(server_args, cfg)
    if is_step and getattr(server_args, "speculative_algorithm", None):
        from sglang_step35.mtp_check import check_mtp_request

        # Fail in the launcher with a clear message, not in a scheduler subprocess.
        check_mtp_request(cfg, getattr(server_args, "speculative_num_steps", None), server_args.model_path)
        if not has_accelerator() and getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = "intel_amx"  # see _keep_cpu_spec_attention
    if not is_step:
        # Another model on a GPU-less host gets SGLang's own CPU defaults (it picks device cpu and
        # torch_native itself once register() has made it importable); ours are Step-3.5 policy.
        return None
    if not has_accelerator():
        _cpu_server_defaults(server_args)
    from sglang_step35.attention import choose_attention_backend, detect_platform, guard_window_conventions
    from sglang_step35.config import SLIDING
    from sglang_step35 import served
    from sglang_step35.moe.policy import guard_moe_layout

    platform = detect_platform() if has_accelerator() else None
    if platform is not None:
        choice = choose_attention_backend(
            platform, getattr(server_args, "attention_backend", None), SLIDING in (cfg.get("layer_types") or [])
        )
        for k, v in choice.env.items():
            os.environ.setdefault(k, v)
        if getattr(server_args, "attention_backend", None) is None:
            server_args.attention_backend = choice.backend
        logger.info("attention backend %s: %s", choice.backend, choice.reason)
    # A sliding layer must see exactly `sliding_window` keys in prefill, decode and draft alike.
    guard_window_conventions(
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
        has_sliding_layers=SLIDING in (cfg.get("layer_types") or []),
        speculative_eagle_topk=getattr(server_args, "speculative_eagle_topk", None),
    )
    # The MTP draft's own attention backend (the allow-list, sglang_step35.served).
    served.check_draft_attention(server_args, cfg, platform)
    # One platform probe (detect_platform) for both the attention choice and the MoE guard.
    decision = guard_moe_layout(server_args, cfg, platform.kind if platform is not None else "cpu")
    if decision.action == "switch_to_ep":
        server_args.ep_size = decision.ep_size
        logger.warning("%s", decision.message)
    elif decision.action == "refuse":
        raise ValueError(decision.message)
    apply_swa_ratio_policy(server_args, cfg)  # hybrid SWA pool: planned ratio, or HiCache's cost named
    return None


def _cpu_server_defaults(server_args) -> None:
    """Fill what the user left unset with values that serve Step-3.5 on a GPU-less machine (a laptop
    or CI runner). Only Step-3.5 launches get them: the process-level CPU support of register() (the
    sgl_kernel stand-in, SGLang's CPU engine, gloo-only groups) is what every model needs to run on
    such a host, but a KV cap, idle sleeping and core binding are choices a user of another model did
    not ask sglang-step35 to make."""
    if getattr(server_args, "device", None) in (None, "auto"):
        server_args.device = "cpu"
    if getattr(server_args, "attention_backend", None) is None:
        server_args.attention_backend = "torch_native"
    if getattr(server_args, "max_total_tokens", None) is None:
        server_args.max_total_tokens = int(os.environ.get(CPU_KV_TOKENS_ENV, DEFAULT_CPU_KV_TOKENS))
    if not getattr(server_args, "sleep_on_idle", False):
        # SGLang's scheduler otherwise busy-polls a whole core while idle: on a laptop (or a
        # 2-core CI machine) that halves the machine for everything else.
        server_args.sleep_on_idle = True
    # One core share per rank: TP ranks of every pipeline stage (SGLang's numa_utils asserts otherwise).
    binding = _cpu_thread_binding(
        int(getattr(server_args, "tp_size", 1) or 1) * int(getattr(server_args, "pp_size", 1) or 1)
    )
    if binding and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = binding  # inherited by the spawned TP ranks


def check_sglang_version(installed: Optional[str] = None) -> None:
    """Refuse an SGLang other than SUPPORTED_SGLANG: our hooks target private functions by dotted
    name (docs/integration.md), and a moved target would silently leave SGLang's behaviour in place.
    ALLOW_VERSION_ENV=1 turns the refusal into a warning, for trying a new release."""
    from importlib.metadata import PackageNotFoundError, version

    if installed is None:
        try:
            installed = version("sglang")
        except PackageNotFoundError:
            installed = "not installed"
    if installed == SUPPORTED_SGLANG:
        return
    msg = (f"sglang-step35 {__version__} supports SGLang {SUPPORTED_SGLANG} only; found {installed}. "
           f"Install sglang=={SUPPORTED_SGLANG}, or set {ALLOW_VERSION_ENV}=1 to try anyway (the hooks in "
           "docs/integration.md may target code that moved)")
    if os.environ.get(ALLOW_VERSION_ENV, "0").lower() in ("1", "true", "yes"):
        logger.warning("%s", msg)
        return
    raise UnsupportedSGLangVersion(msg)


class UnsupportedSGLangVersion(RuntimeError):
    """The installed SGLang is not SUPPORTED_SGLANG (and ALLOW_VERSION_ENV is not set)."""


class Step35RegistrationError(SystemExit):
    """`register()` could not complete: the process stops with this message.

    A SystemExit, not an Exception, on purpose. SGLang's `load_plugins()` runs each plugin inside
    `except Exception: logger.exception(...)` and goes on, so an Exception would leave SGLang serving
    its built-in Step-3.5 model with none of our config class, parsers or launch guards (a partial
    install that answers requests). SystemExit passes that handler in every process that loads plugins
    (launcher, `Engine`, scheduler, detokenizer: a scheduler that exits this way fails the launch),
    and Python prints its message without a traceback; the cause's traceback is logged just before."""


_registration_error: Optional[Step35RegistrationError] = None
# What register() did in this process, for `step35 doctor` (sglang_step35/touchpoints.py reads it).
registration: dict = {}


def register() -> None:
    """Entry point called by SGLang's plugin loader in every process. All or nothing: any failure
    stops the process (Step35RegistrationError)."""
    global _registered, _registration_error
    if _registration_error is not None:  # a caller that caught the first stop gets it again
        raise _registration_error
    if _registered:
        return
    _setup_logger()
    try:
        check_sglang_version()
        _registered = True
        if not has_accelerator():
            _install_cpu_support()
        _install_server_policy()
        _install_config()
        _install_parsers()
        registration["registry_imported_before"] = "sglang.srt.models.registry" in sys.modules
        active = _install_model_package()
        registration["model_classes"] = active
    except Exception as e:
        if not isinstance(e, UnsupportedSGLangVersion):  # that message says all; other causes need the trace
            logger.exception("sglang-step35 could not install itself")
        _registration_error = Step35RegistrationError(
            f"sglang-step35 {__version__}: the plugin could not install itself into SGLang, so this process stops "
            f"(SGLang would otherwise serve its built-in Step-3.5 classes without sglang-step35's config, parsers "
            f"and launch guards): {type(e).__name__}: {e}")
        raise _registration_error from e
    from sglang_step35.touchpoints import applied_summary

    logger.info("sglang-step35 %s active (pid %d): Step-3.5 model classes from %s; %s", __version__, os.getpid(),
                active, applied_summary())

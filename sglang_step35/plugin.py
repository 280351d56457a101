"""`register()`: sglang-step35's entry point into SGLang (only registration lives here).

SGLang 0.5.23 calls it (entry point group `sglang.srt.plugins`) in every process it starts — launcher,
scheduler, detokenizer, engine — before parsing CLI arguments. It is idempotent. It:
- points `SGLANG_EXTERNAL_MODEL_PACKAGE` at `sglang_step35.models`, so our `Step3p5ForCausalLM` and
  `Step3p5MTP` replace SGLang's same-named classes (the names must stay: SGLang switches the hybrid
  SWA pool and multi-layer EAGLE on them). `SGLANG_STEP35_USE_BUILTIN_MODEL=1` keeps SGLang's classes;
- installs our `step3p5` config class (transformers 5.19 maps `step3p5` to a Step3p7 config that makes
  SGLang's loader raise AmbiguousGlobalPerLayerAttributeError on every real checkpoint);
- registers our `step3p5` reasoning and tool-call parsers;
- on a machine with no CUDA/ROCm device (`sglang_step35.platform`): SGLang's CPU engine made
  runnable for every model (`platform/cpu.py`: the pure-torch `sgl_kernel` stand-in in this and every
  spawned process, gloo-only groups);
- installs the Step-3.5 launch policy (`sglang_step35.launch`: config, PP, MTP, platform defaults,
  attention, the allow-list, MoE, SWA ratio, as named steps).

docs/integration.md lists every hook, registry entry, environment variable and default it touches,
with the SGLang code it targets and why. Supported SGLang: exactly SUPPORTED_SGLANG (the hooks
name private SGLang functions); another version is refused unless SGLANG_STEP35_ALLOW_SGLANG_VERSION=1.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from sglang_step35 import __version__

logger = logging.getLogger("sglang_step35")

SUPPORTED_SGLANG = "0.5.23"
ALLOW_VERSION_ENV = "SGLANG_STEP35_ALLOW_SGLANG_VERSION"
MODEL_PACKAGE = "sglang_step35.models"
USE_BUILTIN_ENV = "SGLANG_STEP35_USE_BUILTIN_MODEL"
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
        from sglang_step35 import launch
        from sglang_step35.platform import current_platform

        if not current_platform().has_accelerator:
            from sglang_step35.platform.cpu import install_cpu_support

            install_cpu_support()
        launch.install()
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

"""The probes of sglang_step35/touchpoints.py: is a touchpoint in place (``*_applied``), and does the
installed SGLang / transformers still behave the way it works around (``*_needed``).

Each probe returns ``(yes/no, what it checked and saw)`` and says how it knew: "ran it" (the upstream
code ran on a probe input and put back whatever it touched), "declared default read", or "source read"
where running it needs a live server. Imports are lazy: the module is importable without SGLang.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

Probe = tuple[bool, str]  # (yes/no, what was checked and what it showed)

ARMED = "armed"  # launch-time touchpoint: the policy that sets it is installed
POLICY_TARGET = "sglang.srt.server_args.ServerArgs.resolve_once"

# --- applied() helpers ------------------------------------------------------------------------------


def hook_applied(target: str) -> Callable[[], Probe]:
    def probe() -> Probe:
        from sglang.srt.plugins.hook_registry import HookRegistry

        # HookRegistry's private tables are the only record of what is registered and patched.
        ours = [h for _t, h, _s in HookRegistry._hooks.get(target, []) if getattr(h, "__module__", "").startswith(
            "sglang_step35")]
        if not ours:
            return False, "no sglang_step35 hook registered on this target"
        names = ", ".join(f"{h.__module__}.{h.__qualname__}" for h in ours)
        if target not in HookRegistry._patched:
            return False, f"{names} registered, not yet applied (SGLang's load_plugins() applies it)"
        return True, f"{names} applied"
    return probe


def policy_armed() -> Probe:
    ok, detail = hook_applied(POLICY_TARGET)()
    return (True, f"{ARMED}: set at launch by the policy hook ({detail})") if ok else (False, detail)


def env_is(name: str, value: str) -> Callable[[], Probe]:
    def probe() -> Probe:
        cur = os.environ.get(name)
        return cur == value, f"{name}={cur!r}"
    return probe


def model_package_applied() -> Probe:
    from sglang_step35 import plugin

    cur = os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE")
    if plugin.use_builtin_model():
        return False, f"{plugin.USE_BUILTIN_ENV}=1: SGLang's built-in classes are served on purpose"
    return cur == plugin.MODEL_PACKAGE, f"SGLANG_EXTERNAL_MODEL_PACKAGE={cur!r}"


def registry_applied() -> Probe:
    reg = sys.modules.get("sglang.srt.models.registry")
    if reg is None:
        return True, "registry not imported yet: it reads SGLANG_EXTERNAL_MODEL_PACKAGE when it is"
    cls = reg.ModelRegistry.models.get("Step3p5ForCausalLM")
    mod = getattr(cls, "__module__", None)
    return bool(mod and mod.startswith("sglang_step35.")), f"ModelRegistry.models['Step3p5ForCausalLM'] from {mod}"


def config_applied() -> Probe:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from sglang_step35.config import Step35Config

    try:
        cls = CONFIG_MAPPING["step3p5"]
    except KeyError:
        return False, "transformers maps no step3p5 config"
    return cls is Step35Config, f"AutoConfig step3p5 -> {cls.__module__}.{cls.__name__}"


def sglang_config_registry_applied() -> Probe:
    from sglang.srt.utils.hf_transformers import common

    from sglang_step35.config import Step35Config

    cls = common._CONFIG_REGISTRY.get("step3p5")
    return cls is Step35Config, f"_CONFIG_REGISTRY['step3p5'] = {getattr(cls, '__module__', None)}"


def parsers_applied() -> Probe:
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    r = ReasoningParser.DetectorMap.get("step3p5")
    t = FunctionCallParser.ToolCallParserEnum.get("step3p5")
    ok = all(getattr(c, "__module__", "").startswith("sglang_step35.") for c in (r, t))
    return ok, f"step3p5 -> {getattr(r, '__name__', None)}, {getattr(t, '__name__', None)}"


def overlay_applied() -> Probe:
    from sglang_step35.platform.cpu import OVERLAY_DIR

    mod = sys.modules.get("sgl_kernel")
    standin = bool(getattr(mod, "IS_SGLANG_STEP35_STANDIN", False))
    on_path = OVERLAY_DIR in sys.path
    return standin and on_path, f"sys.modules['sgl_kernel'] is the stand-in: {standin}; overlay on sys.path: {on_path}"


def torch_ops_applied() -> Probe:
    import torch

    from sglang_step35.cpu.standin import _StandInOpNamespace

    ns = getattr(torch.ops, "sgl_kernel", None)
    return isinstance(ns, _StandInOpNamespace), f"torch.ops.sgl_kernel is {type(ns).__name__}"


def logger_applied() -> Probe:
    from sglang_step35.plugin import logger

    return bool(logger.handlers) and not logger.propagate, f"handlers {len(logger.handlers)}, propagate {logger.propagate}"


def registration_error_applied() -> Probe:
    from sglang_step35.plugin import Step35RegistrationError

    return issubclass(Step35RegistrationError, SystemExit) and not issubclass(Step35RegistrationError, Exception), (
        "register() failures raise Step35RegistrationError, a SystemExit")


# --- needed() probes: the upstream behaviour each one works around ----------------------------------


@contextlib.contextmanager
def _quiet(*loggers: str):
    """Silence SGLang's own log lines while a probe runs its code (they would read as real events)."""
    objs = [logging.getLogger(n) for n in loggers]
    saved = [lg.disabled for lg in objs]
    for lg in objs:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(objs, saved):
            lg.disabled = was


def always(reason: str) -> Callable[[], Probe]:
    return lambda: (True, reason)


def _sglang_default(field: str):
    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.server_args import ServerArgs

    return {f.name: f.default for f in record_fields(ServerArgs)}[field]


def default_differs(field: str, ours) -> Callable[[], Probe]:
    def probe() -> Probe:
        theirs = _sglang_default(field)
        return theirs != ours, f"SGLang's ServerArgs default for {field}: {theirs!r} (ours: {ours!r}; declared default read)"
    return probe


def awq_dtype_needed() -> Probe:
    # SGLang's own config for an AWQ checkpoint: does it still refuse bfloat16 (the CPU dtype default)?
    import torch
    from sglang.srt.layers.quantization import get_quantization_config

    cfg = get_quantization_config("awq").from_config({"bits": 4, "group_size": 128, "zero_point": True})
    dtypes = cfg.get_supported_act_dtypes()
    return torch.bfloat16 not in dtypes, f"{type(cfg).__name__}.get_supported_act_dtypes() = {dtypes} (ran)"


def spec_attention_needed() -> Probe:
    # Run SGLang's own post-process step on a CPU record without AMX: does it still swap intel_amx?
    from sglang.srt.arg_groups import overrides

    real = overrides.get_platform
    overrides.get_platform = lambda: SimpleNamespace(has_amx=False)
    try:
        with _quiet(overrides.__name__):
            out = overrides._attention_backend_platform_fallbacks(SimpleNamespace(attention_backend="intel_amx", device="cpu"))
    finally:
        overrides.get_platform = real
    swapped = out.get("attention_backend") == "torch_native"
    return swapped, f"_attention_backend_platform_fallbacks(intel_amx, cpu, no AMX) returns {out} (ran it)"


def resolve_check_needed() -> Probe:
    # SGLang's import_model_classes on a package whose only module fails to import: does it skip it?
    from sglang.srt.models import registry

    with tempfile.TemporaryDirectory() as d:
        pkg = Path(d) / "step35_doctor_broken_pkg"
        pkg.mkdir()
        (pkg / "__init__.py").write_text("")
        (pkg / "broken.py").write_text("raise ImportError('step35 doctor probe')\n")
        sys.path.insert(0, d)
        try:
            try:
                with _quiet(registry.__name__):
                    found = registry.import_model_classes("step35_doctor_broken_pkg")
            except ImportError:
                return False, "import_model_classes raises a module's import error itself (ran it)"
        finally:
            sys.path.remove(d)
            for k in [k for k in sys.modules if k.startswith("step35_doctor_broken_pkg")]:
                del sys.modules[k]
    return True, f"import_model_classes skips a module that fails to import and returns {found} (ran it)"


def gloo_needed() -> Probe:
    # Call SGLang's own init_model_parallel_group (unwrapped) for a gloo group; capture its pynccl choice.
    from sglang.srt.distributed import parallel_state

    seen = {}

    class Capture:
        def __init__(self, **kw):
            seen.update(kw)

    fn = inspect.unwrap(parallel_state.init_model_parallel_group)
    real = parallel_state.GroupCoordinator
    parallel_state.GroupCoordinator = Capture
    try:
        fn([[0]], 0, "gloo")
    finally:
        parallel_state.GroupCoordinator = real
    on = bool(seen.get("use_pynccl"))
    return on, f"init_model_parallel_group(backend='gloo') asks for use_pynccl={seen.get('use_pynccl')} (ran it)"


def swa_read_needed() -> Probe:
    # Source check (a behavioural one needs a hybrid pool and a batch: tests/test_swa_pool_cpu.py).
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    readers = ("_run_sdpa_forward_extend", "_run_sdpa_forward_decode")
    src = "".join(inspect.getsource(getattr(TorchNativeAttnBackend, r)) for r in readers)
    translates = "translate_loc_from_full_to_swa" in src or "full_to_swa" in src
    return not translates, (f"TorchNativeAttnBackend.{'/'.join(readers)} "
                            f"{'translate' if translates else 'do not translate'} full-pool slots to SWA slots "
                            "(source read)")


def effort_needed() -> Probe:
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat

    src = inspect.getsource(inspect.unwrap(OpenAIServingChat._convert_to_internal_request))
    own = "thinking_budget" in src
    return not own, (f"SGLang's _convert_to_internal_request {'handles' if own else 'has no'} thinking_budget "
                     "(source read)")


def budget_grammar_needed() -> Probe:
    theirs = _sglang_default("enable_strict_thinking")
    return not theirs, f"SGLang's own thinking budget is behind --enable-strict-thinking (default {theirs!r})"


def registry_needed() -> Probe:
    # Source read: does SGLang's registry read the variable at module level only (at its import)? Then a
    # process that imported it before register() (an Engine user, a test runner) needs the update.
    from sglang.srt.models import registry

    from sglang_step35 import plugin

    top_level = [ln for ln in inspect.getsource(registry).splitlines()
                 if "SGLANG_EXTERNAL_MODEL_PACKAGE" in ln and not ln[:1].isspace()]
    before = plugin.registration.get("registry_imported_before")
    here = {None: "register() has not run here", True: "imported before register() here (updated)",
            False: "imported after register() here"}[before]
    return bool(top_level), (f"sglang.srt.models.registry reads SGLANG_EXTERNAL_MODEL_PACKAGE "
                             f"{'once, at import' if top_level else 'not at import'} (source read); {here}")


def transformers_config_needed() -> Probe:
    # transformers' own class for model_type step3p5 (what AutoConfig gave before our registration),
    # on the real Step-3.5-Flash config: does reading it still raise?
    from transformers.models.auto import configuration_auto as ca

    from sglang_step35.config import read_config

    name = ca.CONFIG_MAPPING_NAMES.get("step3p5")
    if name is None:
        return True, "transformers has no step3p5 config at all"
    module = importlib.import_module(f"transformers.models.{ca.model_type_to_module_name('step3p5')}")
    cfg = getattr(module, name)(**read_config(None))
    try:
        heads = cfg.num_attention_heads
    except Exception as e:  # noqa: BLE001 - the error type is the finding
        return True, f"transformers maps step3p5 to {name}; reading num_attention_heads raises {type(e).__name__} (ran it)"
    layers = len(getattr(cfg, "layer_types", None) or [])
    ok = heads == 64 and layers == 48
    return not ok, f"transformers' {name} reads the Flash config: heads {heads}, {layers} layer types (ran it)"


def sgl_kernel_needed() -> Probe:
    # Import the real sgl_kernel with our stand-in and overlay out of the way, then put them back.
    from sglang_step35.platform.cpu import OVERLAY_DIR

    cur = sys.modules.get("sgl_kernel")
    if cur is not None and not getattr(cur, "IS_SGLANG_STEP35_STANDIN", False):
        return False, "the real sgl_kernel is imported in this process"
    if cur is None and OVERLAY_DIR not in sys.path:  # no stand-in here: a plain import, kept
        try:
            importlib.import_module("sgl_kernel")
            return False, "the real sgl_kernel imports on this host (ran it)"
        except Exception as e:  # noqa: BLE001 - any failure means SGLang cannot import it either
            return True, f"the real sgl_kernel fails to import: {type(e).__name__} (ran it)"
    saved_mods = {k: v for k, v in sys.modules.items() if k == "sgl_kernel" or k.startswith("sgl_kernel.")}
    saved_path = list(sys.path)
    for k in saved_mods:
        del sys.modules[k]
    sys.path[:] = [p for p in sys.path if p != OVERLAY_DIR]
    try:
        importlib.import_module("sgl_kernel")
        result = False, "the real sgl_kernel imports on this host (ran it)"
    except Exception as e:  # noqa: BLE001 - any failure means SGLang cannot import it either
        first = (str(e).strip().splitlines() or [""])[0][:120]
        result = True, f"the real sgl_kernel fails to import: {type(e).__name__}: {first} (ran it)"
    finally:
        for k in [k for k in sys.modules if k == "sgl_kernel" or k.startswith("sgl_kernel.")]:
            del sys.modules[k]
        sys.modules.update(saved_mods)
        sys.path[:] = saved_path
    return result


def logger_needed() -> Probe:
    from sglang.srt import server_args

    src = inspect.getsource(server_args.prepare_server_args)
    resets = "force=True" in src
    return resets, f"prepare_server_args {'calls' if resets else 'does not call'} logging.basicConfig(force=True) (source read)"


def load_plugins_needed() -> Probe:
    # Run SGLang's load_plugins with one plugin that raises: does it swallow the Exception and go on?
    import sglang.srt.plugins as plugins

    def failing_plugin():
        raise RuntimeError("step35 doctor probe")

    real_group, real_loaded = plugins.load_plugins_by_group, plugins._plugins_loaded
    plugins.load_plugins_by_group = lambda *a, **k: {"step35-doctor-probe": (failing_plugin, None)}
    plugins._plugins_loaded = False
    try:
        with _quiet(plugins.__name__):  # its logger.exception would print the probe's traceback
            plugins.load_plugins()
        swallowed = True
    except RuntimeError:
        swallowed = False
    finally:
        plugins.load_plugins_by_group, plugins._plugins_loaded = real_group, real_loaded
    return swallowed, (f"load_plugins() {'swallows' if swallowed else 'propagates'} a plugin's Exception (ran it); "
                       "an Exception from register() would leave SGLang serving its built-in classes")


def cpu_engine_needed() -> Probe:
    from sglang.srt.utils import common

    saved = os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
    try:
        on = inspect.unwrap(common.is_cpu)()  # past lru_cache: what SGLang decides without the variable
    finally:
        if saved is not None:
            os.environ["SGLANG_USE_CPU_ENGINE"] = saved
    return not on, f"without SGLANG_USE_CPU_ENGINE, SGLang's is_cpu() is {on} (ran it)"


def thread_bind_needed() -> Probe:
    from sglang.srt.utils.numa_utils import get_cpu_ids_by_node

    nodes = len(get_cpu_ids_by_node())
    return nodes < 2, (f"this host has {nodes} NUMA node(s); unset, SGLang's init_threads_binding asserts "
                       "TP x PP ranks <= NUMA nodes")


def aiter_unified_needed() -> Probe:
    from sglang.srt.environ import envs

    default = envs.SGLANG_USE_AITER_UNIFIED_ATTN.default
    return not default, f"SGLang's default for SGLANG_USE_AITER_UNIFIED_ATTN: {default!r} (declared default read)"


def device_needed() -> Probe:
    from sglang.srt.utils.common import get_device

    theirs = _sglang_default("device")
    if theirs is not None:
        return theirs != "cpu", f"SGLang's ServerArgs default device: {theirs!r}"
    with _quiet(get_device.__module__):
        resolved = get_device()
    return resolved != "cpu", f"SGLang resolves an unset --device to {resolved!r} itself (get_device, ran it)"

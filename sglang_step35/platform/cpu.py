"""What only GPU-less hosts need: SGLang's CPU engine made runnable, and CPU-safe server defaults.

Process level (every model, every SGLang process: SGLang cannot run on such a host without it),
installed by ``register()`` through :func:`install_cpu_support`:
- the pure-torch ``sgl_kernel`` stand-in (:mod:`sglang_step35.cpu`), importable in this and every
  spawned process (``overlay/`` first on ``sys.path``), and its ``torch.ops.sgl_kernel`` namespace;
- ``SGLANG_USE_CPU_ENGINE=1``;
- gloo-only process groups (:func:`gloo_only_groups`) and the hybrid SWA pool read of torch_native
  (:mod:`sglang_step35.cpu.swa_attention`).

Launch level (Step-3.5 launches only, :func:`cpu_server_defaults`, a step of the launch policy):
device cpu, torch_native attention, a KV budget that fits RAM, sleeping while idle, one core
share per TP x PP rank, and a server dtype the checkpoint's quantization method accepts. :func:`keep_cpu_spec_attention` keeps ``intel_amx`` for MTP on CPU.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

logger = logging.getLogger("sglang_step35")

# KV budget (tokens) when the user gives none on CPU: SGLang would otherwise size the pool from RAM
# (15 GB on a 24 GB machine). Override with --max-total-tokens or this variable.
CPU_KV_TOKENS_ENV = "SGLANG_STEP35_CPU_MAX_TOTAL_TOKENS"
DEFAULT_CPU_KV_TOKENS = 16384
THREADS_BIND_ENV = "SGLANG_CPU_OMP_THREADS_BIND"  # read by SGLang's CPU engine in each TP rank
OVERLAY_DIR = str(Path(__file__).parent.parent / "cpu" / "overlay")
_CPU_ATTN_TARGET = ("sglang.srt.model_executor.model_runner_components.attention_backend_setup."
                    "_build_full_attention_backend_from_str")


def install_cpu_support() -> None:
    """Make SGLang's CPU engine runnable in this process and the ones it spawns (see the module doc)."""
    from sglang_step35.cpu import swa_attention
    from sglang_step35.cpu.standin import install_torch_ops_namespace, make_module

    # Spawned SGLang processes inherit sys.path: the overlay makes `import sgl_kernel` find the
    # stand-in there before the CUDA-only package.
    if OVERLAY_DIR not in sys.path:
        sys.path.insert(0, OVERLAY_DIR)
    existing = sys.modules.get("sgl_kernel")
    if existing is None or not getattr(existing, "IS_SGLANG_STEP35_STANDIN", False):
        sys.modules["sgl_kernel"] = make_module()
    install_torch_ops_namespace()
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.distributed.parallel_state.init_model_parallel_group", gloo_only_groups, HookType.AROUND
    )
    # torch_native reads sliding layers' KV at full-pool slots: translate them (cpu/swa_attention.py).
    HookRegistry.register(_CPU_ATTN_TARGET, swa_attention.build_attention_backend, HookType.AROUND)


def gloo_only_groups(original, *args, **kwargs):
    # SGLang 0.5.23 turns pynccl on for CPU groups too, and PyNcclCommunicator raises "Expected a
    # cuda device, but got: cpu": `--tp 2` could not start on CPU. Gloo alone serves CPU ranks.
    kwargs["use_pynccl"] = False
    return original(*args, **kwargs)


def keep_cpu_spec_attention(original, server_args, fn, *args, **kwargs):
    """EAGLE/MTP on CPU needs SGLang's `intel_amx` attention backend (its draft factory refuses
    torch_native, which also cannot verify); SGLang swaps intel_amx for torch_native on CPUs without
    AMX. Our stand-in implements that backend's ops in pure torch, so keep it for speculative runs."""
    from sglang_step35.platform import current_platform

    if (
        getattr(fn, "__name__", "") == "_attention_backend_platform_fallbacks"
        and not current_platform().has_accelerator
        and getattr(server_args, "speculative_algorithm", None)
        and getattr(server_args, "attention_backend", None) == "intel_amx"
    ):
        return None
    return original(server_args, fn, *args, **kwargs)


def cpu_thread_binding(ranks: int) -> Optional[str]:
    """SGLANG_CPU_OMP_THREADS_BIND value giving each of ``ranks`` ranks an equal share of this
    process's cores (SGLang otherwise asserts one NUMA node per rank, which a laptop does not have)."""
    cores = sorted(os.sched_getaffinity(0))
    if ranks <= 1 or len(cores) < ranks:
        return None
    per = len(cores) // ranks
    return "|".join(",".join(str(c) for c in cores[r * per:(r + 1) * per]) for r in range(ranks))


def cpu_server_defaults(server_args, cfg: Optional[dict] = None) -> None:
    """Fill what the user left unset with values that serve Step-3.5 on a GPU-less machine (a laptop
    or CI runner). Only Step-3.5 launches get them: the process-level CPU support of register() is
    what every model needs to run on such a host, but a KV cap, idle sleeping and core binding are
    choices a user of another model did not ask sglang-step35 to make. ``cfg``: the checkpoint's
    config.json, for a server dtype its quantization method accepts (:func:`cpu_quant_dtype`)."""
    cpu_quant_dtype(server_args, cfg)
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
    binding = cpu_thread_binding(
        int(getattr(server_args, "tp_size", 1) or 1) * int(getattr(server_args, "pp_size", 1) or 1)
    )
    if binding and THREADS_BIND_ENV not in os.environ:
        os.environ[THREADS_BIND_ENV] = binding  # inherited by the spawned TP ranks


def cpu_quant_dtype(server_args, cfg: Optional[dict]) -> None:
    """A server dtype the checkpoint's quantization method accepts. SGLang checks the dtype against
    the method's ``get_supported_act_dtypes()`` before building any model, also on CPU where our class
    dequantizes (model_loader/loader.py ``_get_quantization_config``), and its AWQ config accepts
    float16 only: an AWQ checkpoint (config dtype bfloat16) with no ``--dtype`` failed there with a
    generic message. With ``--dtype`` unset (``auto``) and the config's dtype not accepted, pick
    float16 when the method accepts it; an explicit ``--dtype`` the method does not accept is
    refused here, naming the flag and the fix. The method is ``--quantization`` or the checkpoint's
    ``quant_method``, as SGLang's own registry (``get_quantization_config``) answers for it on this
    host (on a CPU SGLang keeps awq / gptq: its Marlin overrides need CUDA)."""
    import torch

    from sglang_step35.quant import checkpoint_quantization_config

    qc = checkpoint_quantization_config(cfg or {})
    user = getattr(server_args, "quantization", None)
    method = str(user or (qc or {}).get("quant_method") or "").lower()
    if not method:
        return
    from sglang.srt.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    if qc and qc.get("quant_method", "modelopt") == "modelopt":
        # As SGLang's ModelConfig._parse_quant_hf_config: a ModelOpt config's method follows its
        # quant_algo (NVFP4: modelopt_fp4, MIXED_PRECISION: modelopt_mixed); the parser reads no
        # instance state.
        from sglang.srt.configs.model_config import ModelConfig

        qc = {**qc, **(ModelConfig._parse_modelopt_quant_config(None, {"quantization": qc}) or {})}
    if qc:
        # The method SGLang's ModelConfig builds (_verify_quantization): the first registered method
        # whose override claims the checkpoint, e.g. ModelOpt's quant_method "modelopt" with quant_algo
        # NVFP4 is modelopt_fp4 (ModelOptFp8Config.from_config raises on it).
        for cls in QUANTIZATION_METHODS.values():
            override = cls.override_quantization_method(qc, user)
            if override:
                method = str(override).lower()
                break
    if method not in QUANTIZATION_METHODS:
        return  # SGLang refuses an unknown method itself, by name
    # SGLang's loader hands from_config the checkpoint's config plus the class's packed_modules_mapping
    # (weight_utils.get_quant_config); QuarkConfig reads that key in __init__ (KeyError without it).
    supported = get_quantization_config(method).from_config(
        {**(qc or {}), "packed_modules_mapping": {}}).get_supported_act_dtypes()
    names = [str(d).removeprefix("torch.") for d in supported]
    dtype = str(getattr(server_args, "dtype", None) or "auto").lower()
    if dtype == "auto":
        # SGLang's "auto" is the config's dtype (float32 configs are served in float16).
        config_dtype = str((cfg or {}).get("dtype") or (cfg or {}).get("torch_dtype") or "float32")  # SGLang's order
        wanted = "float16" if config_dtype == "float32" else config_dtype
        if wanted not in names and "float16" in names:
            server_args.dtype = "float16"
            logger.info("--dtype float16 for this %s checkpoint (SGLang's %s method accepts %s only)", method,
                        method, ", ".join(names))
        return
    want = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if getattr(torch, want, None) not in supported:
        raise ValueError(
            f"--dtype {dtype}: SGLang's {method} quantization method ({get_quantization_config(method).__name__}) "
            f"accepts {', '.join(names)} only and would refuse to build the model; use --dtype {names[0]}, or "
            "leave --dtype unset (sglang-step35 then picks a dtype the method accepts)")

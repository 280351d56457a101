"""The `sgl_kernel` module object and `torch.ops.sgl_kernel` namespace served on CPU.

Name resolution mirrors what SGLang 0.5.23 expects of the real package:
- ops we implement resolve to our pure-torch functions;
- other CPU-engine ops (`*_cpu`, `weight_packed_linear`, `shm_*`, ...) resolve to a function that
  raises NotImplementedError naming the op, so a code path we have not covered fails loudly at the
  call, not at import;
- every other name raises AttributeError, because SGLang probes `hasattr(torch.ops.sgl_kernel, op)`
  (`register_fake_if_exists`) and must see GPU-only ops as absent. That includes
  `convert_weight_packed`: SGLang enables its AMX weight-packing paths (packed linears, fused CPU
  MoE, AMX norms) only when that op exists, and those have no pure-torch version here, so on an AMX
  CPU SGLang takes its native torch paths instead of failing mid-forward.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

from sglang_step35.cpu.kernel_ops import OPS

_CPU_ENGINE_PREFIXES = ("shm_", "weight_packed_linear")
_CPU_ENGINE_NAMES = {"initialize", "init_cpu_threads_env"}


def _is_cpu_engine_op(name: str) -> bool:
    return name.endswith("_cpu") or name.startswith(_CPU_ENGINE_PREFIXES) or name in _CPU_ENGINE_NAMES


def _not_implemented(name: str) -> Callable:
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel op '{name}' has no pure-torch CPU implementation in sglang-step35; "
            "this SGLang code path is not supported on a GPU-less machine yet"
        )

    op.__name__ = name
    return op


def resolve(name: str) -> Callable:
    if name in OPS:
        return OPS[name]
    if _is_cpu_engine_op(name):
        return _not_implemented(name)
    raise AttributeError(f"sgl_kernel (sglang-step35 CPU stand-in) has no op {name!r}")


class _StandInModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return resolve(name)


class _StandInOpNamespace:
    """Answers `torch.ops.sgl_kernel.<op>` like torch's namespace object would."""

    name = "sgl_kernel"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return resolve(name)


def make_module() -> types.ModuleType:
    mod = _StandInModule("sgl_kernel", "sglang-step35 pure-torch stand-in for sgl_kernel (CPU)")
    mod.__path__ = []  # a package: `import sgl_kernel.x` fails with ModuleNotFoundError, as it should
    mod.__file__ = __file__
    mod.IS_SGLANG_STEP35_STANDIN = True
    return mod


def install_torch_ops_namespace() -> None:
    if not isinstance(getattr(torch.ops, "sgl_kernel", None), _StandInOpNamespace):
        setattr(torch.ops, "sgl_kernel", _StandInOpNamespace())

"""`sgl_kernel` for GPU-less machines: replaces itself with sglang-step35's pure-torch stand-in.

This directory is put on sys.path only by `sglang_step35.plugin.register()` on a machine without a
CUDA/ROCm device, so SGLang's spawned processes (which inherit sys.path) import it before the real,
CUDA-only `sgl_kernel`.
"""

import sys

from sglang_step35.cpu.standin import install_torch_ops_namespace, make_module

sys.modules[__name__] = make_module()
install_torch_ops_namespace()

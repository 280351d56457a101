"""Test support: run SGLang's *GPU* MoE code path on CPU tensors, and check it for host syncs.

What a GPU has that this machine lacks, each replaced by the smallest pure-torch equivalent:
- `moe_align_block_size` (CUDA-only kernel the Triton fused-MoE path calls): :func:`moe_align_block_size`,
  a torch custom op, so the host-sync detector sees one opaque op as it would see the device kernel;
- SGLang's custom ops registered for the CUDA key only (`sglang::inplace_fused_experts`):
  :func:`register_cpu_kernels` registers the same Python bodies for CPU tensors;
- Triton: the interpreter (`TRITON_INTERPRET=1`), see :func:`ensure_interpreted`;
- AITER's weight shuffle: :func:`aiter_shuffle_weight`, AITER's (16, 16) layout as a torch permute.
:class:`HostSyncDetector` fails on the ops that make the host wait for the device (`.item()`,
`.tolist()`, `nonzero`, boolean masks, `unique`), i.e. what breaks CUDA-graph capture.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@torch.library.custom_op(
    "sglang_step35::moe_align_block_size",
    mutates_args=("sorted_token_ids", "experts_ids", "num_tokens_post_pad", "cumsum_buffer"),
)
def moe_align_block_size(
    topk_ids: torch.Tensor,
    num_experts: int,
    block_size: int,
    sorted_token_ids: torch.Tensor,
    experts_ids: torch.Tensor,
    num_tokens_post_pad: torch.Tensor,
    cumsum_buffer: torch.Tensor,
    pad_sorted_token_ids: bool = False,
    ignore_invalid_expert: bool = False,
) -> None:
    """SGLang's +1-offset convention: `num_experts` buckets, id -1 (an expert of another EP rank)
    in bucket 0, expert e in bucket e + 1. Each bucket's flat token indices (in order) are padded to
    a multiple of `block_size` with the value `topk_ids.numel()`; `experts_ids[b]` is the expert of
    block b (-1 for bucket 0); `num_tokens_post_pad[0]` the padded total. With
    `ignore_invalid_expert` bucket 0 is left out. The whole of `sorted_token_ids` is padded whatever
    `pad_sorted_token_ids` says (the Triton kernel reads only the first `num_tokens_post_pad`)."""
    flat = topk_ids.reshape(-1).long() + 1
    numel = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    if ignore_invalid_expert:
        counts[0] = 0
    padded = (counts + block_size - 1) // block_size * block_size
    cumsum_buffer.zero_()
    cumsum_buffer[1 : num_experts + 1] = torch.cumsum(padded, 0).to(cumsum_buffer.dtype)
    sorted_token_ids.fill_(numel)
    experts_ids.fill_(-1)
    order = torch.argsort(flat, stable=True)
    starts = cumsum_buffer[:num_experts].long()
    first_of_bucket = torch.cumsum(counts, 0) - counts
    keep = torch.ones(numel, dtype=torch.bool) if not ignore_invalid_expert else flat[order] != 0
    bucket = flat[order]
    rank_in_bucket = torch.arange(numel) - first_of_bucket[bucket]
    dest = starts[bucket] + rank_in_bucket
    sorted_token_ids[dest[keep]] = order[keep].to(sorted_token_ids.dtype)
    total = int(padded.sum())
    for b in range(num_experts):
        lo, hi = int(starts[b]) // block_size, (int(starts[b]) + int(padded[b])) // block_size
        experts_ids[lo:hi] = b - 1
    num_tokens_post_pad[0] = total


_CPU_LIBS: list = []  # keep the Library objects alive: dropping one unregisters its kernels


def register_cpu_kernels(*wrappers) -> None:
    """SGLang registers its custom ops (e.g. `sglang::inplace_fused_experts`) for the CUDA key only;
    give them the same Python body for CPU tensors so the GPU code path runs here unchanged."""
    for w in wrappers:
        # SGLang hands out either its CustomOpWrapper or, once registered, an eager fast path that
        # wraps the Python body (functools.wraps).
        name = getattr(w, "op_name", None) or w.__name__
        body = getattr(w, "op_func", None) or getattr(w, "__wrapped__", w)
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"sglang::{name}", "CPU"):
            continue
        lib = torch.library.Library("sglang", "IMPL")
        lib.impl(name, body, "CPU")
        _CPU_LIBS.append(lib)


def ensure_interpreted(module_name: str, kernel_name: str) -> None:
    """Triton decides interpreted-vs-compiled when `@triton.jit` runs: re-execute a module imported
    before TRITON_INTERPRET=1 was set. Callers look kernels up by global name, so they see the new one."""
    from triton.runtime.interpreter import InterpretedFunction

    mod = importlib.import_module(module_name)
    if not isinstance(getattr(mod, kernel_name), InterpretedFunction):
        importlib.reload(mod)
    assert isinstance(getattr(mod, kernel_name), InterpretedFunction), f"{module_name}.{kernel_name}"


def aiter_shuffle_weight(x: torch.Tensor, layout=(16, 16)) -> torch.Tensor:
    """AITER's `shuffle_weight(x, (16, 16))` layout (aiter/ops/shuffle.py): 16-row x 32-element tiles
    reordered for its CK kernels. Any kernel reading the result as a plain [E, N, K] matrix computes
    garbage, which is what the AITER test must detect."""
    n_block, k_block = layout[0], layout[1] * 2
    k_pack = 16 // x.element_size()
    v = x.view(-1, x.shape[-2] // n_block, n_block, x.shape[-1] // k_block, k_block // k_pack, k_pack)
    return v.permute(0, 1, 3, 4, 2, 5).contiguous().view(*x.shape)


# aten ops whose result the host must read before it can go on: each one blocks CUDA-graph capture.
HOST_SYNC_OPS = {
    "aten::_local_scalar_dense",  # .item(), .tolist(), int(t), bool(t)
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::repeat_interleave",  # without output_size
}


class HostSyncDetector(TorchDispatchMode):
    """Records host-syncing ops dispatched while active; Triton kernel launches are opaque (on a GPU
    they are one asynchronous launch; under the interpreter their host emulation is not ours)."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if not self._paused:
            bool_index = name == "aten::index" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
            )
            if name in HOST_SYNC_OPS or bool_index:
                self.syncs.append(name + (" (boolean mask)" if bool_index else ""))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


@contextlib.contextmanager
def opaque_triton_launches(detector: HostSyncDetector):
    """Pause `detector` inside every interpreted Triton launch (`kernel[grid](...)`)."""
    from triton.runtime import interpreter

    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        with detector.paused():
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original


class AiterDenseGemm:
    """AITER's dense GEMM (`aiter.tuned_gemm.tgemm.mm(x, w, bias, otype)`: x @ w^T + bias) for the
    linears SGLang sends to it under SGLANG_USE_AITER=1; records the input dtypes it saw."""

    def __init__(self):
        self.input_dtypes: list[torch.dtype] = []

    def mm(self, x, weight, bias=None, otype=None):
        self.input_dtypes.append(x.dtype)
        return torch.nn.functional.linear(x, weight, bias).to(otype or x.dtype)


@contextlib.contextmanager
def interpreted_triton_language():
    """`triton.language.standard` (`tl.cdiv`, `tl.sum`, ...) is itself `@triton.jit` code: imported
    before TRITON_INTERPRET=1 was set, its functions cannot be called by interpreted kernels.
    Re-decorate it in interpreter mode for the duration and put the originals back afterwards."""
    import triton.language as tl
    import triton.language.standard as std
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(std.cdiv, InterpretedFunction):
        yield
        return
    old = dict(vars(std))
    importlib.reload(std)
    swapped = {n: v for n, v in old.items() if getattr(tl, n, None) is v and vars(std).get(n) is not v}
    for n in swapped:
        setattr(tl, n, getattr(std, n))
    try:
        yield
    finally:
        for n, v in swapped.items():
            setattr(tl, n, v)
        vars(std).update(old)

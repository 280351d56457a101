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
import dataclasses
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


def interpreted_kernels(*kernels: tuple[str, str]):
    """Generator for a module-scoped fixture: on a machine without a GPU, TRITON_INTERPRET=1 and each
    (module, kernel) interpreted (:func:`ensure_interpreted`) while the module's tests run, restored
    afterwards; on a GPU, nothing."""
    if torch.cuda.is_available():
        yield
        return
    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    for module_name, kernel_name in kernels:
        ensure_interpreted(module_name, kernel_name)
    yield
    mp.undo()


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
def scoped_device_function_patches():
    """Undo, after each call, what Triton's interpreter patches for a device-function call.

    Triton 3.8's interpreter swaps the builtins (`program_id`, `arange`, tensor methods, ...) of the
    `triton.language` modules a kernel's globals name for interpreter versions around each launch,
    and restores them afterwards (`GridExecutor.__call__`). A `@triton.jit` helper the kernel calls
    (`InterpretedFunction.__call__`) patches the modules *its* globals name the same way and never
    restores them: `tl.cdiv`, which SGLang's fused-MoE kernel calls, lives in
    triton.language.standard, which sees `triton.language.core`, so `core`'s builtins stay
    interpreter versions. Every later compile for a real GPU target in the process then fails at the
    first builtin ("'ir.value' object has no attribute 'dtype'"). The conftest keeps this on for the
    whole session; test_kernels.test_interpreted_helper_call_leaves_triton_language_alone pins it."""
    from triton.runtime import interpreter

    original = interpreter.InterpretedFunction.__call__

    def call(self, *args, **kwargs):
        # Same body as Triton's, with the patch scope restored on the way out; the enclosing
        # launch's own patches (recorded as this scope's originals) stay in place until it ends.
        scope = interpreter._patch_lang(self.fn)
        try:
            fn = self.rewrite()
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                raise interpreter.InterpreterError(repr(e)) from e
        finally:
            scope.restore()

    interpreter.InterpretedFunction.__call__ = call
    try:
        yield
    finally:
        interpreter.InterpretedFunction.__call__ = original


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


# --- FP8 activation quantization on SGLang's CUDA branch -------------------------------------------
# On a GPU, SGLang's Triton fused MoE with block-FP8 weights (`use_fp8_w8a8=True`,
# `block_shape=[128, 128]`) quantizes each GEMM's activations to FP8 per token and 128-group with
# `sglang_per_token_group_quant_fp8` (fused_moe_triton_kernels.invoke_fused_moe_kernel, `_is_cuda`
# branch). That function ends in one of two CUDA-only JIT kernels: a group as wide as the row goes to
# the per-token kernel (`sgl_per_token_quant_fp8`, jit/csrc/gemm/per_token_quant_fp8.cuh), any other
# group size to the group kernel (`per_token_group_quant`, jit/csrc/gemm/per_token_group_quant.cuh).
# The stand-ins below compute what those kernels' sources compute (fp32 scales, flat layout); as torch
# custom ops, the host-sync detector sees each as one opaque op, as it would see the kernel.

FP8_E4M3_MAX = 448.0  # math::FP8_E4M3_MAX / DTypeTrait<fp8_e4m3_t>::kFloatMax


@torch.library.custom_op("sglang_step35::per_token_quant_fp8", mutates_args=("output_q", "output_s"))
def per_token_quant_fp8(input: torch.Tensor, output_q: torch.Tensor, output_s: torch.Tensor) -> None:
    """per_token_quant_fp8.cuh: per row, `scale = amax(|x|) / 448` (no floor) is written to
    `output_s[row, 0]`; `q = e4m3(clamp(x * (1 / scale), -448, 448))`, round to nearest even. An
    all-zero row gives q = 0 (the warp variant's `scale == 0 -> 1/scale = 0` guard; the CTA variant,
    launched for small batches, has none and would give NaN there). Rows of `output_q`/`output_s`
    past `input`'s are left alone."""
    m = input.shape[0]
    x = input.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / FP8_E4M3_MAX
    inv = torch.where(scale == 0, torch.zeros_like(scale), 1.0 / scale)
    output_q[:m].copy_((x * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(output_q.dtype))
    output_s[:m].copy_(scale.view(m, *output_s.shape[1:]))


@torch.library.custom_op("sglang_step35::per_token_group_quant_fp8", mutates_args=("output_q", "output_s"))
def _per_token_group_quant_fp8(
    input: torch.Tensor, output_q: torch.Tensor, output_s: torch.Tensor, group_size: int, eps: float = 1e-10,
    kernel: str = "cuda",
) -> None:
    """Per group of `group_size` columns, `amax = max(amax(|x|), eps)`, as each of SGLang's two
    group quantizers computes it, to the last fp32 operation: "cuda" (per_token_group_quant.cuh)
    `scale = amax * (1 / 448)`, `q = x * (448 / amax)`; "triton" (`_per_token_group_quant_8bit`)
    `scale = amax / 448`, `q = x * (1 / scale)`. Then e4m3, saturated, round to nearest even."""
    x = input.float().unflatten(-1, (-1, group_size))
    amax = x.abs().amax(dim=-1, keepdim=True).clamp_min(eps)
    if kernel == "cuda":
        scale, q = amax * (1.0 / FP8_E4M3_MAX), x * (FP8_E4M3_MAX / amax)
    else:
        scale = amax / FP8_E4M3_MAX
        q = x * (1.0 / scale)
    output_q.copy_(q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).flatten(-2).to(output_q.dtype))
    output_s.copy_(scale.squeeze(-1))  # row- or column-major: copy_ follows output_s's strides


def per_token_group_quant_fp8(
    input: torch.Tensor,
    output_q: torch.Tensor,
    output_s: torch.Tensor,
    group_size: int,
    scale_ue8m0: bool = False,
    fuse_silu_and_mul: bool = False,
    masked_m=None,
    **layout,
) -> None:
    """SGLang's `per_token_group_quant(input, output_q, output_s, group_size, ...)` for FP8 output
    with fp32 scales, flat layout (what the fused MoE's activation quantization asks for):
    per group of `group_size` columns, `amax = max(amax(|x|), 1e-10)`, `scale = amax * (1 / 448)`
    into `output_s[row, group]`, `q = e4m3_satfinite(x * (448 / amax))` (per_token_group_quant.cuh,
    fp32-scale branch). The other layouts (UE8M0 scales, fused SiLU, masked or sorted rows) raise."""
    if scale_ue8m0 or fuse_silu_and_mul or masked_m is not None or layout.get("sorted_token_ids") is not None:
        raise NotImplementedError("stand-in covers the flat fp32-scale layout only")
    if output_q.dtype != torch.float8_e4m3fn or output_s.dtype != torch.float32:
        raise NotImplementedError(
            f"stand-in covers e4m3 output with fp32 scales, got {output_q.dtype}/{output_s.dtype}")
    _per_token_group_quant_fp8(input, output_q, output_s, int(group_size))


@contextlib.contextmanager
def cuda_fp8_activation_quant(sm90: bool = True):
    """Make SGLang's fused MoE quantize FP8 activations as its CUDA branch does, for the duration:
    `_is_cuda` of fused_moe_triton_kernels is True (at call time that module reads it only to pick
    its FP8/INT8 activation quantizers and in `should_enable_swap_ab`, whose `is_sm90_supported()`
    answers `sm90`: True is an H200), and the two CUDA-only kernels are the stand-ins above
    (fp8_kernel imports those names only on CUDA, so they are absent here)."""
    from unittest import mock

    from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels
    from sglang.kernels.ops.quantization import fp8_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(kernels, "_is_cuda", True))
        stack.enter_context(mock.patch.object(kernels, "is_sm90_supported", lambda: sm90))
        for name, stand_in in (("sgl_per_token_quant_fp8", per_token_quant_fp8),
                               ("per_token_group_quant", per_token_group_quant_fp8)):
            stack.enter_context(mock.patch.object(fp8_kernel, name, stand_in, create=True))
        stack.callback(kernels.should_enable_swap_ab.cache_clear)  # lru_cache: answers given under these flags
        kernels.should_enable_swap_ab.cache_clear()  # ... and under the CPU ones before
        yield


# --- FP8 activation quantization on SGLang's non-CUDA (ROCm) branch --------------------------------
# Off CUDA, the fused MoE quantizes with SGLang's Triton kernel `_per_token_group_quant_8bit`
# (fp8_kernel.per_token_group_quant_fp8). Under the Triton 3.8 interpreter that kernel's fp32 -> e4m3
# cast drops the rounding carry into the exponent (126.07 becomes 64, not 128; ~2% of elements),
# which no GPU does (test_fp8_moe_aiter_contract pins the interpreter bug). The stand-in computes the
# kernel's own formula in torch (the "triton" variant of the group stand-in above).


def triton_group_quant_fp8(x: torch.Tensor, group_size: int, eps: float = 1e-10, **layout):
    """`_per_token_group_quant_8bit`'s math for e4m3 output with row-major fp32 scales (what the fused
    MoE asks for): `s = max(amax(|x|), eps) / 448`, `q = e4m3(clamp(x * (1 / s), -448, 448))`,
    round to nearest even. Other layouts raise."""
    if any(layout.get(k) for k in ("column_major_scales", "scale_tma_aligned", "scale_ue8m0")) or layout.get(
        "dtype", torch.float8_e4m3fn
    ) != torch.float8_e4m3fn:
        raise NotImplementedError(f"stand-in covers e4m3 with row-major fp32 scales, got {layout}")
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    s = torch.empty(*x.shape[:-1], x.shape[-1] // group_size, dtype=torch.float32, device=x.device)
    _per_token_group_quant_fp8(x, q, s, int(group_size), float(eps), "triton")
    return q, s


@contextlib.contextmanager
def rocm_fp8_activation_quant():
    """The fused MoE's non-CUDA FP8 activation quantizer is :func:`triton_group_quant_fp8`, for the duration."""
    from unittest import mock

    from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels

    with mock.patch.object(kernels, "per_token_group_quant_fp8", triton_group_quant_fp8):
        yield


ALIGN_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.moe_align_block_size"


def sglang_world_of_one() -> None:
    """register() (as every SGLang process runs it first) and a world-size-1 torch.distributed +
    SGLang model-parallel state, the one in-process layers need. Idempotent. The port is a free one:
    two test runs on one host would collide on a fixed port (SGLang's helper keeps the first
    MASTER_PORT of the process)."""
    from sglang.test.layer_ut_utils import init_single_process_dist

    from sglang_step35.plugin import register
    from sglang_step35.server import free_port

    register()
    init_single_process_dist(master_port=free_port())


@contextlib.contextmanager
def gpu_like_build_state(device: str = "cuda"):
    """World-size-1 SGLang state with SGLang's server args on CPU while our platform probe answers
    `device` (SGLang's own stays CPU): what building our class as on a GPU needs."""
    import pytest

    mp = pytest.MonkeyPatch()
    sglang_world_of_one()
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(device="cpu")
    override.install()
    fake_platform_probe(mp, device)
    try:
        yield mp
    finally:
        override.restore()
        mp.undo()


@contextlib.contextmanager
def sglang_gpu_moe_path(extra_kernels=()):
    """World-size-1 SGLang process state plus what SGLang's GPU MoE path needs on CPU tensors:
    Triton under the interpreter (SGLang's fused-MoE kernel, our router, `extra_kernels` as
    (module, kernel) pairs), the CUDA-only align / fused-experts ops as pure-torch CPU kernels, the
    H200's kernel-config lookup, and our ops dispatching to their CUDA Triton kernels.
    Yields the MonkeyPatch it uses (undone on exit)."""
    import sys

    import pytest

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    sglang_world_of_one()
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args(device="cpu")
    override.install()
    import torch._dynamo

    # SGLang wraps its clamp (`_swiglu_silu_clamp_mul`) in torch.compile; eager is the same math.
    # Set and restored by hand: MonkeyPatch.undo would delete this config entry (it is not a plain
    # attribute), breaking every later torch.compile in the process.
    dynamo_disable = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    language = interpreted_triton_language()
    language.__enter__()
    try:
        # Every kernel of ours (ops.backend_for answers "cuda" below), whichever test imported it first:
        # one decorated before TRITON_INTERPRET=1 would otherwise look for a GPU driver.
        for module, kernel in (("sglang.kernels.ops.moe.fused_moe_triton_kernels", "fused_moe_kernel"),
                               ("kernels_cuda.router", "_sigmoid_topk_kernel"),
                               ("kernels_cuda.swiglu_clamp", "_swiglu_clamp_kernel"),
                               ("kernels_cuda.head_gate", "_head_gate_kernel"), *extra_kernels):
            ensure_interpreted(module, kernel)
        from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe, fused_moe_triton_config

        importlib.import_module(ALIGN_MODULE)
        mp.setattr(sys.modules[ALIGN_MODULE], "sgl_moe_align_block_size", moe_align_block_size, raising=False)
        register_cpu_kernels(fused_moe.inplace_fused_experts, fused_moe.outplace_fused_experts)
        # Kernel-config lookup keys on the GPU name; none here (the default config is used either way).
        mp.setattr(fused_moe_triton_config, "get_device_name", lambda: "NVIDIA H200")
        # Our own ops (router, SwiGLU clamp) take their CUDA Triton kernels, as on a GPU.
        from sglang_step35 import ops

        mp.setattr(ops, "backend_for", lambda t: "cuda")
        yield mp
    finally:
        language.__exit__(None, None, None)
        torch._dynamo.config.disable = dynamo_disable
        override.restore()
        mp.undo()


def fake_platform_probe(mp, device: str = "cuda", aiter: bool = False) -> None:
    """Our one platform probe (`sglang_step35.platform.current_platform`) answers `device` ("cuda":
    an H100, "rocm": an MI300X with SGLang's AITER switch `aiter`, "cpu"); SGLang's own probes stay
    those of this CPU machine."""
    from sglang_step35 import platform

    kind = platform.kind_of(device)
    fake = {"nvidia": platform.for_arch("hopper"), "amd": platform.for_arch("cdna3"), "cpu": platform.Platform("cpu")}[kind]
    mp.setattr(platform, "forced", dataclasses.replace(fake, use_aiter=aiter))


# A fused module of ours (within a decoder layer) -> the checkpoint modules it holds, in shard order
# (the bit-exact load tests read a fused parameter's expected bytes through it).
FUSED_CHECKPOINT_MODULES = {
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "moe.share_expert.gate_up_proj": ["share_expert.gate_proj", "share_expert.up_proj"],
    "moe.share_expert.down_proj": ["share_expert.down_proj"],
    "moe.experts.w13": ["moe.gate_proj", "moe.up_proj"],
    "moe.experts.w2": ["moe.down_proj"],
}


def build_like_sglang(ckpt, draft_idx=None, quantization=None):
    """Our model (or MTP draft step `draft_idx`) built exactly as SGLang's DefaultModelLoader builds
    it from the checkpoint directory (`_get_quantization_config`, `_initialize_model`), in bf16, with
    SGLang's `--quantization quantization`. Returns (model, quant_config)."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import _get_quantization_config, _initialize_model

    kw = dict(dtype="bfloat16", quantization=quantization)
    if draft_idx is None:
        mc, lc = ModelConfig(str(ckpt), **kw), LoadConfig()
    else:
        mc = ModelConfig(str(ckpt), is_draft_model=True, speculative_algorithm="EAGLE", is_multi_layer_eagle=True,
                         **kw)
        lc = LoadConfig(draft_model_idx=draft_idx)
    qc = _get_quantization_config(mc, lc)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return _initialize_model(mc, lc, qc), qc
    finally:
        torch.set_default_dtype(old)


def load_like_sglang(ckpt):
    """:func:`build_like_sglang` with the checkpoint loaded (before `process_weights_after_loading`)."""
    from safetensors.torch import load_file

    model, qc = build_like_sglang(ckpt)
    model.load_weights(load_file(str(ckpt / "model.safetensors")).items())
    return model, qc


def post_load_off_cpu(experts):
    """SGLang's loader step for the experts as on a GPU: fp8.py's module constant `_is_cpu` (the
    only thing sending this machine to its AMX repack) is False for this call only."""
    import pytest
    from sglang.srt.layers.quantization import fp8 as sglang_fp8

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sglang_fp8, "_is_cpu", False)
        experts.quant_method.process_weights_after_loading(experts)


def moe_layers(model):
    """(layer index, Step35MoE) of every MoE layer."""
    return [(i, layer.moe) for i, layer in enumerate(model.model.layers) if layer.is_moe]


def routed_output(moe, x):
    """The routed half of Step35MoE._block as on a GPU: fp32 router, TopK (its CUDA dispatch when
    the caller set `moe.topk._forward_method`), FusedMoE on a copy of `x` (it works in place)."""
    import torch.nn.functional as F

    topk_output = moe.topk(x, F.linear(x.float(), moe.gate.weight.float()))
    return moe.experts(x.clone(), topk_output)


def rel_err(out, ref) -> float:
    """max |out - ref| / max |ref|: the MoE reference tests' error, relative to the output's scale."""
    return float((out.float() - ref).abs().max() / ref.abs().max())


def without_clamp_or_scales(moe, x, scale_names) -> tuple[torch.Tensor, torch.Tensor]:
    """The teeth of a quantized MoE layer's tolerance: its routed output with `gemm1_clamp_limit`
    dropped, and with every weight scale named in `scale_names` set to 1 (each restored after)."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe.experts.moe_runner_config, "gemm1_clamp_limit", None)
        unclamped = routed_output(moe, x)
    with pytest.MonkeyPatch.context() as mp:
        for name in scale_names:
            param = getattr(moe.experts, name)
            mp.setattr(param, "data", torch.ones_like(param))
        unit_scales = routed_output(moe, x)
    return unclamped, unit_scales


def bf16_tokens(hidden: int, n: int, seed: int) -> torch.Tensor:
    """RMS-normed hidden states are O(1) per element: standard normal, in bf16 as served."""
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed)).bfloat16()


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """fp64 q * scale, each scale covering a rows x cols block of q."""
    s = scale.double().repeat_interleave(rows, -2).repeat_interleave(cols, -1)
    return q.double() * s[..., : q.shape[-2], : q.shape[-1]]


def dequantized_routed_weights(raw: dict, block: int = 128) -> dict:
    """Checkpoint tensors in fp32, each FP8 weight times its block scale; shared experts zero (so a
    reference's `moe()` is the routed sum alone)."""
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = dequantize_blocks(t, raw[name + "_scale_inv"], block, block)
        t = t.float()
        out[name] = torch.zeros_like(t) if ".share_expert." in name else t
    return out


# --- checkpoint names of SGLang parameters, for the bit-exact load tests (tests/test_*_load.py) ---------
def main_name(name: str) -> tuple[str, str]:
    """(checkpoint layer prefix, rest) of a Step3p5ForCausalLM parameter name."""
    import re

    m = re.match(r"^(model\.layers\.\d+\.)(.*)$", name)
    return (m.group(1), m.group(2)) if m else ("", name)


def mtp_name(layer: int):
    """The same for Step3p5MTP's parameters when it holds checkpoint layer `layer`."""
    head = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
            "shared_head_norm.weight": "shared_head.norm.weight",
            "shared_head_head.weight": "shared_head.output.weight"}

    def f(name: str) -> tuple[str, str]:
        if name == "embed_tokens.weight":
            return "model.", name
        if name.startswith("layer."):
            return f"model.layers.{layer}.", name[len("layer."):]
        return f"model.layers.{layer}.", head[name]
    return f

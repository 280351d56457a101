"""Shared plumbing of `make gpu-check-here` (bench/gpu_check_here.py): the carried SGLang bundle,
SGLang's kernel modules with our pure-torch stand-ins, timing, and the result records.

Why a bundle: the borrowed GPU machine has torch/triton/transformers but no SGLang and no package
registry. `scripts/prepare_gpu_bundle.py` packs SGLang 0.5.23's pure-Python sources (a zip) and the
few pure-Python/manylinux wheels its kernel modules import (orjson, pydantic, pyzmq, ...) into
build/gpu-bundle, which travels with the tree; :func:`activate_bundle` unpacks them under /tmp and
puts them on sys.path. Where SGLang is installed (our .venv) it is used as it is.

Why SGLang's non-CUDA glue on a GPU: on CUDA, SGLang's fused-MoE module imports its glue ops
(`moe_align_block_size`, `silu_and_mul`, `moe_sum_reduce`, the FP8 activation quantizers) from
`sgl_kernel` and JIT-compiled CUDA (tvm_ffi), none of which can travel. :func:`sglang_kernels`
imports SGLang's modules with SGLang's CUDA probe answering False (`torch.version.cuda` hidden for
the import only), so they bind their portable glue (torch SiLU-and-mul, Triton sum/FP8 quant), and
the one op that has no portable version, `moe_align_block_size`, is our pure-torch stand-in
(:func:`moe_align_block_size`, no host sync, so it can be captured in a CUDA graph). SGLang's
Triton kernels themselves (fused_moe_kernel, decode/extend attention) are the ones that run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import socket
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: sglang_step35, kernels_cuda
    sys.path.insert(0, str(ROOT))

BUNDLE_DIR = ROOT / "build" / "gpu-bundle"
SGLANG_ZIP = "sglang-src.zip"
WHEELS = "wheels"
CONFIG = ROOT / "sglang_step35" / "data" / "step3p5_flash_config.json"


class CannotRun(Exception):
    """A step (or part) that cannot run here, for a reason outside it; the message says why."""


# --- the carried bundle -------------------------------------------------------------------------------
def _sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


def activate_bundle(mode: str = "auto", bundle: Path = BUNDLE_DIR) -> dict:
    """Make `import sglang` work. mode "auto": an installed SGLang wins, else the bundle; "require":
    the bundle even where SGLang is installed (the emulation); "off": installed only.
    Returns where SGLang came from. Raises CannotRun naming the missing piece."""
    if mode not in ("auto", "require", "off"):
        raise ValueError(f"bundle mode {mode!r}: use auto, require or off")
    if mode != "require" and _sglang_installed():
        return {"sglang_from": "installed"}
    if mode == "off":
        raise CannotRun("SGLang is not installed and --bundle off was given")
    src = bundle / SGLANG_ZIP
    if not src.is_file():
        raise CannotRun(f"{src} missing: run `make gpu-bundle` (scripts/prepare_gpu_bundle.py) first")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    target = Path(os.environ.get("GPU_BUNDLE_CACHE", tempfile.gettempdir())) / f"gpu-bundle-{digest}"
    done = target / ".unpacked"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(src) as z:
            z.extractall(target)
        # Wheels are zip files laid out as site-packages: unpacking is installing (no pip there).
        for whl in sorted((bundle / WHEELS).glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(target)
        for so in target.rglob("*.so*"):  # zipfile drops the exec bit; the loader does not need it
            so.chmod(0o755)
        done.write_text(digest)
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return {"sglang_from": f"bundle ({src.name}, sha256 {digest}, unpacked in {target})"}


def load_contract():
    """tests/gpu_contract.py (the FP8 quantizer stand-ins, CPU kernel registration, interpreter
    helpers), loaded by path so tests/ does not go on sys.path."""
    if "gpu_contract" in sys.modules:
        return sys.modules["gpu_contract"]
    spec = importlib.util.spec_from_file_location("gpu_contract", ROOT / "tests" / "gpu_contract.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_contract"] = mod
    spec.loader.exec_module(mod)
    return mod


# --- stand-in for sgl_kernel's moe_align_block_size ----------------------------------------------------
def moe_align_block_size(topk_ids, num_buckets: int, block_size: int, sorted_token_ids, experts_ids,
                         num_tokens_post_pad, cumsum_buffer, pad_sorted_token_ids: bool = False,
                         ignore_invalid_expert: bool = False) -> None:
    """sgl_kernel's `moe_align_block_size` (SGLang's +1 convention: bucket 0 holds the -1 ids of
    other EP ranks, expert e is bucket e + 1), in device-side torch ops only: no `.item()`,
    `nonzero` or Python loop over experts, so it runs inside a captured CUDA graph. Each bucket's
    flat slot indices (stable order) padded to a multiple of `block_size` with `topk_ids.numel()`;
    `experts_ids[b]` the expert of block b (-1 for bucket 0 and past the end); `num_tokens_post_pad[0]`
    the padded total. tests/test_gpu_check_here.py checks it against tests/gpu_contract.py's."""
    import torch

    del pad_sorted_token_ids  # the whole buffer is padded either way
    dev = topk_ids.device
    flat = topk_ids.reshape(-1).long() + 1
    numel = flat.numel()
    counts = torch.zeros(num_buckets, dtype=torch.long, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    used = counts * (torch.arange(num_buckets, device=dev) > 0) if ignore_invalid_expert else counts
    padded = (used + block_size - 1) // block_size * block_size
    ends = torch.cumsum(padded, 0)
    cumsum_buffer.zero_()
    cumsum_buffer[1: num_buckets + 1].copy_(ends)
    order = torch.sort(flat, stable=True).indices
    bucket = flat[order]
    first = torch.cumsum(counts, 0) - counts  # first position of each bucket in `order`
    dest = (ends - padded)[bucket] + torch.arange(numel, device=dev) - first[bucket]
    cap = sorted_token_ids.numel()
    if ignore_invalid_expert:
        dest = torch.where(bucket > 0, dest, cap)  # dropped slots land in the spare element
    buf = torch.full((cap + 1,), numel, dtype=sorted_token_ids.dtype, device=dev)
    buf.scatter_(0, dest, order.to(buf.dtype))
    sorted_token_ids.copy_(buf[:cap])
    starts = torch.arange(experts_ids.numel(), device=dev) * block_size
    b = torch.searchsorted(ends, starts, right=True)
    experts_ids.copy_(torch.where(starts < ends[-1], b - 1, -1).to(experts_ids.dtype))
    num_tokens_post_pad[:1].copy_(ends[-1:].to(num_tokens_post_pad.dtype))


# --- SGLang's kernel modules ---------------------------------------------------------------------------
FUSED_MOE = "sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe"
ALIGN = "sglang.srt.layers.moe.moe_runner.triton_utils.moe_align_block_size"
MOE_KERNELS = "sglang.kernels.ops.moe.fused_moe_triton_kernels"
DECODE = "sglang.kernels.ops.attention.decode_attention"
EXTEND = "sglang.kernels.ops.attention.extend_attention"
INTERPRETED = [(MOE_KERNELS, "fused_moe_kernel"), ("kernels_cuda.router", "_sigmoid_topk_kernel"),
               ("kernels_cuda.head_gate", "_head_gate_kernel"), ("kernels_cuda.swiglu_clamp", "_swiglu_clamp_kernel"),
               (DECODE, "_fwd_kernel_stage1"), (DECODE, "_fwd_grouped_kernel_stage1"), (DECODE, "_fwd_kernel_stage2"),
               (EXTEND, "_fwd_kernel")]


@contextlib.contextmanager
def _cuda_probe_hidden():
    """SGLang's `is_cuda()` is `torch.cuda.is_available() and torch.version.cuda is not None`,
    read into module constants at import: hide the CUDA version for the import only."""
    import torch

    saved = torch.version.cuda
    torch.version.cuda = None
    try:
        yield
    finally:
        torch.version.cuda = saved


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_world_of_one() -> None:
    """World-size-1 process group and SGLang's model-parallel groups (its layers read them even at
    TP 1): what sglang.test.layer_ut_utils.init_single_process_dist does, written out because that
    module imports sglang.test.test_utils -> sglang.benchmark -> `datasets`, absent on the image."""
    import torch

    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)
    # A port of our own: a MASTER_PORT inherited from a parent (a test runner with its own world of
    # one) is already taken by that parent.
    os.environ["MASTER_PORT"] = str(_free_port())
    from sglang.srt.distributed import parallel_state
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs

    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    if not parallel_state.model_parallel_is_initialized():
        # sglang.test.test_utils.publish_build_topology: publish a TP/EP/PP-1 topology, keep WORLD.
        reset_context()
        publish(ServerArgs(model_path="dummy", tp_size=1, ep_size=1, pp_size=1), role="test",
                ranks=SpawnRanks(world_rank=0))
        if parallel_state._WORLD is not None:
            get_parallel().override_permanently(world_group=parallel_state._WORLD)
        parallel_state.initialize_model_parallel(backend="gloo")


@contextlib.contextmanager
def sglang_kernels(device: str):
    """World-size-1 SGLang process state and SGLang's Triton kernel modules imported with portable
    glue (see the module docstring); on CPU, the Triton interpreter and the CPU registrations the
    contract tests use. Yields a namespace dict of the modules."""
    import torch

    contract = load_contract()
    interpret = device == "cpu"
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    stack = contextlib.ExitStack()
    with stack:
        with _cuda_probe_hidden():
            from sglang.srt.runtime_context import get_context

            mods = {n: importlib.import_module(n) for n in (FUSED_MOE, ALIGN, MOE_KERNELS, DECODE, EXTEND)}
            import sglang.kernels.ops.quantization.fp8_kernel as fp8_kernel
            from sglang.srt.layers.moe.moe_runner import MoeRunnerConfig
            from sglang.srt.layers.moe.topk import StandardTopKOutput
        init_world_of_one()
        override = get_context().override_server_args(device=device)
        override.install()
        stack.callback(override.restore)
        if interpret:
            import torch._dynamo

            # SGLang's clamp (`_swiglu_silu_clamp_mul`) is torch.compile'd; inductor on CPU would
            # compile C++ for minutes. Eager is the same math. (On a GPU it stays compiled.)
            saved = torch._dynamo.config.disable
            torch._dynamo.config.disable = True
            stack.callback(setattr, torch._dynamo.config, "disable", saved)
            stack.enter_context(contract.interpreted_triton_language())
            stack.enter_context(contract.scoped_device_function_patches())
            for module, kernel in INTERPRETED:
                contract.ensure_interpreted(module, kernel)
            mods = {n: importlib.import_module(n) for n in mods}
            contract.register_cpu_kernels(mods[FUSED_MOE].inplace_fused_experts, mods[FUSED_MOE].outplace_fused_experts)
            # The interpreter's fp32 -> e4m3 cast drops rounding carries (gpu_contract pins it); the
            # stand-in computes SGLang's Triton group quantizer's formula in torch. GPUs keep the kernel.
            stack.enter_context(contract.rocm_fp8_activation_quant())
        align = mods[ALIGN]
        saved_align = getattr(align, "sgl_moe_align_block_size", None)
        align.sgl_moe_align_block_size = moe_align_block_size
        stack.callback(setattr, align, "sgl_moe_align_block_size", saved_align)
        # Kernel-config lookup keys on the GPU's name (a JSON per GPU); off a GPU, the H200's.
        cfg_mod = importlib.import_module("sglang.srt.layers.moe.moe_runner.triton_utils.fused_moe_triton_config")
        if not torch.cuda.is_available():
            saved_name = cfg_mod.get_device_name
            cfg_mod.get_device_name = lambda: "NVIDIA H200"
            stack.callback(setattr, cfg_mod, "get_device_name", saved_name)
        yield {"fused_moe": mods[FUSED_MOE].fused_moe, "MoeRunnerConfig": MoeRunnerConfig,
               "StandardTopKOutput": StandardTopKOutput, "decode": mods[DECODE], "extend": mods[EXTEND],
               "moe_kernels": mods[MOE_KERNELS], "fp8_kernel": fp8_kernel, "contract": contract}


# --- timing --------------------------------------------------------------------------------------------
CAPTURE_FAILED = "eager (CUDA-graph capture failed"


def capture(fn: Callable, device: str):
    """(run, how): a CUDA graph of `fn` (warmed up on a side stream first) on a GPU, else `fn`.
    Capture failing (a host sync, an allocation outside the pool) is reported, not hidden: how says."""
    import torch

    if device != "cuda":
        return fn, "eager (no GPU)"  # no warm-up: under the interpreter each call costs seconds
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
    except Exception as e:  # noqa: BLE001 - reported (gpu_check_here turns it into a failed check)
        torch.cuda.synchronize()
        return fn, f"{CAPTURE_FAILED}: {type(e).__name__}: {str(e)[:300]})"
    return g.replay, "cuda graph"


def median_seconds(run: Callable, device: str, reps: int) -> float:
    """Median seconds per call: CUDA events on a GPU, wall clock elsewhere."""
    import torch

    samples = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            samples.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            run()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a device copy (read + write) of a buffer larger than any cache."""
    import torch

    n = (1 << 30) if device == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = median_seconds(lambda: dst.copy_(src), device, 20 if device == "cuda" else 3)
    return 2 * n / t


def act_dtype(device: str):
    """bf16 on a GPU, as served; fp32 on CPU, where the Triton interpreter (numpy) has no bf16 and
    SGLang's attention/MoE kernels return garbage for bf16 inputs."""
    import torch

    return torch.bfloat16 if device == "cuda" else torch.float32


def reps(device: str) -> int:
    """Timed repetitions: enough for a median on a GPU; one on CPU (a plumbing check, not a figure)."""
    return 50 if device == "cuda" else 1


def max_rel_err(got, ref) -> float:
    """max |got - ref| / max |ref| in fp32 (0 when both are zero)."""
    got, ref = got.float(), ref.float()
    denom = ref.abs().max().clamp_min(1e-30)
    return float((got - ref).abs().max() / denom)


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()

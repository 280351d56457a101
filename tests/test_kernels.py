"""Step-3.5 ops: torch references against hand-computed values, and the Triton kernels (NVIDIA and
ROCm launch configs) against the references.

Without a GPU the kernels run on CPU tensors in Triton's interpreter: the module fixture sets
``TRITON_INTERPRET=1`` (only for this module) before the kernel modules are (re)imported, because
Triton decides interpreted-vs-compiled when ``@triton.jit`` runs. With a CUDA/ROCm GPU the same
tests run the compiled kernels on the device. Shapes are small (the interpreter is slow) except one
Step-3.5-Flash-sized router case (E=288, top-8) and one 64x128-head gate row.

Tolerances: fp32 outputs 1e-5 abs/rel (kernel and reference do the same fp32 math; only
exp/sigmoid rounding differs). bf16 outputs: both sides round the same fp32 value to bf16, so they
may differ by one bf16 ulp at most: rtol 1/128 (2^-7) and a small atol for values near zero.
Router ids must match exactly (same tie-break), weights 1e-6.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
import torch.nn.functional as F

from kernels_cuda._common import LaunchConfig
from gpu_contract import interpreted_kernels
from kernels_rocm import aiter_glue
from sglang_step35 import ops

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
GPU_IMPL = ("rocm" if torch.version.hip else "cuda") if ON_GPU else None

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-3, rtol=2**-7)}


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    """Interpreter mode for this module when there is no GPU; restored afterwards."""
    yield from interpreted_kernels(("kernels_cuda.swiglu_clamp", "_swiglu_clamp_kernel"),
                                   ("kernels_cuda.head_gate", "_head_gate_kernel"),
                                   ("kernels_cuda.router", "_sigmoid_topk_kernel"))


def kernel_impls():
    # Both launch-config families run the shared kernel bodies; on a GPU only the native one can.
    return [GPU_IMPL] if ON_GPU else ["cuda", "rocm"]


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- reference math against hand-computed values --------------------------------------------------
def test_swiglu_ref_clamps_silu_from_above_and_up_both_sides():
    gate = [0.0, 10.0, -10.0, 2.0, 3.0]
    up = [1.0, 20.0, 3.0, -30.0, 0.5]
    gu = torch.tensor([gate + up], dtype=torch.float64).float()
    out = ops.swiglu_clamp_ref(gu, 7.0)
    expected = [
        0.0,
        7.0 * 7.0,  # silu(10)=9.9995 -> 7, up 20 -> 7
        _silu(-10.0) * 3.0,  # negative silu is NOT clamped from below
        _silu(2.0) * -7.0,  # up -30 -> -7
        _silu(3.0) * 0.5,  # inside the limit: untouched
    ]
    torch.testing.assert_close(out[0], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert out[0, 2] < 0  # proves no lower clamp on act


@pytest.mark.parametrize("limit", [0, 0.0, None])
def test_swiglu_ref_without_limit_is_plain_swiglu(limit):
    gu = torch.tensor([[10.0, -3.0, 20.0, -40.0]])
    out = ops.swiglu_clamp_ref(gu, limit)
    torch.testing.assert_close(out[0], torch.tensor([_silu(10.0) * 20.0, _silu(-3.0) * -40.0]))


def test_swiglu_ref_is_not_gpt_oss_swiglu():
    torch.manual_seed(0)
    gu = torch.randn(4, 16) * 3
    gate, up = gu.chunk(2, -1)
    g = gate.clamp(max=7.0)
    gpt_oss = g * torch.sigmoid(1.702 * g) * (up.clamp(-7.0, 7.0) + 1)
    assert not torch.allclose(ops.swiglu_clamp_ref(gu, 7.0), gpt_oss, atol=1e-2)


def test_swiglu_ref_keeps_dtype_and_computes_in_fp32():
    gu = (torch.randn(3, 8) * 4).bfloat16()
    out = ops.swiglu_clamp_ref(gu, 7.0)
    assert out.dtype == torch.bfloat16
    gate, up = gu.float().chunk(2, -1)
    torch.testing.assert_close(out, (F.silu(gate).clamp(max=7) * up.clamp(-7, 7)).bfloat16(), atol=0, rtol=0)


def test_head_gate_ref_scales_each_head_by_its_sigmoid():
    x = torch.arange(1.0, 13.0).reshape(2, 6)  # T=2, H=2, D=3
    g = torch.tensor([[0.0, 2.0], [-1.0, float("-inf")]])
    out = ops.head_gate_ref(x, g, 2)
    expected = torch.tensor(
        [
            [1 * 0.5, 2 * 0.5, 3 * 0.5, 4 * _sig(2), 5 * _sig(2), 6 * _sig(2)],
            [7 * _sig(-1), 8 * _sig(-1), 9 * _sig(-1), 0.0, 0.0, 0.0],
        ]
    )
    torch.testing.assert_close(out, expected)


def test_router_ref_bias_changes_selection_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    s = [_sig(v) for v in (2.0, 1.0, 0.0, -1.0)]
    w, ids = ops.sigmoid_topk_route_ref(logits, None, 2, 2.5)
    assert ids.tolist() == [[0, 1]] and ids.dtype == torch.int32 and w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[s[0], s[1]]]) / (s[0] + s[1]) * 2.5)

    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # expert 3 now wins selection...
    w, ids = ops.sigmoid_topk_route_ref(logits, bias, 2, 2.5)
    assert ids.tolist() == [[3, 0]]
    # ...but is weighted by its unbiased score sigmoid(-1), not sigmoid(-1) + 5.
    torch.testing.assert_close(w, torch.tensor([[s[3], s[0]]]) / (s[3] + s[0]) * 2.5)


def test_router_ref_without_renormalize_scales_raw_scores():
    logits = torch.tensor([[0.5, -0.5, 3.0]])
    w, ids = ops.sigmoid_topk_route_ref(logits, None, 2, 3.0, renormalize=False)
    assert ids.tolist() == [[2, 0]]
    torch.testing.assert_close(w, torch.tensor([[_sig(3.0) * 3.0, _sig(0.5) * 3.0]]))


def test_router_ref_ties_go_to_lowest_index():
    logits = torch.zeros(2, 8)
    logits[1, 5] = logits[1, 6] = 1.0
    _, ids = ops.sigmoid_topk_route_ref(logits, None, 3, 1.0)
    assert ids.tolist() == [[0, 1, 2], [5, 6, 0]]
    # a bias that exactly cancels a score difference is a tie too
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    bias = torch.tensor([0.0, 0.25, 0.25, 0.0])
    _, ids = ops.sigmoid_topk_route_ref(logits, bias, 2, 1.0)
    assert ids.tolist() == [[1, 2]]


def test_arg_validation():
    with pytest.raises(ValueError, match="float32"):
        ops.sigmoid_topk_route_ref(torch.zeros(2, 8, dtype=torch.bfloat16), None, 2, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        ops.sigmoid_topk_route_ref(torch.zeros(2, 8), None, 9, 1.0)
    with pytest.raises(ValueError, match="bias"):
        ops.sigmoid_topk_route_ref(torch.zeros(2, 8), torch.zeros(7), 2, 1.0)
    with pytest.raises(ValueError, match="2I"):
        ops.swiglu_clamp_ref(torch.zeros(2, 7), 7.0)
    with pytest.raises(ValueError, match="limit"):
        ops.swiglu_clamp_ref(torch.zeros(2, 8), -1.0)
    with pytest.raises(ValueError, match="num_heads"):
        ops.head_gate_ref(torch.zeros(2, 10), torch.zeros(2, 3), 3)


def test_dispatch_uses_torch_on_cpu_tensors_and_rejects_unknown_impl():
    x = torch.randn(2, 8)
    assert ops.backend_for(x) == "torch"
    torch.testing.assert_close(ops.swiglu_clamp(x, 1.0), ops.swiglu_clamp_ref(x, 1.0), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown impl"):
        ops.swiglu_clamp(x, 1.0, impl="metal")


# --- Triton kernels vs references -----------------------------------------------------------------
@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,inter", [(1, 1280), (7, 37), (300, 48), (33, 257)])
@pytest.mark.parametrize("limit", [0.0, 7.0])
def test_swiglu_clamp_kernel_matches_reference(impl, dtype, tokens, inter, limit):
    torch.manual_seed(tokens * 1000 + inter)
    gu = (torch.randn(tokens, 2 * inter, device=DEVICE) * 6).to(dtype)
    out = ops.swiglu_clamp(gu, limit, impl=impl)
    ref = ops.swiglu_clamp_ref(gu, limit)
    assert out.dtype == dtype and out.shape == (tokens, inter)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if limit:
        # The inputs must actually hit the clamp, otherwise this case proves nothing about it.
        assert not torch.allclose(ref.float(), ops.swiglu_clamp_ref(gu, 0.0).float())


@pytest.mark.parametrize("impl", kernel_impls())
def test_swiglu_clamp_kernel_row_strided_view_and_empty(impl):
    torch.manual_seed(1)
    big = torch.randn(9, 2 * 40 + 6, device=DEVICE) * 6
    gu = big[:, : 2 * 40]  # row stride 86, as a slice of a wider buffer would be
    torch.testing.assert_close(ops.swiglu_clamp(gu, 7.0, impl=impl), ops.swiglu_clamp_ref(gu, 7.0), **TOL[torch.float32])
    empty = ops.swiglu_clamp(torch.empty(0, 10, device=DEVICE), 7.0, impl=impl)
    assert empty.shape == (0, 5)


@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 64, 128), (5, 3, 7), (130, 4, 16)])
def test_head_gate_kernel_matches_reference(impl, dtype, tokens, heads, head_dim):
    torch.manual_seed(tokens + heads)
    x = torch.randn(tokens, heads * head_dim, device=DEVICE).to(dtype)
    # gate logits sliced out of a wider projection output (row-strided), like a merged qkvg GEMM
    g_full = torch.randn(tokens, heads + 5, device=DEVICE).to(dtype) * 3
    g = g_full[:, 2 : 2 + heads]
    out = ops.head_gate(x, g, heads, impl=impl)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ops.head_gate_ref(x, g, heads), **TOL[dtype])


@pytest.mark.parametrize("impl", kernel_impls())
@pytest.mark.parametrize(
    "tokens,experts,top_k,renorm,with_bias",
    [
        (1, 288, 8, True, True),
        (37, 288, 8, True, True),
        (5, 8, 2, True, True),
        (300, 8, 2, True, False),
        (6, 8, 2, False, True),
        (3, 13, 5, True, True),
    ],
)
def test_router_kernel_matches_reference(impl, tokens, experts, top_k, renorm, with_bias):
    torch.manual_seed(tokens * experts)
    logits = torch.randn(tokens, experts, device=DEVICE) * 2
    bias = torch.randn(experts, device=DEVICE) * 0.5 if with_bias else None
    w, ids = ops.sigmoid_topk_route(logits, bias, top_k, 2.5, renorm, impl=impl)
    w_ref, ids_ref = ops.sigmoid_topk_route_ref(logits, bias, top_k, 2.5, renorm)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == (tokens, top_k)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
    if with_bias:
        # the bias must matter for this case to test selection-by-biased-score
        _, ids_nobias = ops.sigmoid_topk_route_ref(logits, None, top_k, 2.5, renorm)
        assert not torch.equal(ids_nobias, ids_ref)


@pytest.mark.parametrize("impl", kernel_impls())
def test_router_kernel_tie_break_matches_reference(impl):
    # Integer logits over 288 experts produce many exact ties; both sides must take lowest index.
    torch.manual_seed(3)
    logits = torch.randint(-2, 3, (6, 288), device=DEVICE).float()
    bias = torch.zeros(288, device=DEVICE)
    bias[100:110] = 0.5
    w, ids = ops.sigmoid_topk_route(logits, bias, 8, 1.0, impl=impl)
    w_ref, ids_ref = ops.sigmoid_topk_route_ref(logits, bias, 8, 1.0)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6)
    zeros = torch.zeros(2, 8, device=DEVICE)
    assert ops.sigmoid_topk_route(zeros, None, 2, 1.0, impl=impl)[1].tolist() == [[0, 1], [0, 1]]


# --- launch configs and ROCm glue -------------------------------------------------------------------
def test_launch_config_rejects_non_power_of_two_tiles():
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(block_t=3, block_n=64, num_warps=4, num_stages=1)
    with pytest.raises(ValueError):
        LaunchConfig(block_t=1, block_n=64, num_warps=0, num_stages=1)


@pytest.mark.parametrize("tokens", [1, 64, 8192])
def test_configs_cover_step35_sizes(tokens):
    from kernels_cuda.head_gate import nvidia_config as hg_nv
    from kernels_cuda.router import nvidia_config as rt_nv
    from kernels_cuda.swiglu_clamp import nvidia_config as sw_nv
    from kernels_rocm import configs as amd

    for nv, rocm, n in ((sw_nv, amd.swiglu_clamp_config, 1280), (hg_nv, amd.head_gate_config, 12288), (rt_nv, amd.router_config, 288)):
        a, b = nv(tokens, n), rocm(tokens, n)
        # 64-lane wavefronts: an AMD launch never needs more warps than the NVIDIA one for a tile.
        assert b.num_warps <= a.num_warps
        assert "waves_per_eu" in b.extra and "waves_per_eu" not in a.extra
    assert rt_nv(tokens, 288).block_n >= 288 and amd.router_config(tokens, 288).block_n >= 288


def test_router_rejects_config_too_narrow_for_experts():
    from kernels_cuda.router import sigmoid_topk_route

    with pytest.raises(ValueError, match="block_n"):
        sigmoid_topk_route(torch.zeros(1, 288, device=DEVICE), None, 8, 1.0, config=LaunchConfig(1, 256, 4, 1))


def test_probe_aiter_reports_capabilities():
    import enum
    import types

    fake = types.SimpleNamespace(__version__="0.1.5", ActivationType=enum.Enum("ActivationType", "Silu Gelu Swiglu"))
    modules = {"aiter": fake, "aiter.fused_moe": object()}

    def importer(name):
        if name not in modules:
            raise ImportError(name)
        return modules[name]

    caps = aiter_glue.probe_aiter(importer)
    assert caps.available and caps.fused_moe and not caps.unified_attention
    assert caps.moe_activations == ("Silu", "Gelu", "Swiglu")
    assert caps.clamped_swiglu is False  # even with an activation named Swiglu (that is gpt-oss's)
    assert "Triton" in caps.summary() and "0.1.5" in caps.summary()

    missing = aiter_glue.probe_aiter(lambda name: (_ for _ in ()).throw(ModuleNotFoundError("No module named 'aiter'")))
    assert not missing.available and "ModuleNotFoundError" in missing.import_error
    assert "all Step-3.5 MoE layers use Triton" in missing.summary()



# --- compiled mode: AOT-compile every kernel with the shipped configs for real GPU targets ---------
# The interpreter does not exercise Triton's compiler at all, so without these a kernel or launch
# option (waves_per_eu, a reduction form) that only breaks in compiled mode would pass CI on CPU.
# Triton ships ptxas/cuobjdump and the AMDGPU linker, so this needs no GPU. Register spills are
# checked too: the router keeps a 512-wide expert row in registers and would spill with bad tiles.
_TARGETS = [("cuda", 90, 32), ("cuda", 100, 32), ("cuda", 120, 32), ("hip", "gfx942", 64), ("hip", "gfx950", 64)]

_SIGNATURES = {
    "swiglu": {
        "gu_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32", "inter": "i32", "stride_gu_t": "i32",
        "stride_out_t": "i32", "limit": "fp32", "HAS_LIMIT": "constexpr", "BLOCK_T": "constexpr",
        "BLOCK_I": "constexpr",
    },
    "head_gate": {
        "x_ptr": "*bf16", "g_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32", "N": "i32", "stride_x_t": "i32",
        "stride_g_t": "i32", "stride_out_t": "i32", "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr",
        "BLOCK_N": "constexpr",
    },
    "router": {
        "logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32", "ids_ptr": "*i32", "T": "i32", "E": "i32",
        "stride_l_t": "i32", "stride_w_t": "i32", "stride_i_t": "i32", "scaling_factor": "fp32",
        "TOP_K": "constexpr", "BLOCK_K": "constexpr", "RENORMALIZE": "constexpr", "BLOCK_T": "constexpr",
        "BLOCK_E": "constexpr",
    },
}


def _kernel_and_configs(name, backend, tokens):
    from kernels_rocm import configs as amd

    if name == "swiglu":
        mod = importlib.import_module("kernels_cuda.swiglu_clamp")
        cfg = mod.nvidia_config(tokens, 1280) if backend == "cuda" else amd.swiglu_clamp_config(tokens, 1280)
        return mod._swiglu_clamp_kernel, cfg, {"HAS_LIMIT": True, "BLOCK_T": cfg.block_t, "BLOCK_I": cfg.block_n}
    if name == "head_gate":
        mod = importlib.import_module("kernels_cuda.head_gate")
        cfg = mod.nvidia_config(tokens, 96 * 128) if backend == "cuda" else amd.head_gate_config(tokens, 96 * 128)
        return mod._head_gate_kernel, cfg, {"HEAD_DIM": 128, "BLOCK_T": cfg.block_t, "BLOCK_N": cfg.block_n}
    mod = importlib.import_module("kernels_cuda.router")
    cfg = mod.nvidia_config(tokens, 288) if backend == "cuda" else amd.router_config(tokens, 288)
    consts = {"TOP_K": 8, "BLOCK_K": 8, "RENORMALIZE": True, "BLOCK_T": cfg.block_t, "BLOCK_E": cfg.block_n}
    return mod._sigmoid_topk_kernel, cfg, consts


def _nvidia_spill_bytes(cubin: bytes) -> int | None:
    import re
    import shutil
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(triton.__path__[0], "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    # ptxas accounts register spills as per-thread STACK (LOCAL is for explicit local arrays).
    return int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))


@pytest.mark.parametrize("target", _TARGETS, ids=lambda t: f"{t[0]}-{t[1]}")
@pytest.mark.parametrize("name", ["swiglu", "head_gate", "router"])
def test_kernels_compile_for_gpu_targets_without_spills(target, name):
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    backend, arch, warp = target
    if {"cuda": "nvidia", "hip": "amd"}[backend] not in triton.backends.backends:
        pytest.skip(f"this triton build has no {backend} backend")
    for tokens in (1, 8192):
        kernel, cfg, consts = _kernel_and_configs(name, backend, tokens)
        # Under the interpreter the module attribute is an InterpretedFunction; compile the raw fn.
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        src = ASTSource(fn, _SIGNATURES[name], constexprs=consts)
        opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **cfg.extra}
        compiled = triton.compile(src, target=GPUTarget(backend, arch, warp), options=opts)
        assert compiled.metadata.num_warps == cfg.num_warps
        if backend == "cuda":
            local = _nvidia_spill_bytes(compiled.asm["cubin"])
            assert local in (None, 0), f"{name} T={tokens} sm{arch}: {local} bytes of stack/local memory (spills)"
        else:
            spills = re.search(r"\.vgpr_spill_count:\s+(\d+)", compiled.asm["amdgcn"])
            assert spills is not None and int(spills.group(1)) == 0, f"{name} T={tokens} {arch}: VGPR spills"
            assert compiled.metadata.waves_per_eu == cfg.extra["waves_per_eu"]


# A device function in a module that sees `triton.language.core` but not `triton.language` (like
# triton.language.standard's `tl.cdiv`, which SGLang's fused-MoE kernel calls), and a kernel that
# sees only `triton.language`.
_HELPER_SOURCE = """
import triton
from triton.language import core


@triton.jit
def twice(x):
    return x * 2
"""
_KERNEL_SOURCE = """
import triton
import triton.language as tl

from nested_jit_helper import twice


@triton.jit
def nested_kernel(out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, twice(offs))
"""


@pytest.mark.skipif(ON_GPU, reason="interpreter behaviour; a GPU runs compiled kernels")
def test_interpreted_helper_call_leaves_triton_language_alone(tmp_path, monkeypatch):
    """A kernel that calls a `@triton.jit` helper from another module, run in the interpreter,
    leaves triton.language's builtins as they were. Triton 3.8 alone leaves `triton.language.core`
    patched after the helper call (InterpretedFunction.__call__ patches the helper's modules and
    never restores them); the conftest's gpu_contract.scoped_device_function_patches undoes it.
    Without that, every later GPU-target compile in the process (the spill test above, after
    SGLang's fused MoE ran interpreted) fails at `tl.arange`."""
    import importlib.util
    import sys

    import triton.language as tl

    def builtins():
        names = ("program_id", "arange", "load", "store", "mul", "add")
        return {f"core.{n}": getattr(tl.core, n) for n in names} | {
            f"tensor.{n}": getattr(tl.tensor, n) for n in ("__mul__", "__add__", "to")
        }

    before = builtins()
    for name, source in (("nested_jit_helper", _HELPER_SOURCE), ("nested_jit_kernel", _KERNEL_SOURCE)):
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
    out = torch.zeros(8, dtype=torch.int32)
    mod.nested_kernel[(1,)](out, N=8)
    assert out.tolist() == [2 * i for i in range(8)]  # it ran, helper included
    changed = [n for n, v in builtins().items() if v is not before[n]]
    assert not changed, f"triton.language left patched after an interpreted helper call: {changed}"

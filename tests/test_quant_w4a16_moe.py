"""W4A16 routed experts on SGLang 0.5.23's Triton fused MoE (`fused_experts(use_int4_w4a16=True)`), on CPU.

What a GPU runs for Step-3.5's INT4 experts where we serve them:
- AWQ / GPTQ checkpoints with ``--quantization moe_wna16``: SGLang's ``MoeWNA16Method`` (its weight
  loader converts AWQ's interleaved / GPTQ's K-packed int32 into uint8 [N, K/2] and GPTQ's "minus one"
  zero points back; symmetric GPTQ has no zero tensor: the kernel subtracts 8), Triton runner;
- compressed-tensors W4A16 with ``--moe-runner-backend triton``: ``CompressedTensorsWNA16TritonMoE``
  (int32 [K/8, N] transposed to uint8 [N, K/2] after loading, no zero points), symmetric groups of
  128 or 32 (SGLang raises for other variants under the Triton runner).
Both hand the Triton runner ``TritonMoeQuantInfo(use_int4_w4a16=True, block_shape=[0, group])``; Step's
clamp reaches it as ``gemm1_clamp_limit`` (SGLang's ``_swiglu_silu_clamp_mul``).

Here: one ``FusedMoE`` per format, built by SGLang with the real quantization config (the CUDA
capability AWQ asks for answered as an H100's, during construction only; the method chosen through
our ``moe.runner.clamp_honouring_method`` where the model would ask it), our tiny-writer tensors
(``sglang_step35.quant.w4a16``, per expert, checkpoint names) loaded through SGLang's own expert
mapping and weight loader, SGLang's post-load step, then ``forward`` on the CUDA dispatch with the
Triton kernels under TRITON_INTERPRET=1 (tests/gpu_contract.py stand-ins). Oracle:
``sglang_step35.reference.routed_experts`` in fp32 on the weights our Dequantizer (the CPU path)
returns. Tolerance: 3e-2 of max |reference| (measured 1.0-1.6e-2: the kernel dequantizes to bf16
and keeps bf16 activations between the GEMMs, and the interpreter truncates fp32 -> bf16 where a GPU
rounds; group 32: 1.0-1.6e-2). Teeth: the unclamped reference on the clamped layer (measured 28x max
|ref|, ~900x the tolerance), the kernel with every scale 1 (4e4 of max |ref|), and group-32 scales
read per 128 inputs (0.50).
"""

from __future__ import annotations

import pytest
import torch

import gpu_contract
from sglang_step35.quant import w4a16
from sglang_step35.reference import routed_experts

E, TOP_K, H, INTER = 4, 2, 128, 256  # hidden: one group of 128; expert width: two groups (down's K)
LIMIT = 0.5  # Step-3.5-Flash's layers 43-44 clamp at 7; with these weights 0.5 clips
REL_TOL = 3e-2
# autoround-awq: AutoRound's AWQ packing with `backend: awq`, whose experts SGLang's AutoRoundConfig builds
# with MoeWNA16's method (served.py's autoround-awq-nomarlin row) from AWQ's tensors.
FORMATS = ["gptq", "awq", "w4a16", "w4a16-g32", "autoround-awq"]
# compressed-tensors W4A16 with groups of 32 (the other group size SGLang's Triton W4A16 MoE takes,
# compressed_tensors.py: _is_wna16_triton_moe_supported): scales per 32 inputs, block_shape [0, 32].
GROUP = {"w4a16-g32": 32}


@pytest.fixture(scope="module")
def triton_path():
    """World-size-1 SGLang state with SGLang's GPU MoE path on CPU tensors (Triton interpreted), and
    the interpreter's `tl.dot` fixed for bf16 operands (see :func:`_bf16_dot`)."""
    with gpu_contract.sglang_gpu_moe_path() as mp:
        gpu_contract.fake_platform_probe(mp, "cuda")
        _bf16_dot(mp)
        yield mp


_ORIGINAL_DOT: list = []


def _bf16_dot(mp: pytest.MonkeyPatch) -> None:
    """Triton 3.8's interpreter keeps bf16 values as their uint16 bit patterns and its `create_dot`
    multiplies those patterns as integers (it widens only 8-bit floats): any bf16 `tl.dot` returns
    garbage (~1e10 for ones; test_interpreter_bf16_dot_bug pins it). The int4 kernel dequantizes its
    weights to the activations' dtype (bf16, as served) before its `tl.dot`, so here bf16 operands are
    widened to fp32 first, which is what a GPU's bf16 MMA with fp32 accumulation computes."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter.InterpreterBuilder.create_dot
    _ORIGINAL_DOT[:] = [original]

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar == tl.bfloat16:
                return interpreter.TensorHandle(
                    interpreter._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)
            return h
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    mp.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _bf16_experts(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: (torch.randn(E, *shape, generator=g) * 0.08).bfloat16()
            for p, shape in (("gate_proj", (INTER, H)), ("up_proj", (INTER, H)), ("down_proj", (H, INTER)))}


def _checkpoint(fmt: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-expert checkpoint tensors `experts.E.proj.part` in `fmt`, and the stacked fp32 weights our
    Dequantizer reads back from them."""
    group = GROUP.get(fmt, 128)
    write = {"w4a16": w4a16.ct_tensors, "gptq": w4a16.gptq_tensors, "awq": w4a16.awq_tensors}[_ct(fmt)]
    tensors = {f"experts.{e}.{p}.{part}": v for p, w in _bf16_experts(seed).items() for e in range(E)
               for part, v in write(w[e].float(), group).items()}
    deq = w4a16.Dequantizer(_qc(fmt))
    flat = dict(kv for k, t in tensors.items() for kv in deq.feed(k, t))
    assert not deq.problems()
    stacked = {p: torch.stack([flat[f"experts.{e}.{p}.weight"] for e in range(E)]) for p in ("gate_proj", "up_proj", "down_proj")}
    return tensors, stacked


def _ct(fmt: str) -> str:
    """The checkpoint format of a case ("w4a16-g32" is compressed-tensors W4A16 too, "autoround-awq" AWQ's tensors)."""
    return "w4a16" if fmt.startswith("w4a16") else {"autoround-awq": "awq"}.get(fmt, fmt)


def _qc(fmt: str) -> dict:
    return w4a16.quantization_config(_ct(fmt), group=GROUP.get(fmt, 128))


def _sglang_config(fmt: str):
    qc = _qc(fmt)
    if fmt == "autoround-awq":
        from sglang.srt.layers.quantization.auto_round import AutoRoundConfig

        from sglang_step35.quant import autoround

        arc = dict(autoround.quantization_config({"num_hidden_layers": 5}, name=fmt), backend="awq", extra_config={})
        return AutoRoundConfig.from_config(arc)
    if _ct(fmt) == "w4a16":
        from sglang.srt.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig

        return CompressedTensorsConfig.from_config(qc)
    from sglang.srt.layers.quantization import moe_wna16

    # MoeWNA16Config asks the CUDA capability for AWQ (>= 7.5): an H100's, during construction only.
    with pytest.MonkeyPatch.context() as cap:
        cap.setattr(moe_wna16, "get_device_capability", lambda *a, **k: (9, 0))
        return moe_wna16.MoeWNA16Config.from_config(qc)


def _fused_moe(config, runner, limit=None, quant_method=None):
    """SGLang's FusedMoE of the test's shape for `config`, built under `--moe-runner-backend runner`."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.runtime_context import get_flags

    moe_flags = get_flags().moe
    saved = moe_flags.runner_backend
    moe_flags.runner_backend = runner
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return FusedMoE(num_experts=E, hidden_size=H, intermediate_size=INTER, layer_id=4, top_k=TOP_K,
                        params_dtype=torch.bfloat16, quant_config=config, prefix="model.layers.4.moe.experts",
                        gemm1_clamp_limit=limit, quant_method=quant_method)
    finally:
        torch.set_default_dtype(old)
        moe_flags.runner_backend = saved


def _build(fmt: str, limit, tensors: dict[str, torch.Tensor]):
    """SGLang's FusedMoE for `fmt` with `tensors` loaded by its own loader, post-processed, CUDA dispatch."""
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    from sglang_step35.moe.runner import clamp_honouring_method

    from sglang.srt.layers.quantization import auto_round, moe_wna16

    config = _sglang_config(fmt)
    # compressed-tensors picks its Triton method only under --moe-runner-backend triton (Marlin otherwise).
    runner = MoeRunnerBackend.TRITON if _ct(fmt) == "w4a16" else MoeRunnerBackend.AUTO
    with pytest.MonkeyPatch.context() as gpu:
        # AutoRoundConfig picks its method while FusedMoE is built: as on an H100 (not its AMX CPU path;
        # the MoeWNA16Config it makes asks the capability for AWQ).
        gpu.setattr(auto_round, "_is_cpu", False)
        gpu.setattr(moe_wna16, "get_device_capability", lambda *a, **k: (9, 0))
        layer = _fused_moe(config, runner, limit, clamp_honouring_method(config) if fmt in ("gptq", "awq") else None)
    if fmt == "autoround-awq":
        assert type(layer.quant_method).__name__ == "MoeWNA16Method" and layer.quant_method.quant_config.has_zp
    params = dict(layer.named_parameters())
    loaded = set()
    for name, t in tensors.items():
        for param_prefix, weight_name, expert_id, shard_id in FusedMoE.make_expert_params_mapping(
                "gate_proj", "down_proj", "up_proj", E):
            if name.startswith(weight_name):
                pname = param_prefix.removeprefix("experts.") + name[len(weight_name):]
                if pname not in params:  # e.g. GPTQ's symmetric qzeros: MoeWNA16 keeps no zero tensor
                    assert fmt == "gptq" and pname.endswith("qzeros"), pname
                    break
                params[pname].weight_loader(params[pname], t, pname, shard_id=shard_id, expert_id=expert_id)
                loaded.add(pname)
                break
        else:
            raise AssertionError(f"{name}: no expert mapping")
    layer.quant_method.process_weights_after_loading(layer)
    if hasattr(layer.quant_method, "forward_cuda"):  # a CustomOp method: its CUDA dispatch, as on a GPU
        layer.quant_method._forward_method = layer.quant_method.forward_cuda
    return layer, loaded


def _run(layer, x, ids, weights):
    from sglang.srt.layers.moe.topk import StandardTopKOutput

    return layer(x.clone(), StandardTopKOutput(weights.float(), ids.to(torch.int32), torch.zeros(x.shape[0], E)))


def _routing(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(n)])
    w = torch.rand(n, TOP_K, generator=g) + 0.1
    return ids, w / w.sum(-1, keepdim=True)


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("fmt", FORMATS)
def test_int4_experts_on_sglangs_triton_path_match_the_reference(triton_path, fmt):
    tensors, ref_w = _checkpoint(fmt)
    x = gpu_contract.bf16_tokens(H, 5, seed=1) * 3.0  # large enough that LIMIT clips on the clamped layer
    ids, weights = _routing(5, seed=2)
    ref = {lim: routed_experts(x.float(), ref_w["gate_proj"], ref_w["up_proj"], ref_w["down_proj"], ids, weights, lim)
           for lim in (0.0, LIMIT)}
    for limit in (None, LIMIT):
        layer, loaded = _build(fmt, limit, tensors)
        qinfo = layer.quant_method.get_triton_quant_info(layer)
        assert qinfo.use_int4_w4a16 and qinfo.block_shape == [0, GROUP.get(fmt, 128)]
        assert layer.moe_runner_config.gemm1_clamp_limit == limit
        want = ref[limit or 0.0]
        out = _run(layer, x, ids, weights)
        assert out.dtype == torch.bfloat16 and out.shape == x.shape
        err = _rel(out, want)
        assert err < REL_TOL, f"{fmt}, limit {limit}: {err:.4f} of max |ref|"
        if limit:
            # Teeth: the unclamped reference is far outside the tolerance on this input.
            assert _rel(ref[0.0], want) > 10 * REL_TOL
        # Decode: one token.
        one = _run(layer, x[:1], ids[:1], weights[:1])
        assert _rel(one, want[:1]) < REL_TOL


def test_scales_matter(triton_path):
    """Teeth for the scales: SGLang's kernel with every scale set to 1 is nowhere near the reference on
    the dequantized weights, so matching it means the group scales were loaded and applied."""
    tensors, ref_w = _checkpoint("gptq", seed=5)
    layer, _ = _build("gptq", None, tensors)
    x = gpu_contract.bf16_tokens(H, 4, seed=3)
    ids, weights = _routing(4, seed=4)
    want = routed_experts(x.float(), ref_w["gate_proj"], ref_w["up_proj"], ref_w["down_proj"], ids, weights)
    assert _rel(_run(layer, x, ids, weights), want) < REL_TOL
    layer.w13_scales.data.fill_(1.0)
    layer.w2_scales.data.fill_(1.0)
    assert _rel(_run(layer, x, ids, weights), want) > 10 * REL_TOL


@pytest.mark.parametrize("variant", [{"symmetric": False}, {"actorder": "group"}, {"actorder": "weight"}])
def test_sglangs_triton_w4a16_moe_takes_symmetric_unordered_groups_only(triton_path, variant):
    """Why asymmetric and act-order compressed-tensors W4A16 stay refused on GPUs (served.py): under
    --moe-runner-backend triton on CUDA, SGLang 0.5.23's get_moe_scheme raises for them
    (compressed_tensors.py: _is_wna16_triton_moe_supported), and its auto runner is Marlin; on ROCm it
    picks CompressedTensorsWNA16TritonMoE for every W4A16 checkpoint without that check, and that
    method hands the Triton kernel no zero points (it subtracts 8 from every code) and sorts no g_idx
    (its post-load step only transposes), so those checkpoints would compute other weights there."""
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.layers.quantization.compressed_tensors import compressed_tensors as ct
    from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16TritonMoE

    qc = w4a16.quantization_config("w4a16")
    qc["config_groups"]["group_0"]["weights"].update(variant)
    config = ct.CompressedTensorsConfig.from_config(qc)
    with pytest.raises(ValueError, match="only supports symmetric INT4 group quantization"):
        _fused_moe(config, MoeRunnerBackend.TRITON, LIMIT)
    with pytest.MonkeyPatch.context() as rocm:
        rocm.setattr(ct, "_is_hip", True)
        layer = _fused_moe(config, MoeRunnerBackend.AUTO, LIMIT)
    assert type(layer.scheme) is CompressedTensorsWNA16TritonMoE
    assert hasattr(layer, "w13_weight_zero_point") == ("symmetric" in variant)  # built, then never used
    layer.quant_method.process_weights_after_loading(layer)
    info = layer.quant_method.get_triton_quant_info(layer)
    assert info.w13_zp is None and info.w2_zp is None


def test_group_32_scales_are_read_per_32_inputs(triton_path):
    """Teeth for group 32: the same layer with its scales read per 128 inputs (the served group-128
    cell's block_shape) is far from the reference, so the group-32 case above matching it means
    SGLang's kernel applied a scale per 32 inputs (the random weights give each 32-group its own)."""
    tensors, ref_w = _checkpoint("w4a16-g32", seed=6)
    layer, _ = _build("w4a16-g32", LIMIT, tensors)
    x = gpu_contract.bf16_tokens(H, 4, seed=7) * 3.0
    ids, weights = _routing(4, seed=8)
    want = routed_experts(x.float(), ref_w["gate_proj"], ref_w["up_proj"], ref_w["down_proj"], ids, weights, LIMIT)
    assert _rel(_run(layer, x, ids, weights), want) < REL_TOL
    layer.scheme.group_size = 128  # block_shape [0, 128] over the same group-32 scales
    assert _rel(_run(layer, x, ids, weights), want) > 10 * REL_TOL  # measured 0.50


def test_interpreter_bf16_dot_bug(triton_path):
    """Pins why :func:`_bf16_dot` exists: without it the interpreter's bf16 `tl.dot` of ones is not
    their sum (when a Triton upgrade fixes it, the stand-in can go); with it, it is."""
    import triton
    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, out_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :]).to(tl.float32).to(tl.bfloat16)  # cast, as the int4 kernel does
        tl.store(out_ptr + r[:, None] * N + r[None, :], tl.dot(a, b, acc=tl.zeros((N, N), dtype=tl.float32)))

    ones = torch.ones(16, 16, dtype=torch.bfloat16)
    out = torch.zeros(16, 16)
    dot_kernel[(1,)](ones, ones, out, 16)
    assert torch.equal(out, torch.full((16, 16), 16.0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interpreter.InterpreterBuilder, "create_dot", _ORIGINAL_DOT[0])
        dot_kernel[(1,)](ones, ones, out, 16)
    assert out.max() > 1e6

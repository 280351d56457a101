"""Block-FP8 routed experts on SGLang 0.5.23's ROCm path with SGLANG_USE_AITER=1, on CPU.

What an MI300X / MI355X runs for an FP8 checkpoint: SGLang's Fp8MoEMethod picks the AITER runner for
every layer (`create_moe_runner`: `_is_hip and _use_aiter`), and after loading shuffles the FP8
weights into AITER's (16, 16) layout when the runner is AITER (`process_weights_after_loading_block_quant`).
AITER's FP8 MoE hands AITER `swiglu_limit`, never `gemm1_clamp_limit` (`maybe_get_hip_aiter_quant_info`),
so a clamped layer served there drops Step's clamp. Our clamped layers get ClampHonouringFp8MoEMethod
(sglang_step35/moe/runner.py): the Triton runner, after which SGLang's own code skips the shuffle for
that layer and `apply` takes its Triton branch (block scales, `gemm1_clamp_limit`).

Here that path runs on CPU: fp8.py's module constants say ROCm with AITER (`_is_hip`, `_use_aiter`;
`_is_cpu` False), AITER's shuffle is the layout stand-in of tests/gpu_contract.py, our platform probe
answers "rocm" with AITER on; the model is built by SGLang's loader functions with its real Fp8Config;
the Triton fused MoE runs under TRITON_INTERPRET=1; the activations are quantized by the formula of
SGLang's non-CUDA quantizer (its Triton `_per_token_group_quant_8bit`, what ROCm runs) in torch,
because the interpreter's own fp32 -> e4m3 cast of that kernel is wrong (pinned below; the stand-in
in tests/gpu_contract.py). `_is_fp8_fnuz` stays False, as on gfx950 (MI355X); gfx942 (MI300X) also
converts the weights to e4m3fnuz before the same decision, not run here.

Checks: the unclamped layers take AITER's runner and are shuffled (SGLang's real AITER branch ran);
the clamped layer takes Triton, keeps the checkpoint's FP8 bytes and block scales, gives the runner
both scales and the clamp, matches the plain-PyTorch reference on the dequantized weights within the
CUDA test's REL_TOL (test_fp8_moe_gpu_contract: FP8 activation quantization), and has no host sync.
Teeth: SGLang's own Fp8MoEMethod on the same layer takes AITER and shuffles; the clamped layer run
without the clamp, or on the shuffled weights, is far from the reference.
"""

from __future__ import annotations

import gpu_contract
import pytest
import torch
from reference import Step35Reference
from safetensors.torch import load_file

from sglang_step35.tiny import FP8_TINY_SPEC, write_tiny_checkpoint

FP8 = torch.float8_e4m3fn
REL_TOL = 0.15  # as test_fp8_moe_gpu_contract.REL_TOL; measured here 0.077 (5 tokens), 0.064 (1 token)
CLAMPED, UNCLAMPED = 4, (2, 3)  # the FP8 tiny's MoE layers; 4 carries swiglu_limits[4] > 0


@pytest.fixture(scope="module")
def rocm_aiter_path():
    """World-size-1 SGLang state; SGLang's fp8 module and our probe both see ROCm with AITER."""
    with gpu_contract.sglang_gpu_moe_path() as mp:  # first: register() installs the CPU sgl_kernel
        from sglang.srt.layers.quantization import fp8 as sglang_fp8

        gpu_contract.fake_platform_probe(mp, "rocm", aiter=True)
        mp.setattr(sglang_fp8, "_is_hip", True)
        mp.setattr(sglang_fp8, "_use_aiter", True)
        mp.setattr(sglang_fp8, "_is_cpu", False)
        mp.setattr(sglang_fp8, "shuffle_weight", gpu_contract.aiter_shuffle_weight, raising=False)
        with gpu_contract.rocm_fp8_activation_quant():
            yield


@pytest.fixture(scope="module")
def aiter_case(rocm_aiter_path, tmp_path_factory):
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("fp8-aiter"), seed=5, fp8=True, spec=FP8_TINY_SPEC)
    raw = load_file(str(ckpt / "model.safetensors"))
    model, _ = gpu_contract.load_like_sglang(ckpt)
    moes = dict(gpu_contract.moe_layers(model))
    assert sorted(moes) == sorted((CLAMPED, *UNCLAMPED))
    for moe in moes.values():
        moe.experts.quant_method.process_weights_after_loading(moe.experts)  # what SGLang's loader runs
        moe.topk._forward_method = moe.topk.forward_cuda  # SGLang's CustomOp dispatch on ROCm
    deq = gpu_contract.dequantized_routed_weights(raw)
    return dict(ckpt=ckpt, raw=raw, model=model, moes=moes, cfg=model.config,
                ref=Step35Reference(ckpt, weights=deq),
                x5=gpu_contract.bf16_tokens(FP8_TINY_SPEC.hidden_size, 5, seed=11),
                x1=gpu_contract.bf16_tokens(FP8_TINY_SPEC.hidden_size, 1, seed=12))


def _bits(t):
    return t.view(torch.uint8)


def _w13(raw, i):
    p = f"model.layers.{i}.moe."
    return torch.cat([raw[p + "gate_proj.weight"], raw[p + "up_proj.weight"]], 1)


def _rel_err(out, ref) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def test_unclamped_layers_take_aiter_and_its_layout(aiter_case):
    """SGLang's own decisions for the unclamped layers: Fp8MoEMethod, AITER runner, weights shuffled
    into AITER's layout (the bytes are a permutation of the checkpoint's, not the checkpoint's)."""
    from sglang.srt.layers.moe import MoeRunnerBackend
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    for i in UNCLAMPED:
        e = aiter_case["moes"][i].experts
        assert type(e.quant_method) is Fp8MoEMethod
        assert e.quant_method.runner.runner_backend is MoeRunnerBackend.AITER
        w13 = _w13(aiter_case["raw"], i)
        assert not torch.equal(_bits(e.w13_weight), _bits(w13))
        assert torch.equal(_bits(e.w13_weight).flatten().sort().values, _bits(w13).flatten().sort().values)


def test_clamped_layer_stays_on_triton_with_block_scales_and_clamp(aiter_case):
    """The clamped layer: our Fp8MoEMethod subclass, Triton runner (TopK bound to it), the
    checkpoint's FP8 bytes and block scales unshuffled, and a Triton quant info with both scales
    and the clamp."""
    from sglang.srt.layers.moe import MoeRunnerBackend

    from sglang_step35.moe.runner import ClampHonouringFp8MoEMethod

    moe, raw, cfg = aiter_case["moes"][CLAMPED], aiter_case["raw"], aiter_case["cfg"]
    e, qm = moe.experts, moe.experts.quant_method
    assert type(qm) is ClampHonouringFp8MoEMethod
    assert qm.runner.runner_backend is MoeRunnerBackend.TRITON and e.runner_backend is MoeRunnerBackend.TRITON
    assert e.w13_weight.dtype == FP8 and torch.equal(_bits(e.w13_weight), _bits(_w13(raw, CLAMPED)))
    p = f"model.layers.{CLAMPED}.moe."
    assert torch.equal(_bits(e.w2_weight), _bits(raw[p + "down_proj.weight"]))
    assert torch.equal(e.w2_weight_scale_inv, raw[p + "down_proj.weight_scale_inv"])
    info = qm.get_triton_quant_info(e)
    assert info.use_fp8_w8a8 and info.block_shape == [128, 128]
    assert info.w13_scale is e.w13_weight_scale_inv and info.w2_scale is e.w2_weight_scale_inv
    assert e.moe_runner_config.gemm1_clamp_limit == cfg.swiglu_limits[CLAMPED] > 0


def test_clamped_layer_matches_the_reference(aiter_case):
    """Prefill (5 tokens) and decode (1 token) through the clamped layer's Triton FP8 path equal the
    fp32 reference on the dequantized weights within REL_TOL; no host sync at decode size."""
    moe, ref = aiter_case["moes"][CLAMPED], aiter_case["ref"]
    for x in (aiter_case["x5"], aiter_case["x1"]):
        out = gpu_contract.routed_output(moe, x)
        assert out.dtype == torch.bfloat16
        err = _rel_err(out, ref.moe(CLAMPED, x.float()))
        assert err < REL_TOL, f"{x.shape[0]} tokens: {err:.3f}"
    det = gpu_contract.HostSyncDetector()
    with gpu_contract.opaque_triton_launches(det), det:
        gpu_contract.routed_output(moe, aiter_case["x1"])
    assert det.syncs == [], sorted(set(det.syncs))


def test_without_our_method_the_clamped_layer_would_be_lost(aiter_case, monkeypatch):
    """Teeth. SGLang's own Fp8MoEMethod, given the clamped layer, picks AITER (whose FP8 MoE drops
    the clamp); the layer run without the clamp, or on AITER-shuffled weights, is far from the
    reference."""
    from sglang.srt.layers.moe import MoeRunnerBackend
    from sglang.srt.layers.quantization.fp8 import Fp8MoEMethod

    moe, ref, x = aiter_case["moes"][CLAMPED], aiter_case["ref"], aiter_case["x5"]
    e = moe.experts
    plain = Fp8MoEMethod(e.quant_method.quant_config)
    plain.create_moe_runner(e, e.moe_runner_config)
    assert plain.runner.runner_backend is MoeRunnerBackend.AITER
    want = ref.moe(CLAMPED, x.float())
    monkeypatch.setattr(e.moe_runner_config, "gemm1_clamp_limit", None)
    assert _rel_err(gpu_contract.routed_output(moe, x), want) > 10 * REL_TOL
    monkeypatch.undo()
    for name in ("w13_weight", "w2_weight"):
        param = getattr(e, name)
        monkeypatch.setattr(param, "data", gpu_contract.aiter_shuffle_weight(param.data))
    assert _rel_err(gpu_contract.routed_output(moe, x), want) > 10 * REL_TOL
    monkeypatch.undo()
    assert _rel_err(gpu_contract.routed_output(moe, x), want) < REL_TOL  # restored


def test_stand_in_is_the_kernels_formula_where_the_interpreter_cast_is_wrong(rocm_aiter_path):
    """Why the ROCm activation quantizer is a stand-in here: SGLang's Triton kernel, interpreted, gives
    the stand-in's scales exactly and its bytes except where the Triton 3.8 interpreter's fp32 -> e4m3
    cast is wrong: rounding that carries into the exponent is dropped (a value rounding up to 2^k
    becomes 2^(k-1)), and exact ties round away from zero instead of to even. Both are the
    interpreter's (a GPU rounds to nearest even), not the kernel's. When this test fails on a newer
    Triton, the interpreted kernel can be used as it is."""
    from sglang.kernels.ops.quantization import fp8_kernel

    gpu_contract.ensure_interpreted(fp8_kernel.__name__, "_per_token_group_quant_8bit")
    x = gpu_contract.bf16_tokens(256, 7, seed=3)
    q, s = fp8_kernel._per_token_group_quant_8bit_raw(x, 128)
    q_ref, s_ref = gpu_contract.triton_group_quant_fp8(x, 128)
    assert torch.equal(s, s_ref)
    wrong = _bits(q) != _bits(q_ref)
    got, want = q.float()[wrong], q_ref.float()[wrong]
    scaled = (x.float() * (1.0 / s_ref.repeat_interleave(128, -1)))[wrong]
    carry_dropped = (got * 2 == want) & (want.abs().log2() == want.abs().log2().round())
    tie_away = (got.abs() > want.abs()) & (scaled.abs() * 2 == got.abs() + want.abs())
    assert carry_dropped.any(), "the interpreter's e4m3 cast keeps the carry now: drop rocm_fp8_activation_quant"
    assert (carry_dropped | tie_away).all(), torch.stack([scaled, got, want]).T[~(carry_dropped | tie_away)]

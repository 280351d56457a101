"""W8A8-INT8 routed experts on SGLang 0.5.23's GPU path (W8A8Int8MoEMethod -> Triton fused MoE), on CPU.

What a GPU runs for our INT8 MoE layers: SGLang's `W8A8Int8Config` gives FusedMoE its
`W8A8Int8MoEMethod`, whose runner is always Triton (it has no AITER/DeepGEMM path, so the
SwiGLU-clamped layers 43-44 stay on it under SGLANG_USE_AITER too: moe/runner.py
`clamp_honouring_method` leaves SGLang's method in place); `process_weights_after_loading` keeps the
INT8 weights and fp32 per-channel scales as loaded (off AMX); `apply` hands the runner
`TritonMoeQuantInfo(use_int8_w8a8=True, per_channel_quant=True)`; the fused MoE quantizes each
GEMM's input to INT8 per token (`per_token_quant_int8`, a Triton kernel) and runs `fused_moe_kernel`
on INT8 x INT8 with the token and channel scales; Step's clamp is SGLang's
`_swiglu_silu_clamp_mul(gemm1_limit)` between the GEMMs.

Here: the INT8 tiny checkpoint (SGLang's `w8a8_int8` layout) built and loaded as SGLang's loader does
(platform faked as CUDA for our runner policy), the Triton kernels under TRITON_INTERPRET=1, against
the fp32 reference (sglang_step35.reference) on the dequantized weights, shared expert zeroed so
`moe()` is the routed sum. Tolerance REL_TOL of the output's scale: INT8 activations move each GEMM
input by up to 1/254 of its row's max, twice (see the test for the measured error). Teeth: the
clamped layer without its clamp, or with every weight scale 1, is far outside it.

Not verified here (needs a GPU): compiled Triton on SM90/MI300, sgl_kernel's CUDA `int8_scaled_mm`
for the dense INT8 linears (attention, shared expert; run dequantized on CPU), real widths and TP/EP.
"""

from __future__ import annotations

import json

import gpu_contract
import pytest
import torch
import torch.nn.functional as F
from reference import Step35Reference
from safetensors.torch import load_file

from sglang_step35.tiny import write_tiny_checkpoint

REL_TOL = 0.05  # of max |reference output|; see test_int8_layers_match_the_reference_on_dequantized_weights


def per_token_quant_int8(x: torch.Tensor, scale_dtype=torch.float32, cal_sum=False):
    """SGLang's `_per_token_quant_int8` (int8_kernel.py) in torch: per row `absmax = max(amax(|x|),
    1e-10)`, `scale = absmax / 127`, `q = round(x * (127 / absmax))` rounded half away from zero
    (CUDA's `__nv_roundf`, which the kernel calls through `tl.extra.cuda.libdevice.round`: that
    extern cannot run under Triton's interpreter, hence this stand-in, checked below)."""
    assert not cal_sum
    xf = x.float()
    absmax = xf.abs().amax(-1, keepdim=True).clamp(min=1e-10)
    y = xf * (127 / absmax)
    q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8)
    return q, (absmax / 127).to(scale_dtype)


@pytest.fixture(scope="module")
def int8_cuda_path():
    from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels

    with gpu_contract.sglang_gpu_moe_path() as mp:
        gpu_contract.fake_platform_probe(mp, "cuda")
        mp.setattr(kernels, "per_token_quant_int8", per_token_quant_int8)
        yield


def test_int8_activation_stand_in_is_sglangs_kernel_formula(int8_cuda_path):
    """The stand-in's bytes: within 1/2 of a step of x / scale (half-away ties), scales absmax / 127."""
    x = (torch.randn(6, 128, generator=torch.Generator().manual_seed(1)) * torch.logspace(-2, 2, 6)[:, None]).bfloat16()
    q, s = per_token_quant_int8(x)
    assert q.dtype == torch.int8 and s.shape == (6, 1)
    torch.testing.assert_close(s, x.float().abs().amax(-1, keepdim=True) / 127, rtol=0, atol=0)
    assert (q.float() - x.float() / s).abs().max() <= 0.5 + 1e-5
    assert int(q.abs().max()) == 127
    assert torch.equal(per_token_quant_int8(torch.tensor([[2.5, -2.5, 127.0]]))[0], torch.tensor([[3, -3, 127]], dtype=torch.int8))


def dequantized(raw: dict) -> dict:
    """Checkpoint tensors in fp32, INT8 weights times their channel scales; shared experts zero."""
    out = {}
    for name, t in raw.items():
        if name.endswith(".weight_scale"):
            continue
        if t.dtype == torch.int8:
            t = t.float() * raw[name + "_scale"].float()
        t = t.float()
        out[name] = torch.zeros_like(t) if ".share_expert." in name else t
    return out


@pytest.fixture(scope="module")
def int8_case(int8_cuda_path, tmp_path_factory):
    from sglang.srt.layers.quantization import w8a8_int8

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("int8-moe"), seed=5, quant="w8a8-int8")
    raw = load_file(str(ckpt / "model.safetensors"))
    model, qc = gpu_contract.load_like_sglang(ckpt)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(w8a8_int8, "_is_cpu_amx_available", False)  # the GPU branch: weights stay as loaded
        for _, moe in gpu_contract.moe_layers(model):
            moe.experts.quant_method.process_weights_after_loading(moe.experts)
            moe.topk._forward_method = moe.topk.forward_cuda
    cfg = json.loads((ckpt / "config.json").read_text())
    deq = dequantized(raw)
    return dict(model=model, qc=qc, cfg=cfg, raw=raw, ref=Step35Reference(ckpt, weights=deq),
                ref_unclamped=Step35Reference(ckpt, weights=deq, routed_clamp=False),
                x5=gpu_contract.bf16_tokens(cfg["hidden_size"], 5, seed=11),
                x1=gpu_contract.bf16_tokens(cfg["hidden_size"], 1, seed=12))


def test_int8_experts_run_sglangs_triton_int8_path_with_the_clamp(int8_case):
    from sglang.srt.layers.moe import MoeRunnerBackend
    from sglang.srt.layers.quantization.w8a8_int8 import W8A8Int8Config, W8A8Int8MoEMethod

    model, cfg, raw = int8_case["model"], int8_case["cfg"], int8_case["raw"]
    assert isinstance(int8_case["qc"], W8A8Int8Config) and model.cpu_dequant is None
    layers = gpu_contract.moe_layers(model)
    assert [i for i, _ in layers] == [2, 3, 4] and cfg["swiglu_limits"][4] > 0
    for i, moe in layers:
        e, qm = moe.experts, moe.experts.quant_method
        assert type(qm) is W8A8Int8MoEMethod and qm.runner.runner_backend is MoeRunnerBackend.TRITON
        p = f"model.layers.{i}.moe."
        assert torch.equal(e.w13_weight, torch.cat([raw[p + "gate_proj.weight"], raw[p + "up_proj.weight"]], 1))
        assert torch.equal(e.w2_weight_scale, raw[p + "down_proj.weight_scale"])
        info = qm.get_triton_quant_info(e)
        assert info.use_int8_w8a8 and info.per_channel_quant and info.a13_scale is None
        limit = cfg["swiglu_limits"][i]
        assert e.moe_runner_config.gemm1_clamp_limit == (limit if limit > 0 else None)


def test_int8_layers_match_the_reference_on_dequantized_weights(int8_case):
    """Every INT8 MoE layer (the clamped one included), prefill (5 tokens) and decode (1 token), equals
    the fp32 reference on the dequantized weights within REL_TOL of the output's scale: per-token INT8
    activations (each element within 1/254 of its row's max, twice) and bf16 storage (the interpreter
    truncates) move outputs by ~2% (measured max |out - ref| / max |ref|: 0.017-0.022 over the three
    layers, 5 and 1 tokens); REL_TOL = 0.05. Teeth (next test): no clamp 3.99, unit scales 980."""
    ref = int8_case["ref"]
    for i, moe in gpu_contract.moe_layers(int8_case["model"]):
        for x in (int8_case["x5"], int8_case["x1"]):
            out = gpu_contract.routed_output(moe, x)
            assert out.dtype == torch.bfloat16
            err = gpu_contract.rel_err(out, ref.moe(i, x.float()))
            print(f"int8 MoE layer {i}, {x.shape[0]} tokens: max |out - ref| / max |ref| = {err:.4f}")
            assert err < REL_TOL, f"layer {i}, {x.shape[0]} tokens: {err:.4f}"


def test_dropping_the_clamp_or_the_scales_fails_the_reference(int8_case):
    moe, ref, x = int8_case["model"].model.layers[4].moe, int8_case["ref"], int8_case["x5"]
    want = ref.moe(4, x.float())
    unclamped, unit_scales = gpu_contract.without_clamp_or_scales(moe, x, ("w13_weight_scale", "w2_weight_scale"))
    print(f"int8 teeth: no clamp {gpu_contract.rel_err(unclamped, want):.3f}")
    assert gpu_contract.rel_err(unclamped, want) > 10 * REL_TOL
    assert gpu_contract.rel_err(unclamped, int8_case["ref_unclamped"].moe(4, x.float())) < REL_TOL
    no_scales = gpu_contract.rel_err(unit_scales, want)
    print(f"int8 teeth: scales 1 {no_scales:.3f}")
    assert no_scales > 10 * REL_TOL
    # The router the reference uses is the model's: both see the same experts.
    topk = moe.topk(x, F.linear(x.float(), moe.gate.weight.float()))
    assert topk.topk_ids.shape == (5, int8_case["cfg"]["moe_top_k"])

"""The runner-per-layer policy (`sglang_step35.moe.policy`) on Step-3.5-Flash's real config: which
layers run where on each platform, and the combinations it refuses."""

from __future__ import annotations


import pytest

from sglang_step35.config import layer_spec, moe_layer_ids
from sglang_step35.moe.policy import RoutedRunner, routed_plan
from sglang_step35.config import read_config

FLASH = read_config()  # Step-3.5-Flash


def _runners(**kw):
    return {i: routed_plan(layer_spec(FLASH, i).swiglu_limit, **kw).runner for i in sorted(moe_layer_ids(FLASH))}


def test_gpus_run_every_layer_on_fused_moe():
    for device in ("cuda", "rocm"):
        for ep in (1, 8):
            assert set(_runners(device=device, ep_size=ep, aiter=False).values()) == {RoutedRunner.FUSED}


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "block-fp8"])
def test_aiter_sends_exactly_the_clamped_layers_to_triton(quantized):
    runners = _runners(device="rocm", ep_size=4, aiter=True, quantized=quantized)
    assert [i for i, r in runners.items() if r is RoutedRunner.FUSED_TRITON] == [43, 44]
    assert {r for i, r in runners.items() if i not in (43, 44)} == {RoutedRunner.FUSED}


def test_triton_pinned_method_per_quantization():
    """The FusedMoE method a clamped layer gets under AITER: ours for BF16 and block FP8 (each a
    subclass of SGLang's own), SGLang's for int4 (no AITER path), a named error otherwise."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    from sglang_step35.moe.runner import ClampHonouringFp8MoEMethod, ClampHonouringMoEMethod, clamp_honouring_method

    assert type(clamp_honouring_method(None)) is ClampHonouringMoEMethod
    assert isinstance(clamp_honouring_method(None), UnquantizedFusedMoEMethod)
    block = Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128])
    method = clamp_honouring_method(block)
    assert type(method) is ClampHonouringFp8MoEMethod and isinstance(method, Fp8MoEMethod)
    assert method.quant_config is block
    wna16 = MoeWNA16Config(linear_quant_method="gptq", weight_bits=4, group_size=128, has_zp=False, lm_head_quantized=False,
                           modules_to_not_convert=[], full_config={"quant_method": "gptq"})
    assert clamp_honouring_method(wna16) is None
    with pytest.raises(NotImplementedError, match="Fp8Config.*SGLANG_USE_AITER=0"):
        clamp_honouring_method(Fp8Config(is_checkpoint_fp8_serialized=True))


def test_cpu_loops_only_where_sglangs_cpu_moe_cannot_serve():
    runners = _runners(device="cpu", ep_size=1, aiter=False)
    assert [i for i, r in runners.items() if r is RoutedRunner.EXPERT_LOOP] == [43, 44]
    assert set(_runners(device="cpu", ep_size=2, aiter=False).values()) == {RoutedRunner.EXPERT_LOOP}


def test_clamp_owner_is_named_on_clamped_layers_only():
    assert routed_plan(7.0, device="cuda", ep_size=1, aiter=False).clamp_by.startswith("SGLang Triton")
    assert routed_plan(0.0, device="cuda", ep_size=1, aiter=False).clamp_by is None


def test_refusals_name_the_problem():
    with pytest.raises(NotImplementedError, match="deep_gemm"):
        routed_plan(7.0, device="cuda", ep_size=8, aiter=False, runner_backend="deep_gemm")
    with pytest.raises(ValueError, match="swiglu_limit"):
        routed_plan(-1.0, device="cuda", ep_size=1, aiter=False)
    with pytest.raises(ValueError, match="unknown device"):
        routed_plan(0.0, device="tpu", ep_size=1, aiter=False)


def test_int4_experts_on_rocm_are_held_to_tritons_layout_rule_not_aiters():
    """SGLang 0.5.23's MoeWNA16Method (AWQ under --quantization moe_wna16) builds a Triton runner in
    create_moe_runner, with no platform or SGLANG_USE_AITER branch: on ROCm its experts never reach
    AITER's CK MoE, so the launch guard and the planner judge them by Triton's rule (whole 128-groups
    per partition), not CK 4-bit's N % 256. AWQ Flash at --tp 2 --ep 1 (N = 640 per GPU) runs as laid
    out; judged as AITER (the old rule) it was switched to EP. Formats AITER runs keep the AITER rule.
    (The layout rule alone: served.py refuses these formats on ROCm for other reasons, named there.)"""
    from sglang.srt.layers.moe import MoeRunnerConfig
    from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Method

    from sglang_step35 import served
    from sglang_step35.moe.policy import effective_moe_backend, guard_moe_layout

    method = MoeWNA16Method.__new__(MoeWNA16Method)
    method.create_moe_runner(None, MoeRunnerConfig(num_experts=4, gemm1_clamp_limit=7.0))
    assert method.runner.runner_backend.is_triton()
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    cfg = dict(FLASH, quantization_config=awq)
    for aiter in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(served, "refusals", lambda setting, flags=served.FLAGS: [])
            d = guard_moe_layout({"tp_size": 2, "ep_size": 1, "quantization": "moe_wna16"}, cfg, "rocm", aiter=aiter)
        assert d.action == "ok" and "N=640 per GPU" in d.message and "triton" in d.message, d.message
    assert effective_moe_backend("auto", "amd", "int4") == "triton"
    assert effective_moe_backend("auto", "amd", "w4a16-g32") == "triton"
    assert effective_moe_backend("auto", "amd", "mxfp4") == "aiter"
    assert effective_moe_backend("auto", "amd", None) == "aiter"
    assert effective_moe_backend("auto", "nvidia", "int4") == "auto"

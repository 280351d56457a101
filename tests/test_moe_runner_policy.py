"""The runner-per-layer policy (`sglang_step35.moe.runner`) on Step-3.5-Flash's real config: which
layers run where on each platform, and the combinations it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sglang_step35.config import layer_spec, moe_layer_ids
from sglang_step35.moe.runner import RoutedRunner, routed_plan

FLASH = json.loads((Path(__file__).parent / "fixtures" / "step3p5_flash_config.json").read_text())


def _runners(**kw):
    return {i: routed_plan(layer_spec(FLASH, i).swiglu_limit, **kw).runner for i in sorted(moe_layer_ids(FLASH))}


def test_gpus_run_every_layer_on_fused_moe():
    for device in ("cuda", "rocm"):
        for ep in (1, 8):
            assert set(_runners(device=device, ep_size=ep, aiter=False).values()) == {RoutedRunner.FUSED}


def test_aiter_sends_exactly_the_clamped_layers_to_triton():
    runners = _runners(device="rocm", ep_size=4, aiter=True)
    assert [i for i, r in runners.items() if r is RoutedRunner.FUSED_TRITON] == [43, 44]
    assert {r for i, r in runners.items() if i not in (43, 44)} == {RoutedRunner.FUSED}


def test_cpu_loops_only_where_sglangs_cpu_moe_cannot_serve():
    runners = _runners(device="cpu", ep_size=1, aiter=False)
    assert [i for i, r in runners.items() if r is RoutedRunner.EXPERT_LOOP] == [43, 44]
    assert set(_runners(device="cpu", ep_size=2, aiter=False).values()) == {RoutedRunner.EXPERT_LOOP}


def test_clamp_owner_is_named_on_clamped_layers_only():
    assert routed_plan(7.0, device="cuda", ep_size=1, aiter=False).clamp_by.startswith("SGLang Triton")
    assert routed_plan(0.0, device="cuda", ep_size=1, aiter=False).clamp_by is None


def test_refusals_name_the_problem():
    with pytest.raises(NotImplementedError, match="SGLANG_USE_AITER=0"):
        routed_plan(7.0, device="rocm", ep_size=8, aiter=True, quantized=True)
    with pytest.raises(ValueError, match="swiglu_limit"):
        routed_plan(-1.0, device="cuda", ep_size=1, aiter=False)
    with pytest.raises(ValueError, match="unknown device"):
        routed_plan(0.0, device="tpu", ep_size=1, aiter=False)

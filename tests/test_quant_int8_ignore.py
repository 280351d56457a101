"""A W8A8-INT8 `ignore` list names modules as the checkpoint does; SGLang's `W8A8Int8Config` matches it
against our module prefixes without the name mapping its other configs get.

SGLang's loader hands each quantization config the model class's `hf_to_sglang_mapper`
(`apply_weight_name_mapper`), which `CompressedTensorsConfig` applies to its `ignore` list but
`W8A8Int8Config` (the method a compressed-tensors INT8 checkpoint is served with, `--quantization
w8a8_int8`) does not implement. Step-3.5's shared expert is `model.layers.N.share_expert.*` in the
checkpoint and `model.layers.N.moe.share_expert.*` in our class, so an export that keeps it BF16 and
says so by name had it built INT8 and its BF16 tensors refused. Built the way SGLang's loader builds it
(tests/test_quant_int8_load.py's `build`), every parameter bit-exact to the checkpoint. Routed experts
kept unquantized, which W8A8Int8Config cannot build, are refused by name.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from gpu_contract import main_name
from sglang_step35.tiny import write_tiny_checkpoint
import gpu_contract
from test_quant_int8_load import assert_bit_exact, build, kept_bf16


@pytest.fixture(scope="module")
def gpu_like_build():
    with gpu_contract.gpu_like_build_state("cuda"):
        yield


@pytest.mark.parametrize("name", ["w8a8-int8", "w8a8-int8-ct"])
def test_ignore_list_naming_the_shared_expert_as_the_checkpoint_does_keeps_it_bf16(gpu_like_build, tmp_path, name):
    ckpt = write_tiny_checkpoint(tmp_path / name, seed=6, quant=name)
    keep = [f"model.layers.2.share_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    w = kept_bf16(ckpt, keep)
    model, _ = build(ckpt)
    model.load_weights(w.items())
    got = assert_bit_exact(model, w, main_name, model.config.moe_num_experts)
    share2, share3 = model.model.layers[2].moe.share_expert, model.model.layers[3].moe.share_expert
    assert share2.gate_up_proj.weight.dtype == share2.down_proj.weight.dtype == torch.bfloat16
    assert share3.gate_up_proj.weight.dtype == torch.int8  # only the named layer
    assert "model.layers.3.moe.share_expert.down_proj.weight" in got


def test_ignore_list_keeping_routed_experts_unquantized_is_refused_by_name(gpu_like_build, tmp_path):
    # Mapped to our `moe.experts`, the names match SGLang's FusedMoE, which W8A8Int8Config cannot build
    # unquantized (it hands it UnquantizedLinearMethod: a TypeError in create_weights).
    from sglang_step35.config import Step35ConfigError

    ckpt = write_tiny_checkpoint(tmp_path / "int8", seed=6, quant="w8a8-int8")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["ignore"] += [f"model.layers.3.moe.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    with pytest.raises(Step35ConfigError, match=r"keeps the routed experts of MoE layers \[3\] unquantized"):
        build(ckpt)


@pytest.mark.parametrize("name", ["w8a8-int8-ct", "w8a8-int8", "w4a16"])
def test_ignore_list_naming_single_routed_experts_is_refused_at_launch_and_construction(gpu_like_build, tmp_path, name):
    """Exports that unfuse the experts into Linear modules may keep some BF16 and name them
    (`model.layers.N.moe.experts.E.gate_proj`, exactly or by `re:`). SGLang builds a MoE layer's experts as
    one FusedMoE under the scheme of its `moe.experts` prefix, so those experts would be built quantized and
    their BF16 tensors refused by the loader (a precision error at load): refused by name before that, at
    launch (the policy step, on a GPU) and at construction. A layer ignored whole is not this refusal."""
    from types import SimpleNamespace

    from sglang_step35 import quant
    from sglang_step35.config import Step35ConfigError
    from sglang_step35.launch.policy import Launch, quant_method_problems
    from sglang_step35.platform import Platform

    ckpt = write_tiny_checkpoint(tmp_path / name, seed=6, quant=name)
    cfg = json.loads((ckpt / "config.json").read_text())
    flag = "w8a8_int8" if name.startswith("w8a8") else None
    assert quant_method_problems(Launch(SimpleNamespace(quantization=flag), Platform("nvidia", (9, 0)), cfg)) is None
    cfg["quantization_config"]["ignore"] += ["model.layers.3.moe.experts.1.gate_proj",
                                             r"re:model\.layers\.4\.moe\.experts\.0\.(up|down)_proj$"]
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))
    named = (r"keeps single routed experts unquantized \(model\.layers\.3\.moe\.experts\.1\.gate_proj, "
             r"model\.layers\.4\.moe\.experts\.0\.up_proj, model\.layers\.4\.moe\.experts\.0\.down_proj\).*"
             r"one FusedMoE under one quantization scheme")
    at_launch = quant_method_problems(Launch(SimpleNamespace(quantization=flag), Platform("nvidia", (9, 0)), cfg))
    assert at_launch and re.search(named, at_launch), at_launch
    runner = {"w4a16": "triton"}.get(name)
    with pytest.MonkeyPatch.context() as mp:
        if runner:
            from sglang.srt.layers.moe.utils import MoeRunnerBackend
            from sglang.srt.runtime_context import get_flags

            mp.setattr(get_flags().moe, "runner_backend", MoeRunnerBackend(runner))
        with pytest.raises(Step35ConfigError, match=named):
            build(ckpt, quantization=flag)
    # Not on a CPU (built unquantized, BF16 experts load as they are); a layer's experts ignored whole
    # (`model.layers.3.moe.experts`, i.e. its MoE prefix) is not named here.
    assert quant_method_problems(Launch(SimpleNamespace(quantization=flag), Platform("cpu"), cfg)) is None
    whole = dict(cfg["quantization_config"], ignore=["model.layers.3.moe.experts", "re:model\\.layers\\.3\\..*"])
    assert quant.single_expert_ignores(whole, cfg) is None

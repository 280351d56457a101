"""Pipeline parallel in process: each stage builds and loads only its layers and together they give the
reference's logits; the launch guard refuses what SGLang 0.5.23 cannot run with Step-3.5 under PP.
Served `--pp-size 2` and `--pp-size 2 --tp 2`: test_parallel_served.py.

The tiny model has 5 main layers: SGLang's even split (get_pp_indices) gives stage 0 layers 0-1 (the
dense ones, and the embedding) and stage 1 layers 2-4 (the MoE ones, the clamped last layer, norm
and lm_head), so the hand-off between stages carries a dense layer's output into the MoE range.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from sglang_step35.launch.parallel_guard import PipelineParallelError, guard_pipeline_parallel
from sglang_step35.tiny import write_tiny_checkpoint
import gpu_contract

FP32_TOL = 1e-4
STAGES = {0: (0, 2), 1: (2, 5)}  # get_pp_indices(5, rank, 2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("pp"), seed=0)


@pytest.fixture(scope="module")
def cfg(ckpt):
    from sglang_step35.config import Step35Config

    gpu_contract.sglang_world_of_one()
    return Step35Config(**json.loads((ckpt / "config.json").read_text()))


def _build(cfg, pp_rank=None):
    """Step3p5ForCausalLM in fp32 as pipeline stage `pp_rank` of 2 builds it (None: one rank)."""
    from sglang.srt.runtime_context import get_context, get_parallel

    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with get_context().override_server_args(device="cpu"):
            if pp_rank is None:
                return Step3p5ForCausalLM(cfg)
            # The stage's view of SGLang's parallel state: its PP group coordinates, all else TP1.
            pp_group = SimpleNamespace(world_size=2, rank_in_group=pp_rank, is_first_rank=pp_rank == 0,
                                       is_last_rank=pp_rank == 1, ranks=[0, 1], unique_name="pp",
                                       cpu_group=None, device_group=None)  # fmt: skip
            with get_parallel().override(pp_group=pp_group, pp_rank=pp_rank, pp_size=2):
                return Step3p5ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def _fp32(raw: dict):
    return [(k, v.float() if v.dtype == torch.bfloat16 else v) for k, v in raw.items()]


def test_each_stage_builds_and_loads_only_its_layers(cfg, ckpt):
    from sglang.srt.distributed.utils import get_pp_indices
    from sglang.srt.layers.utils import PPMissingLayer

    raw = load_file(str(ckpt / "model.safetensors"))
    whole = _build(cfg)
    whole.load_weights(_fp32(raw))
    full = dict(whole.named_parameters())
    seen: dict[str, int] = {}
    for rank, (start, end) in STAGES.items():
        assert get_pp_indices(cfg.num_hidden_layers, rank, 2) == (start, end)
        stage = _build(cfg, rank)
        # SGLang sizes and indexes the stage's KV pool by these (layer_setup.resolve_layer_indices).
        assert (stage.start_layer, stage.end_layer) == (start, end)
        for i, layer in enumerate(stage.model.layers):
            if start <= i < end:
                assert layer.self_attn.attn.layer_id == i  # global: the pool subtracts start_layer
                if layer.is_moe:
                    assert layer.moe.experts.layer_id == i  # EPLB's expert map is indexed globally
            else:
                assert isinstance(layer, PPMissingLayer), i
        assert isinstance(stage.model.embed_tokens, PPMissingLayer) == (rank != 0)
        assert isinstance(stage.model.norm, PPMissingLayer) == (rank != 1)
        assert isinstance(stage.lm_head, PPMissingLayer) == (rank != 1)
        # The full checkpoint stream: other stages' tensors (and MTP layers) are skipped, not reported.
        stage.load_weights(_fp32(raw))
        for name, p in stage.named_parameters():
            seen[name] = seen.get(name, 0) + 1
            torch.testing.assert_close(p, full[name], rtol=0, atol=0, msg=name)
    assert seen == dict.fromkeys(full, 1), "the stages must hold every parameter of one rank exactly once"
    # EPLB asks the class (not a stage) and keeps global layer ids.
    got = type(whole).get_model_config_for_expert_location(cfg)
    assert (got.num_layers, got.num_logical_experts) == (cfg.num_hidden_layers, cfg.moe_num_experts)


def test_each_stage_reports_the_problems_of_its_own_tensors(cfg, ckpt):
    from sglang_step35.models.weights import Step35WeightError

    raw = load_file(str(ckpt / "model.safetensors"))
    del raw["model.layers.3.self_attn.o_proj.weight"]  # stage 1's
    del raw["lm_head.weight"]  # stage 1's
    raw["model.layers.1.self_attn.extra.weight"] = torch.zeros(4)  # inside stage 0's layers
    raw["model.layers.0.mlp.up_proj.weight"] = raw["model.layers.0.mlp.up_proj.weight"][:-1]  # stage 0's
    with pytest.raises(Step35WeightError) as e0:
        _build(cfg, 0).load_weights(_fp32(raw))
    with pytest.raises(Step35WeightError) as e1:
        _build(cfg, 1).load_weights(_fp32(raw))
    m0, m1 = str(e0.value), str(e1.value)
    assert "pipeline stage 0 of 2: layers 0-1, embedding" in m0
    assert "model.layers.1.self_attn.extra.weight" in m0 and "model.layers.0.mlp.up_proj.weight: expected" in m0
    assert "model.layers.3" not in m0 and "lm_head" not in m0
    assert "pipeline stage 1 of 2: layers 2-4, norm and lm_head" in m1
    assert "model.layers.3.self_attn.o_proj.weight: expected" in m1 and "lm_head.weight: expected" in m1
    assert "model.layers.1." not in m1 and "model.layers.0." not in m1


# --- launch guard ------------------------------------------------------------------------------------


def test_guard_passes_what_pp_serves(cfg):
    guard_pipeline_parallel({"pp_size": 1, "speculative_algorithm": "EAGLE"}, cfg, env={})
    guard_pipeline_parallel({"pp_size": 2, "tp_size": 2}, cfg, env={})
    guard_pipeline_parallel({"pp_size": 5}, cfg, env={"SGLANG_PP_LAYER_PARTITION": "1,1,1,1,1"})
    guard_pipeline_parallel({"pp_size": 2}, cfg, env={"SGLANG_PP_LAYER_PARTITION": "3,2"})


def test_guard_refuses_more_stages_than_layers(cfg):
    with pytest.raises(PipelineParallelError, match=r"--pp-size 6: .* 5 decoder layers, so at most --pp-size 5"):
        guard_pipeline_parallel({"pp_size": 6}, cfg, env={})


def test_guard_refuses_pp_with_mtp(cfg):
    with pytest.raises(PipelineParallelError) as e:
        guard_pipeline_parallel({"pp_size": 2, "tp_size": 4, "speculative_algorithm": "EAGLE"}, cfg, env={})
    msg = str(e.value)
    assert "--pp-size 2 with --speculative-algorithm EAGLE" in msg and "multi-layer EAGLE" in msg
    assert "Drop --speculative-algorithm" in msg and "--pp-size 1" in msg and "--tp 8" in msg


def test_guard_refuses_a_partition_that_counts_the_mtp_layers(cfg):
    # 5 main + 3 MTP layers: "4,4" splits 8.
    with pytest.raises(PipelineParallelError, match=r"summing to num_hidden_layers=5 \(the MTP layers .*"
                                                     r"SGLANG_PP_LAYER_PARTITION=2,3"):
        guard_pipeline_parallel({"pp_size": 2}, cfg, env={"SGLANG_PP_LAYER_PARTITION": "4,4"})
    with pytest.raises(PipelineParallelError, match="expected 2 layer counts"):
        guard_pipeline_parallel({"pp_size": 2}, cfg, env={"SGLANG_PP_LAYER_PARTITION": "5"})
    with pytest.raises(PipelineParallelError, match="comma-separated"):
        guard_pipeline_parallel({"pp_size": 2}, cfg, env={"SGLANG_PP_LAYER_PARTITION": "2;3"})


def test_sglang_itself_cannot_run_step_mtp_under_pp(cfg):
    """The guard's premise, from SGLang 0.5.23's own resolution code: every Step-3.5 EAGLE run is
    multi-layer EAGLE, and PP refuses multi-layer EAGLE. Should SGLang lift either, this fails: then
    drop the MTP refusal from parallel_guard and serve MTP on the last stage."""
    from sglang.srt.arg_groups import overrides
    from sglang.srt.arg_groups.validation_hook import check_pipeline_parallel_compat

    from sglang_step35.launch.parallel_guard import pp_stage_layers

    view = SimpleNamespace(speculative_algorithm="EAGLE", attention_backend="torch_native",
                           enable_hierarchical_cache=False)  # fmt: skip
    resolving = overrides.resolving_view
    overrides.resolving_view = lambda server_args: server_args
    try:
        assert overrides._step3p_overrides(view, cfg).get("enable_multi_layer_eagle") is True
    finally:
        overrides.resolving_view = resolving
    pp_view = SimpleNamespace(disable_overlap_schedule=True, speculative_algorithm="EAGLE",
                              enable_multi_layer_eagle=True, disaggregation_mode="null",
                              min_free_slots_delay=None)  # fmt: skip
    with pytest.raises(AssertionError, match="only supports EAGLE \\(non-multi-layer\\)"):
        check_pipeline_parallel_compat(pp_view)
    # The guard's suggested partition is SGLang's default split.
    from sglang.srt.distributed.utils import get_pp_indices

    os.environ.pop("SGLANG_PP_LAYER_PARTITION", None)
    for n, pp in ((5, 2), (45, 4), (45, 3)):
        assert [(r.start, r.stop) for r in pp_stage_layers(n, pp)] == [get_pp_indices(n, k, pp) for k in range(pp)]

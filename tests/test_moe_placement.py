"""EP placement, the TP/EP layout rule, the runtime guard, and EP dispatch/combine semantics.

The simulated-ranks tests run the plain-torch reference in tests/reference/ep_reference.py:
each rank computes only its own experts, the partials are summed (all-reduce) and the shared
expert is added once; that must equal EP=1, and the sglang #26845 bug (shared expert added on
every rank) must be detected.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sglang_step35.config import Step35ConfigError
from sglang_step35.moe import check_moe_layout, guard_moe_layout, place_experts, valid_ep_sizes
from sglang_step35.moe.layout import moe_block_layout
from sglang_step35.moe.quant import FP8_BLOCK128, parse_quant
from sglang_step35.config import read_config

CFG = read_config()  # Step-3.5-Flash


# ---------------------------------------------------------------- placement


def test_contiguous_blocks_of_E_over_k():
    p = place_experts(288, 4)
    assert p.experts_per_rank == 72
    assert p.rank_table() == [range(0, 72), range(72, 144), range(144, 216), range(216, 288)]
    assert [p.rank_of(e) for e in (0, 71, 72, 287)] == [0, 0, 1, 3]
    assert p.global_to_local(73, 1) == 1 and p.global_to_local(73, 0) == -1


def test_every_expert_on_exactly_one_rank():
    for k in valid_ep_sizes(288, 16):
        p = place_experts(288, k)
        held = sorted(e for r in range(k) for e in p.local_experts(r))
        assert held == list(range(288))


def test_placement_matches_sglang_fused_moe_mapping():
    # SGLang's own global->local mapping, called on a stand-in carrying the attributes it reads.
    from sglang_step35.plugin import register

    register()  # on a GPU-less machine SGLang's MoE layer imports sgl_kernel: our CPU stand-in
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    for ep in (1, 2, 4, 8):
        ours = place_experts(288, ep)
        for rank in range(ep):
            layer = SimpleNamespace(
                _expert_storage_rank=rank, _num_local_routed=288 // ep, _has_fused_shared=False, _num_global_routed=288
            )
            theirs = [FusedMoE._map_global_expert_id_to_local_expert_id(layer, e) for e in range(288)]
            assert theirs == [ours.global_to_local(e, rank) for e in range(288)], (ep, rank)


def test_uneven_experts_error_names_numbers_and_nearest_sizes():
    with pytest.raises(Step35ConfigError) as e:
        place_experts(288, 5)
    msg = str(e.value)
    assert "--ep-size 5" in msg and "288" in msg and "57.60" in msg
    assert "Nearest valid EP sizes: 4 or 6" in msg
    with pytest.raises(Step35ConfigError, match="Nearest valid EP sizes: 1 or 7"):
        place_experts(7, 3)


# ---------------------------------------------------------------- layout rule


def test_aiter_tp4_without_ep_is_the_known_n320_failure():
    v = check_moe_layout("aiter", "bf16", 1280, tp=4, ep=1, num_experts=288, share_expert_dim=1280)
    assert not v and v.routed_n == 320 and v.routed_failed and not v.shared_failed
    assert "320" in v.reasons[0] and "128" in v.reasons[0]
    assert check_moe_layout("aiter", "bf16", 1280, tp=4, ep=4, num_experts=288, share_expert_dim=1280).ok


def test_aiter_tile_threshold():
    # 64-wide tiles up to N=192, 128 above (vllm #55368): 192 and 128 run, 160 and 320 do not.
    assert check_moe_layout("aiter", "bf16", 768, tp=4, ep=1).routed_n == 192
    assert check_moe_layout("aiter", "bf16", 768, tp=4, ep=1).ok
    assert check_moe_layout("aiter", "bf16", 1280, tp=2, ep=1).ok  # N = 640
    assert not check_moe_layout("aiter", "bf16", 1280, tp=8, ep=1).ok  # N = 160
    assert not check_moe_layout("aiter", "int4", 1280, tp=8, ep=2).ok  # N = 320, CK 4-bit wants 256
    assert check_moe_layout("aiter", "int4", 1280, tp=8, ep=8).ok


def test_triton_bf16_may_split_but_fp8_blocks_may_not():
    assert check_moe_layout("triton", "bf16", 1280, tp=4, ep=1, share_expert_dim=1280).ok
    v = check_moe_layout("triton", "fp8", 1280, tp=4, ep=1, share_expert_dim=1280)
    assert v.routed_failed and not v.shared_failed  # the shared expert is replicated, not cut (below)
    # EP fixes the routed experts; the shared expert, which EP does not touch (sglang #26107 happened
    # with --ep 4), is replicated by the placement rule instead of split into 320-wide shards.
    v = check_moe_layout("triton", "fp8", 1280, tp=4, ep=4, share_expert_dim=1280)
    assert v.ok and v.shared_n == 1280
    assert check_moe_layout("triton", "fp8", 1280, tp=2, ep=1, share_expert_dim=1280).shared_n == 640  # 5 x 128


def test_one_placement_rule_for_the_shared_expert():
    rule = lambda **kw: moe_block_layout(share_expert_dim=1280, **kw)  # noqa: E731
    for tp, replicated in ((1, False), (2, False), (4, True), (8, True)):
        b = rule(a2a_backend=None, quant="fp8", tp_size=tp)
        assert b.shared_expert_replicated is replicated and not b.tokens_on_attn_tp_slice, tp
        assert not rule(a2a_backend="none", quant="bf16", tp_size=tp).shared_expert_replicated
    b = rule(a2a_backend="deepep", quant="bf16", tp_size=8)
    assert b.shared_expert_replicated and b.tokens_on_attn_tp_slice and b.routed_output_complete


def test_dense_mlp_split_is_checked_for_fp8():
    assert check_moe_layout("triton", "fp8", 1280, 8, 8, dense_intermediate_size=11264).ok  # 1408 = 11 x 128
    assert not check_moe_layout("triton", "fp8", 1280, 8, 8, dense_intermediate_size=11200).ok


def test_parse_quant_from_checkpoint_config():
    assert parse_quant({"quant_method": "fp8", "weight_block_size": [128, 128]}) == FP8_BLOCK128
    assert parse_quant({"quant_method": "awq", "bits": 4, "group_size": 128}).group_size == 128
    with pytest.raises(Step35ConfigError):
        parse_quant("nvfp4-made-up")


# ---------------------------------------------------------------- runtime guard


def test_guard_amd_tp4_without_ep_switches_to_ep4_with_one_log_line():
    d = guard_moe_layout(SimpleNamespace(tp_size=4, ep_size=1, moe_runner_backend="auto"), CFG, "rocm")
    assert d.action == "switch_to_ep" and d.ep_size == 4
    assert "\n" not in d.message and "N=320" in d.message and "--ep 4" in d.message
    # The corrected args pass.
    assert guard_moe_layout(SimpleNamespace(tp_size=4, ep_size=d.ep_size), CFG, "rocm").action == "ok"


def test_guard_accepts_platform_objects():
    class Hip:
        def is_hip(self):
            return True

    assert guard_moe_layout({"tp_size": 4}, CFG, Hip()).action == "switch_to_ep"
    assert guard_moe_layout({"tp_size": 4}, CFG, "cuda").action == "ok"  # triton bf16 runs N=320


FP8_CFG = dict(CFG, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})


def test_guard_fp8_tp4_switches_to_ep4_and_replicates_the_shared_expert():
    d = guard_moe_layout({"tp_size": 4, "quantization": "fp8"}, FP8_CFG, "cuda")
    assert d.action == "switch_to_ep" and d.ep_size == 4 and "N=320" in d.message
    ok = guard_moe_layout({"tp_size": 4, "ep_size": 4}, FP8_CFG, "cuda")
    assert ok.action == "ok" and "shared expert replicated" in ok.message


def test_guard_reads_quantization_flag_as_sglang_builds_it():
    """`--quantization fp8` on the BF16 checkpoint is SGLang's online per-tensor FP8 (refused: no
    contract test); on the FP8 checkpoint the checkpoint's 128x128 blocks decide."""
    d = guard_moe_layout({"tp_size": 4, "ep_size": 4, "quantization": "fp8"}, CFG, "cuda")
    assert d.action == "refuse" and "fp8-per-tensor experts" in d.message
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4, "quantization": "fp8"}, FP8_CFG, "cuda").action == "ok"


def test_guard_reads_fp8_from_the_checkpoint_config():
    cfg = dict(CFG, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert guard_moe_layout({"tp_size": 8, "ep_size": 8}, cfg, "cuda").action == "ok"
    assert guard_moe_layout({"tp_size": 2}, cfg, "cuda").action == "ok"
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4}, cfg, "rocm", aiter=True).action == "ok"
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4}, cfg, "rocm", aiter=False).action == "ok"
    per_tensor = dict(CFG, quantization_config={"quant_method": "fp8"})
    d = guard_moe_layout({"tp_size": 4, "ep_size": 4}, per_tensor, "rocm", aiter=True)
    assert d.action == "refuse" and "43, 44" in d.message and "SGLANG_USE_AITER=0" in d.message


@pytest.mark.parametrize("quant", ["bf16", "fp8"])
@pytest.mark.parametrize("platform,a2a", [("cuda", "deepep"), ("rocm", "mori")])
def test_guard_refuses_all_to_all_on_clamped_layers_with_the_command_to_use(platform, a2a, quant):
    args = {"tp_size": 8, "ep_size": 8, "moe_a2a_backend": a2a}
    cfg = FP8_CFG if quant == "fp8" else CFG
    d = guard_moe_layout(args, cfg, platform, aiter=False)
    assert d.action == "refuse" and "43, 44" in d.message
    assert "relaunch without --moe-a2a-backend: --tp 8 --ep 8" in d.message and d.flags == ("--tp 8", "--ep 8")
    if a2a == "deepep":
        assert "DeepGEMM" in d.message and "min(silu(gate), L)" in d.message
    # The command it names passes.
    assert guard_moe_layout({**args, "moe_a2a_backend": "none"}, cfg, platform, aiter=False).action == "ok"


def test_guard_serves_all_to_all_where_no_layer_clamps():
    cfg = dict(CFG, swiglu_limits=[0.0] * len(CFG["swiglu_limits"]))
    d = guard_moe_layout({"tp_size": 8, "ep_size": 8, "moe_a2a_backend": "deepep"},
                         dict(cfg, quantization_config=FP8_CFG["quantization_config"]), "cuda")
    assert d.action == "ok" and "shared expert replicated" in d.message
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4, "moe_a2a_backend": "mori"}, cfg, "rocm").action == "ok"


@pytest.mark.parametrize(
    "extra,platform,needle",
    [
        ({"moe_a2a_backend": "mooncake"}, "cuda", "mooncake is not supported"),
        ({"moe_a2a_backend": "mori"}, "cuda", "does not run on nvidia GPUs (use deepep)"),
        ({"moe_a2a_backend": "deepep"}, "cpu", "needs GPUs"),
        ({"enable_dp_attention": True}, "cuda", "--enable-dp-attention"),
        ({"moe_runner_backend": "deep_gemm"}, "cuda", "DeepGEMM"),
    ],
)
def test_guard_refuses_what_our_class_cannot_serve(extra, platform, needle):
    cfg = dict(CFG, swiglu_limits=[0.0] * len(CFG["swiglu_limits"])) if "a2a" in str(extra) else CFG
    d = guard_moe_layout({"tp_size": 4, "ep_size": 4, **extra}, cfg, platform)
    assert d.action == "refuse" and needle in d.message, d.message
    flag = next(iter(extra)).replace("_", "-")
    assert f"relaunch without --{flag}: --tp 4 --ep 4" in d.message, d.message


def test_guard_uneven_experts_refused_with_nearest_sizes():
    cfg = dict(CFG, moe_num_experts=290)
    d = guard_moe_layout({"tp_size": 4, "ep_size": 4}, cfg, "rocm")
    assert d.action == "refuse" and "290" in d.message and "nearest valid EP sizes: 2 or 5" in d.message
    d = guard_moe_layout({"tp_size": 4, "ep_size": 3}, CFG, "cuda")
    assert d.action == "refuse" and d.flags == ("--tp 4", "--ep 4")


def test_guard_ok_for_seed_layouts():
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4}, CFG, "cuda").action == "ok"
    assert guard_moe_layout({"tp_size": 4, "ep_size": 4}, CFG, "rocm").action == "ok"

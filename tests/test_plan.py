"""`step35 plan`: arithmetic against hand calculations, seed deployments, infeasible plans, JSON,
the generated deploy doc, and every planned command parsing with SGLang's own argument parser and
passing the runtime MoE guard."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from sglang_step35.moe import guard_moe_layout
from sglang_step35.config import read_config
from sglang_step35.plan import make_plan
from sglang_step35.plan_hardware import GPUS, GiB
from sglang_step35.plan_render import format_plan
from sglang_step35.plan_memory import (
    buffer_breakdown,
    kv_bytes_per_token,
    kv_cache_bytes,
    rope_cache_keys,
    weight_breakdown,
)
from sglang_step35.plan_cli import add_plan_parser, main as plan_main, run_plan

ROOT = Path(__file__).resolve().parent.parent
CFG = read_config()  # Step-3.5-Flash
# The formats with a published Step-3.5-Flash checkpoint; the 8- and 4-bit exports are planned in
# tests/test_plan_quant.py (their commands, bytes and the allow-list's answer).
CLASSIC = ("bf16", "fp8", "int4")
KiB = 1024


def test_packaged_config_is_the_fixture():
    assert read_config() == CFG


# ---------------------------------------------------------------- KV arithmetic


def test_kv_per_token_full_layers_is_48_kib():
    # 12 full layers x (K and V) x 8 KV heads x 128 head_dim x 2 bytes (bf16)
    assert kv_bytes_per_token(CFG, tp=1, which="full") == 12 * 2 * 8 * 128 * 2 == 48 * KiB
    # 33 sliding layers, same KV heads
    assert kv_bytes_per_token(CFG, tp=1, which="sliding") == 33 * 2 * 8 * 128 * 2


def test_kv_heads_split_by_tp_and_replicated_below_one_per_gpu():
    assert kv_bytes_per_token(CFG, tp=4, which="full") == 12 * 2 * (8 // 4) * 128 * 2  # 2 heads per GPU
    assert kv_bytes_per_token(CFG, tp=8, which="full") == 12 * 2 * 1 * 128 * 2
    assert kv_bytes_per_token(CFG, tp=16, which="full") == 12 * 2 * 1 * 128 * 2  # 8 heads < 16: replicated


def test_256k_sequence_full_layer_kv_is_12_gib_and_swa_saves_3_75x():
    ctx = 262144
    assert kv_bytes_per_token(CFG, 1, "full") * ctx == 12 * GiB
    with_swa = kv_cache_bytes(CFG, 1, ctx, 1)
    without = kv_cache_bytes(CFG, 1, ctx, 1, hybrid_swa=False)
    cell = 2 * 8 * 128 * 2
    assert with_swa == 12 * cell * ctx + 33 * cell * 512  # sliding layers keep only the 512-token window
    assert without == 45 * cell * ctx
    assert without / with_swa == pytest.approx(45 * ctx / (12 * ctx + 33 * 512))
    assert 3.7 < without / with_swa < 3.75  # -> 45/12 = 3.75 as context grows


def test_short_context_sliding_layers_hold_the_whole_sequence():
    cell = 2 * 8 * 128 * 2
    assert kv_cache_bytes(CFG, 1, 300, 2) == 45 * cell * 300 * 2


# ---------------------------------------------------------------- weight arithmetic


def test_total_parameters_match_the_model_card():
    # bf16 TP1: 2 bytes per parameter (plus 4-byte router biases, negligible). Model card: 196B backbone.
    total = sum(weight_breakdown(CFG, "bf16", 1, 1).values()) / 2
    assert total == pytest.approx(196e9, rel=0.01)


def test_attention_bytes_per_layer_type_tp4_bf16():
    h, hd = 4096, 128
    full_q, sliding_q, kv = 64 // 4 * hd, 96 // 4 * hd, 8 // 4 * hd

    def layer(q):  # qkv + o + head-wise gate g_proj (one output per local head) + q/k norms
        return ((q + 2 * kv) * h + h * q + (q // hd) * h + 2 * hd) * 2

    expected = 12 * layer(full_q) + 33 * layer(sliding_q)
    assert weight_breakdown(CFG, "bf16", 4, 4)["attention"] == expected


def test_routed_experts_per_gpu_ep4_bf16():
    # 288/4 = 72 whole experts x 42 MoE layers x (gate + up + down = 3 x 4096 x 1280) x 2 B
    assert weight_breakdown(CFG, "bf16", 4, 4)["routed_experts"] == 72 * 42 * 3 * 4096 * 1280 * 2
    # TP4 without EP holds a quarter of every expert: the same bytes, split the other way
    assert weight_breakdown(CFG, "bf16", 4, 1)["routed_experts"] == 288 * 42 * 3 * 4096 * 320 * 2


def test_routed_experts_fp8_with_block_scales_tp8_ep8():
    # w13 [2560, 4096]: 1 B each + (2560/128 x 4096/128) fp32 scales; w2 [4096, 1280] likewise
    w13 = 2560 * 4096 + 20 * 32 * 4
    w2 = 4096 * 1280 + 32 * 10 * 4
    assert weight_breakdown(CFG, "fp8", 8, 8)["routed_experts"] == 36 * 42 * (w13 + w2)


def test_int4_group_scales_and_bf16_keep_list():
    # down_proj [4096, 1280]: 0.5 B each + one bf16 scale per 128 inputs per row
    w13 = 2560 * 4096 // 2 + 2560 * (4096 // 128) * 2
    w2 = 4096 * 1280 // 2 + 4096 * (1280 // 128) * 2
    b = weight_breakdown(CFG, "int4", 8, 8)
    assert b["routed_experts"] == 36 * 42 * (w13 + w2)
    bf = weight_breakdown(CFG, "bf16", 8, 8)
    for kept in ("embedding", "lm_head", "router", "norms"):
        assert b[kept] == bf[kept]


def test_shared_expert_split_or_replicated():
    per_layer_split = 3 * 4096 * (1280 // 8)
    assert weight_breakdown(CFG, "bf16", 8, 8)["shared_experts"] == 42 * per_layer_split * 2
    assert weight_breakdown(CFG, "bf16", 8, 8, shared_expert_replicated=True)["shared_experts"] == 42 * 3 * 4096 * 1280 * 2


def test_mtp_layers_counted_only_when_enabled():
    assert weight_breakdown(CFG, "fp8", 8, 8, mtp=0)["mtp"] == 0
    one = weight_breakdown(CFG, "fp8", 8, 8, mtp=1)["mtp"]
    assert weight_breakdown(CFG, "fp8", 8, 8, mtp=3)["mtp"] == 3 * one
    # each MTP layer: own embedding + head (vocab/8 rows each), eh_proj 2H->H, sliding attention, dense MLP
    vocab_local = 128896 // 8
    attn = ((96 // 8 * 128 + 2 * 128) * 4096 + 4096 * 96 // 8 * 128 + 96 // 8 * 4096 + 2 * 128) * 2
    mlp = 3 * 4096 * (11264 // 8) * 2
    assert one == 2 * vocab_local * 4096 * 2 + 2 * 4096 * 4096 * 2 + attn + mlp + 5 * 4096 * 2


# ---------------------------------------------------------------- buffers


def test_two_fp32_rotary_caches_at_max_position_are_0_1875_gib():
    # full layers: theta 5e6, llama3 scaling, partial rotary 0.5 -> 64 dims; sliding + MTP: theta 1e4, 128 dims.
    # get_rope shares one cache per key: [262144, rotary_dim] fp32 each.
    assert rope_cache_keys(CFG, range(48)) == {(128, 64, 5e6, True), (128, 128, 1e4, False)}
    b = buffer_breakdown(CFG, mtp=3)
    assert b["rope_cos_sin_cache"] == 262144 * (64 + 128) * 4 == 0.1875 * GiB
    # the sliding-only MTP layers add no cache; a stage holding only sliding layers has one
    assert buffer_breakdown(CFG, 0)["rope_cos_sin_cache"] == b["rope_cos_sin_cache"]
    assert buffer_breakdown(CFG, 0, layer_ids=[1, 2, 3])["rope_cos_sin_cache"] == 262144 * 128 * 4
    # GemmaRMSNorm's weight+1 copy: per layer 2 hidden + 2 head norms, final norm, 5 + 2 per MTP layer
    assert b["norm_weight_copies"] == (48 * (2 * 4096 + 2 * 128) + 4096 + 3 * 3 * 4096) * 2


def test_buffers_are_counted_in_the_static_pool():
    """The 8x H200 FP8 MTP-3 plan once left 0.02 GiB of headroom ignoring the 0.19 GiB of rotary
    caches (47 requests at 256K then, 48 with the SWA pool at SGLang's request cap, 47 again with room
    for 4 cached prefix tails per request): every plan counts them, and one request more than the auto
    concurrency does not fit."""
    p = make_plan("h200", 8, "fp8", mtp=3)
    assert p.feasible and p.concurrency == 47
    over = make_plan("h200", 8, "fp8", mtp=3, concurrency=48)
    assert not over.feasible and "weights + buffers + KV" in over.problems[0]
    for gpu in GPUS:
        for n in (1, 2, 4, 8):
            for quant in CLASSIC:
                for mtp in (0, 3):
                    p = make_plan(gpu, n, quant, mtp=mtp)
                    if p.feasible:
                        m = p.memory
                        assert m["buffers"] == buffer_breakdown(CFG, mtp)
                        assert m["weights_total"] + m["buffers_total"] + m["kv_total"] <= m["static_pool"]
                        assert m["total"] <= m["capacity"]


# ---------------------------------------------------------------- seed deployments


SEEDS = [("h200", 4, "bf16", 0), ("mi300x", 4, "bf16", 0), ("h200", 8, "fp8", 3), ("b200", 8, "fp8", 3)]


@pytest.mark.parametrize("gpu,n,quant,mtp", SEEDS)
def test_seed_deployments_are_accepted(gpu, n, quant, mtp):
    p = make_plan(gpu, n, quant, mtp=mtp)
    assert p.feasible, p.problems
    assert (p.tp, p.ep) == (n, n)
    assert p.experts_per_gpu == 288 // n and p.routed_intermediate_per_gpu == 1280
    cmd = p.command
    assert cmd[:2] == ["sglang", "serve"]
    assert cmd[cmd.index("--model-path") + 1] == ("stepfun-ai/Step-3.5-Flash-FP8" if quant == "fp8" else "stepfun-ai/Step-3.5-Flash")
    assert cmd[cmd.index("--reasoning-parser") + 1] == "step3p5"
    assert cmd[cmd.index("--tool-call-parser") + 1] == "step3p5"
    assert cmd[cmd.index("--attention-backend") + 1] == {"h200": "fa3", "b200": "fa4", "mi300x": "aiter"}[gpu]
    m = p.memory
    assert m["total"] == (
        m["weights_total"] + m["buffers_total"] + m["kv_total"] + m["runtime_reserve"] + m["prefill_activations"]
    )
    assert m["total"] <= m["capacity"] and m["headroom"] >= 0


def test_mtp3_and_mtp1_speculative_flags():
    line = " ".join(make_plan("h200", 8, "fp8", mtp=3).command)
    assert (
        "--speculative-algorithm EAGLE --speculative-num-steps 3 --speculative-eagle-topk 1 "
        "--speculative-num-draft-tokens 4 --enable-multi-layer-eagle"
    ) in line
    line = " ".join(make_plan("h200", 8, "fp8", mtp=1).command)
    assert "--speculative-num-steps 1 --speculative-eagle-topk 1 --speculative-num-draft-tokens 2" in line
    assert "--speculative" not in " ".join(make_plan("h200", 8, "fp8", mtp=0).command)


def test_fp8_on_4_and_8_gpus_replicates_the_shared_expert_without_an_all_to_all_backend():
    """1280/8 = 160 and 1280/4 = 320 cut 128-blocks: our MoE block replicates the shared expert under
    SGLang's standard dispatcher; no --moe-a2a-backend (deepep would put the clamped layers 43-44 on
    DeepGEMM, which drops Step's clamp)."""
    for n in (4, 8):
        p = make_plan("h200", n, "fp8", mtp=3)
        assert p.feasible and p.shared_expert_replicated and p.moe_a2a_backend is None
        assert "--moe-a2a-backend" not in p.command
        assert p.memory["weights"]["shared_experts"] == weight_breakdown(CFG, "fp8", n, n, shared_expert_replicated=True)["shared_experts"]
        assert f"replicated (split {n} ways it would cut fp8 blocks)" in format_plan(p)
    assert not make_plan("h200", 2, "fp8").shared_expert_replicated  # 1280/2 = 640 is 5 blocks


def test_fp8_on_amd_is_planned_under_aiter():
    """Block FP8 on AMD: the clamped layers 43-44 leave AITER per layer (ClampHonouringFp8MoEMethod),
    so the plan is feasible; a per-tensor FP8 checkpoint has no such fallback and is refused."""
    p = make_plan("mi355x", 4, "fp8")
    assert p.feasible and p.command and not p.problems
    from sglang_step35.moe.policy import clamp_runner_refusal
    from sglang_step35.moe.quant import QuantSpec

    why = clamp_runner_refusal(vendor="amd", quant=QuantSpec("fp8", 8), aiter=True, runner_backend=None,
                               clamped_layers=(43, 44))
    assert why and "43, 44" in why and "SGLANG_USE_AITER=0" in why
    assert clamp_runner_refusal(vendor="amd", quant="fp8", aiter=True, runner_backend=None, clamped_layers=(43, 44)) is None


def test_router_counted_in_fp32_as_the_model_builds_it():
    # need_fp32_gate: the gate weight is fp32 (4 B) plus the fp32 selection bias, on every GPU
    assert weight_breakdown(CFG, "bf16", 8, 8)["router"] == 42 * (288 * 4096 * 4 + 288 * 4)


def test_amd_is_always_ep_equals_tp():
    for gpu in (g for g in GPUS if GPUS[g].vendor == "amd"):
        for n in (1, 2, 4, 8):
            for quant in CLASSIC:
                p = make_plan(gpu, n, quant, context=32768)
                if p.feasible:
                    assert p.ep == p.tp and p.env == {"SGLANG_USE_AITER": "1"}


def test_fp8_never_splits_blocks():
    for gpu in GPUS:
        for n in (1, 2, 4, 8):
            p = make_plan(gpu, n, "fp8", context=32768)
            if p.feasible:
                assert p.routed_intermediate_per_gpu % 128 == 0
                assert p.shared_expert_replicated or (1280 // p.tp) % 128 == 0


def test_auto_concurrency_is_the_most_that_fits():
    p = make_plan("h200", 4, "bf16")
    assert p.auto_concurrency and p.feasible and p.concurrency >= 1
    assert not make_plan("h200", 4, "bf16", concurrency=p.concurrency + 1).feasible


# The planned --swa-full-tokens-ratio (SGLang's request cap + cached windows): tests/test_swa_ratio.py


# ---------------------------------------------------------------- infeasible plans and the CLI


def _cli(argv, capsys):
    rc = plan_main(argv)
    return rc, capsys.readouterr().out


def test_one_h100_bf16_is_infeasible_with_nearest_feasible_plan(capsys):
    rc, out = _cli(["--gpu", "h100", "--num-gpus", "1", "--quant", "bf16"], capsys)
    assert rc == 2
    assert "INFEASIBLE" in out and "static pool" in out
    assert "use 8 GPUs" in out and "sglang serve" in out
    p = make_plan("h100", 1, "bf16")
    assert not p.feasible and p.suggestions
    for s in p.suggestions:  # every suggestion is itself feasible
        args = shlex.split(s["plan_args"])[2:]
        assert plan_main(args) == 0
    capsys.readouterr()


def test_suggestions_include_fp8_and_shorter_context():
    p = make_plan("h200", 4, "bf16", concurrency=12)  # 7 fit at 256K
    changes = [s["change"] for s in p.suggestions]
    assert any(c.startswith("use 8 GPUs") for c in changes)
    assert "quantize to fp8" in changes
    assert any(c.startswith("shorten context") for c in changes)


def test_bad_tp_and_bad_mtp_are_infeasible(capsys):
    rc, out = _cli(["--gpu", "h100", "--num-gpus", "3", "--quant", "fp8"], capsys)
    assert rc == 2 and "not divisible by --tp-size 3" in out
    cfg = dict(CFG, num_nextn_predict_layers=1)
    p = make_plan("h200", 8, "fp8", mtp=3, cfg=cfg)
    assert not p.feasible and "MTP layer" in p.problems[0]


def test_json_output_parses(capsys):
    rc, out = _cli(["--gpu", "b200", "--num-gpus", "8", "--quant", "fp8", "--mtp", "3", "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert d["feasible"] and d["tp"] == 8 and d["ep"] == 8 and d["attention_backend"] == "fa4"
    assert d["command_line"].startswith("sglang serve --model-path stepfun-ai/Step-3.5-Flash-FP8")
    assert d["memory"]["weights"]["routed_experts"] > 0
    rc, out = _cli(["--gpu", "h100", "--num-gpus", "1", "--quant", "bf16", "--json"], capsys)
    assert rc == 2 and json.loads(out)["suggestions"]


def test_add_plan_parser_wires_a_subcommand(capsys):
    parser = argparse.ArgumentParser(prog="step35")
    add_plan_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["plan", "--gpu", "mi300x", "--num-gpus", "4", "--quant", "bf16"])
    assert args.func is run_plan and args.func(args) == 0
    assert "--ep 4" in capsys.readouterr().out


def test_custom_config_with_uneven_experts(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(CFG, moe_num_experts=290)))
    rc, out = _cli(["--gpu", "mi300x", "--num-gpus", "4", "--quant", "bf16", "--config", str(path)], capsys)
    assert rc == 2 and "nearest valid EP sizes: 2 or 5" in out
    # On NVIDIA bf16 the experts may be TP-split instead (Triton runs N=320): EP falls back to 1.
    p = make_plan("h200", 4, "bf16", context=32768, cfg=json.loads(path.read_text()))
    assert p.feasible and p.ep == 1 and p.routed_intermediate_per_gpu == 320


# ---------------------------------------------------------------- planned commands vs SGLang


@pytest.fixture(scope="module")
def sglang_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


CHECKPOINT_CFG = {
    "bf16": CFG,
    "fp8": dict(CFG, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}),
    "int4": dict(CFG, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128}),
}


def test_planned_commands_parse_with_sglang_and_pass_the_guard(sglang_parser):
    checked = 0
    for gpu, spec in GPUS.items():
        for n in (1, 2, 4, 8):
            for quant in CLASSIC:
                for mtp in (0, 3):
                    p = make_plan(gpu, n, quant, mtp=mtp, context=65536)
                    if not p.feasible:
                        continue
                    ns = sglang_parser.parse_args(p.command[2:])
                    assert (ns.tp_size, ns.ep_size) == (p.tp, p.ep)
                    assert ns.attention_backend == p.attention_backend
                    assert ns.mem_fraction_static == p.mem_fraction_static
                    if mtp:
                        assert ns.speculative_num_steps == 3 and ns.enable_multi_layer_eagle
                    # The planned command names the checkpoint, which carries its quantization_config.
                    decision = guard_moe_layout(
                        ns, CHECKPOINT_CFG[quant], "rocm" if spec.vendor == "amd" else "cuda",
                        aiter=p.env.get("SGLANG_USE_AITER") == "1",
                    )
                    assert decision.action == "ok", (gpu, n, quant, decision.message)
                    checked += 1
    assert checked > 40


# ---------------------------------------------------------------- generated deploy doc


def test_committed_deploy_doc_matches_generator():
    spec = importlib.util.spec_from_file_location("gen_deploy_docs", ROOT / "scripts" / "gen_deploy_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "deploy.md").read_text() == mod.render()
    for gpu, n, quant, mtp in SEEDS:
        assert f"step35 plan --gpu {gpu} --num-gpus {n} --quant {quant} --mtp {mtp}" in mod.render()

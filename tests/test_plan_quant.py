"""`step35 plan --quant` for the 8- and 4-bit formats (issue #25): each format's bytes, the TP
splits its SGLang kernels cannot run (refused by name, EP = TP where that fixes them), the
allow-list's answer per platform (asked of sglang_step35.served, never a list of the planner's own),
and every planned command parsing with SGLang's ServerArgs and passing the launch guard."""

from __future__ import annotations

import argparse
import shlex

import pytest

from sglang_step35 import served
from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.config import read_config
from sglang_step35.moe import check_moe_layout, guard_moe_layout
from sglang_step35.moe.quant import BF16, QUANTS, parse_quant
from sglang_step35.plan import make_plan
from sglang_step35.plan_cli import main as plan_main
from sglang_step35.plan_hardware import GPUS
from sglang_step35.plan_memory import weight_breakdown
from sglang_step35.plan_render import format_plan

CFG = read_config()  # Step-3.5-Flash
NEW = ("w8a8-int8", "w4a16", "w4a16-g32", "nvfp4", "mxfp4")
# Each format's quantization_config as its exporter writes it (what SGLang reads at launch).
CHECKPOINT_QC = {
    "w8a8-int8": {"quant_method": "w8a8_int8"},
    "w4a16": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128,
                                           "symmetric": True}}}},
    "w4a16-g32": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                           "symmetric": True}}}},
    "nvfp4": {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16},
    "mxfp4": {"quant_method": "quark", "global_quant_config": {"weight": {"dtype": "fp4", "qscheme": "per_group",
                                                                          "group_size": 32, "scale_format": "e8m0"}}},
}
VENDOR_GPU = {"nvidia": ("h100", "h200", "b200"), "amd": ("mi300x", "mi355x")}


def _gpus(quant: str) -> tuple[str, ...]:
    return VENDOR_GPU["amd"] if quant == "mxfp4" else VENDOR_GPU["nvidia"] if quant == "nvfp4" else (
        VENDOR_GPU["nvidia"] + VENDOR_GPU["amd"])


@pytest.mark.parametrize("quant", NEW)
def test_checkpoint_config_reads_as_the_planned_format(quant):
    """The launch guard reads the checkpoint's quantization_config; the planner plans the format by
    name: both must be one spec, or the guard would judge other bytes and splits than the plan."""
    assert parse_quant(CHECKPOINT_QC[quant]) == QUANTS[quant]


def test_format_bytes_by_hand():
    """One [1280, 4096] expert projection in each format, from the formats' public layouts."""
    out, inp = 1280, 4096
    assert QUANTS["w8a8-int8"].linear_bytes(out, inp) == out * inp + out * 4  # int8 + fp32 per channel
    assert QUANTS["w4a16"].linear_bytes(out, inp) == out * inp // 2 + out * (inp // 128) * 2  # + bf16 per 128
    assert QUANTS["w4a16-g32"].linear_bytes(out, inp) == out * inp // 2 + out * (inp // 32) * 2
    # fp4 e2m1 + one fp8-e4m3 scale per 16 inputs + fp32 weight_scale_2 and input_scale
    assert QUANTS["nvfp4"].linear_bytes(out, inp) == out * inp // 2 + out * (inp // 16) + 2 * 4
    assert QUANTS["mxfp4"].linear_bytes(out, inp) == out * inp // 2 + out * (inp // 32)  # + e8m0 per 32
    awq = parse_quant({"quant_method": "awq", "bits": 4, "group_size": 128})  # qzeros: 4 bits per group
    assert awq.linear_bytes(out, inp) == out * inp // 2 + out * (inp // 128) * 2 + out * (inp // 128) // 2


@pytest.mark.parametrize("quant", ("bf16", "fp8", *NEW))
def test_planned_weight_bytes_are_the_checkpoints_tensors_in_that_format(quant):
    """At TP 1 the plan's weights are the Flash checkpoint's tensors: every attention / MLP / expert
    projection at QuantSpec.linear_bytes, everything else as the kept-BF16 list says."""
    q = QUANTS[quant]
    want = dict.fromkeys(("attention", "dense_mlp", "routed_experts", "shared_experts", "router"), 0)
    for name, shape in checkpoint_shapes(CFG, include_mtp=False).items():
        tail = name.split(".", 3)[-1]
        if tail.startswith("self_attn.") and tail.endswith("_proj.weight"):
            want["attention"] += (BF16 if "g_proj" in tail else q).linear_bytes(*shape)
        elif tail.startswith("self_attn.") and tail.endswith("_norm.weight"):
            want["attention"] += shape[0] * 2
        elif tail.startswith("moe.") and tail.endswith("_proj.weight"):
            want["routed_experts"] += shape[0] * q.linear_bytes(*shape[1:])
        elif tail.startswith("share_expert."):
            want["shared_experts"] += q.linear_bytes(*shape)
        elif tail.startswith("mlp."):
            want["dense_mlp"] += q.linear_bytes(*shape)
        elif tail in ("moe.gate.weight", "moe.router_bias"):
            want["router"] += 4 * (shape[0] * (shape[1] if len(shape) > 1 else 1))  # fp32 gate and bias
    if quant == "fp8":
        want["attention"] += 8 * int(CFG["num_hidden_layers"])  # SGLang's fp32 k_scale / v_scale per layer
    got = weight_breakdown(CFG, q, 1, 1)
    assert {k: got[k] for k in want} == want


def test_kernel_splits_are_refused_by_name_and_fixed_by_ep():
    """1280-wide experts split 8 ways give 160 per GPU: not a multiple of NVFP4's 64 (vllm #48921),
    W4A16's 128 (Marlin's K tile) or AITER's 4-bit 256 (MXFP4); INT8 (per-channel scales) splits
    anywhere. EP = TP keeps whole experts and the shared expert goes replicated."""
    kw = dict(num_experts=288, share_expert_dim=1280, dense_intermediate_size=11264)
    v = check_moe_layout("auto", "nvfp4", 1280, 8, 1, **kw)
    assert v.routed_failed and "nvfp4: routed-expert intermediate 1280/8 = 160 per GPU is not a multiple of 64" in v.reasons[0]
    assert "ModelOptNvFp4FusedMoEMethod" in v.reasons[0]
    assert check_moe_layout("auto", "w4a16", 1280, 8, 1, **kw).routed_failed
    assert check_moe_layout("aiter", "mxfp4", 1280, 8, 1, **kw).routed_failed
    assert check_moe_layout("auto", "w8a8-int8", 1280, 8, 1, **kw).ok
    for quant, platform in (("nvfp4", "cuda"), ("w4a16", "cuda"), ("mxfp4", "rocm")):
        args = {"tp_size": 8, "ep_size": 1}
        qc = dict(CFG, quantization_config=CHECKPOINT_QC[quant])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(served, "refusals", lambda setting, flags=served.FLAGS: [])  # the layout rule alone
            d = guard_moe_layout(args, qc, platform)
        assert d.action == "switch_to_ep" and d.ep_size == 8, (quant, d.message)
    p = make_plan("h100", 8, "nvfp4", context=65536, suggest=False)
    assert (p.tp, p.ep, p.routed_intermediate_per_gpu, p.shared_expert_replicated) == (8, 8, 1280, True)


@pytest.mark.parametrize("quant", NEW)
def test_each_format_is_served_or_refused_as_the_allow_list_says(quant):
    """The planner asks served.py: a refused format's plan says "refused: <served.py's reason>" and
    still plans layout and memory (so it says what it would take); a served one emits a command."""
    for gpu in _gpus(quant):
        g = GPUS[gpu]
        label = served.quant_label(quant)
        why = served.refusals(served.Setting(g.vendor, quant=label, aiter=g.vendor == "amd",
                                             clamped_layers=(43, 44), **served.serving_flags(label)[0]))
        p = make_plan(gpu, 8, quant, context=65536, suggest=False)
        if why:
            assert not p.feasible and not p.command
            assert p.problems == [f"refused: {r}" for r in why]
            assert p.memory["headroom"] >= 0 and p.tp == 8
            assert "Fits if it were served: TP 8, EP 8" in format_plan(p)
        else:
            assert p.feasible and p.command
            words = " ".join(served.serving_flags(label)[1])
            assert words in " ".join(p.command), (quant, p.command)


def test_int4_flash_fits_one_h200_or_two_h100s_with_full_context(sglang_parser):
    """The deployment #25 asks about: 4-bit Step-3.5-Flash (W4A16) on one H200 or two H100s, one
    262,144-token request, served on SGLang's Triton int4 MoE (the runner the allow-list serves it
    on: SGLang's default would take Marlin); one H100 is too small."""
    for gpu, n in (("h200", 1), ("h100", 2)):
        p = make_plan(gpu, n, "w4a16", suggest=False)
        assert p.feasible and not p.problems and p.concurrency >= 1, p.problems
        assert p.memory["headroom"] >= 0 and p.context == 262144
        ns = sglang_parser.parse_args(shlex.split(" ".join(p.command[2:])))
        assert ns.moe_runner_backend == "triton"
        assert not served.refusals(served.Setting("nvidia", quant="w4a16", moe_runner_backend=ns.moe_runner_backend,
                                                  clamped_layers=(43, 44)))
    # Group 32 runs on the same Triton W4A16 MoE (tests/test_quant_w4a16_moe.py): served with the same flag;
    # zero points are not (their own label, refused by name).
    p = make_plan("h200", 2, "w4a16-g32", suggest=False)
    assert p.feasible and sglang_parser.parse_args(shlex.split(" ".join(p.command[2:]))).moe_runner_backend == "triton"
    assert served.quant_label({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "group_size": 128, "symmetric": False}}}}) == "w4a16-g128-asym"
    p = make_plan("h200", 8, "int4", suggest=False)  # AWQ / GPTQ: SGLang's MoeWNA16 (Triton), not Marlin
    ns = sglang_parser.parse_args(shlex.split(" ".join(p.command[2:])))
    assert p.feasible and ns.quantization == "moe_wna16"
    assert not served.refusals(served.Setting("nvidia", quant="int4", quant_method=ns.quantization,
                                              clamped_layers=(43, 44)))
    p = make_plan("h100", 1, "w4a16", suggest=False)
    assert any("needs" in x and "static pool" in x for x in p.problems)


def test_fp4_on_the_other_vendor_names_the_missing_kernels():
    assert make_plan("mi300x", 8, "nvfp4").problems == [
        "--quant nvfp4 on MI300X (amd): SGLang's ModelOpt NVFP4 MoE kernels (Marlin, FlashInfer, CUTLASS) are CUDA only"]
    assert make_plan("h200", 8, "mxfp4").problems == [
        "--quant mxfp4 on H200 (nvidia): SGLang's Quark MXFP4 MoE runs on AITER (ROCm) only"]


@pytest.fixture(scope="module")
def sglang_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.mark.parametrize("quant", NEW)
def test_commands_for_each_format_parse_with_sglang_and_pass_the_layout_guard(quant, sglang_parser, monkeypatch):
    """With the allow-list set aside (it decides serving, tested above), every command the planner
    emits for the format parses with SGLang's ServerArgs and the launch guard, reading the
    checkpoint's quantization_config, accepts its layout unchanged."""
    monkeypatch.setattr(served, "refusals", lambda setting, flags=served.FLAGS: [])
    checked = 0
    for gpu in _gpus(quant):
        g = GPUS[gpu]
        for n in (1, 2, 4, 8):
            p = make_plan(gpu, n, quant, context=65536, suggest=False)
            if not p.feasible:
                continue
            ns = sglang_parser.parse_args(shlex.split(" ".join(p.command[2:])))
            assert (ns.tp_size, ns.ep_size, ns.model_path) == (p.tp, p.ep, "$STEP35_CHECKPOINT")
            d = guard_moe_layout(ns, dict(CFG, quantization_config=CHECKPOINT_QC[quant]),
                                 "rocm" if g.vendor == "amd" else "cuda", aiter=p.env.get("SGLANG_USE_AITER") == "1")
            assert d.action == "ok", (gpu, n, d.message)
            checked += 1
    assert checked >= 4


def test_cli_plans_a_refused_format_with_its_fit(capsys):
    rc = plan_main(["--gpu", "h200", "--num-gpus", "2", "--quant", "nvfp4"])
    out = capsys.readouterr().out
    assert rc == 2 and "refused: nvfp4 experts on the SwiGLU-clamped layers 43, 44" in out
    assert "Fits if it were served: TP 2, EP 2" in out
    rc = plan_main(["--gpu", "h200", "--num-gpus", "1", "--quant", "w4a16"])
    out = capsys.readouterr().out
    assert rc == 0 and "--model-path $STEP35_CHECKPOINT" in out and "w4a16 = 0.5 B/weight" in out
    assert "--moe-runner-backend triton" in out


def test_serving_flags_are_the_launch_flags_the_served_rows_require():
    """One home: a format's extra `sglang serve` words come from the condition its served row
    requires (served.ROWS), and the Setting they build meets that condition, so a served row added
    with a launch-flag condition reaches `step35 plan`'s command without a second table."""
    checked = 0
    for row in served.ROWS:
        cond = served.CONDITIONS.get(row.when or "")
        if row.flag != served.QUANT or not row.served or cond is None or not cond.words:
            continue
        for label in row.values:
            fields, words = served.serving_flags(label)
            assert words == cond.words, (label, words)
            assert cond.holds(served.Setting(row.platforms[0], quant=label, **fields)), label
            checked += 1
    assert checked >= 2  # int4 (moe_wna16) and w4a16 (triton runner)
    assert served.serving_flags("bf16") == ({}, ())

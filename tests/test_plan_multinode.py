"""`step35 plan` past one node: multi-node TP/EP commands (one per node), pipeline stages as SGLang
splits them, replicas behind sglang_router, and the refusals. Every node's command parses with
SGLang's own ServerArgs parser and passes the MoE launch guard; the multi-node TP/EP ranks and each
pipeline stage construct our model class with the planned per-rank bytes (tests/test_plan_constructs.py's
faked platform);
the router command parses with sglang_router's own parser (sglang-router is a test dependency).

PP plans pass one gate, `model_class_pp_refusal` (no MTP with PP: the launch guard's rule).
"""

from __future__ import annotations

import argparse
import inspect

import pytest

from sglang_step35.moe import guard_moe_layout
from sglang_step35.config import read_config
from sglang_step35.launch.parallel_guard import pp_stage_layers
from sglang_step35.plan import make_plan, model_class_pp_refusal
from sglang_step35.plan_render import format_plan, plan_argv
from sglang_step35.plan_memory import buffer_breakdown, weight_breakdown
from sglang_step35.plan_cli import main as plan_main
import gpu_contract

CFG = read_config()
MULTI_NODE = [  # (gpu, GPUs per node, quant, mtp, nodes)
    ("a100-40gb", 8, "bf16", 0, 2),
    ("h100", 4, "bf16", 3, 2),
    ("h20", 8, "bf16", 0, 2),
    ("h100", 8, "bf16", 0, 2),
    ("l40s", 8, "bf16", 0, 2),
]


@pytest.fixture(scope="module")
def sglang_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


def _parse(parser, plan_obj, command):
    ns = parser.parse_args(command[2:])
    assert (ns.tp_size, ns.ep_size) == (plan_obj.tp, plan_obj.ep)
    assert ns.pp_size == plan_obj.pp and ns.mem_fraction_static == plan_obj.mem_fraction_static
    # SGLang's own checks for these sizes (validation_hook.check_server_args) and GPU count
    assert (ns.tp_size * ns.pp_size) % ns.nnodes == 0
    assert ns.tp_size * ns.pp_size == plan_obj.num_gpus * plan_obj.nodes
    # The command names the checkpoint, which carries its quantization_config (no --quantization flag).
    qc = {"fp8": {"quant_method": "fp8", "weight_block_size": [128, 128]},
          "int4": {"quant_method": "awq", "bits": 4, "group_size": 128}}.get(plan_obj.quant)
    decision = guard_moe_layout(ns, dict(CFG, quantization_config=qc) if qc else CFG, "cuda")
    assert decision.action == "ok", decision.message
    return ns


# ---------------------------------------------------------------- multi-node TP/EP


@pytest.mark.parametrize("gpu,n,quant,mtp,nodes", MULTI_NODE)
def test_multinode_commands_one_per_node_parse_with_sglang(sglang_parser, gpu, n, quant, mtp, nodes):
    p = make_plan(gpu, n, quant, mtp=mtp, nodes=nodes)
    assert p.feasible, p.problems
    assert p.tp == n * nodes and len(p.node_commands) == nodes and p.command == p.node_commands[0]["command"]
    seen = []
    for k, nc in enumerate(p.node_commands):
        ns = _parse(sglang_parser, p, nc["command"])
        assert (ns.nnodes, ns.node_rank, ns.dist_init_addr) == (nodes, k, "$NODE0_IP:5000")
        if mtp:
            assert ns.speculative_num_steps == mtp and ns.enable_multi_layer_eagle
        # the nodes differ only in --node-rank
        cmd = list(nc["command"])
        del cmd[cmd.index("--node-rank") : cmd.index("--node-rank") + 2]
        seen.append(cmd)
    assert all(c == seen[0] for c in seen)
    m = p.memory
    assert m["weights_total"] + m["buffers_total"] + m["kv_total"] <= m["static_pool"]


def test_one_node_of_a100_40gb_bf16_is_infeasible_and_two_nodes_are_suggested():
    p = make_plan("a100-40gb", 8, "bf16")
    assert not p.feasible
    assert any(s["change"] == "use 2 nodes" and "--nnodes 2" in s["command_line"] for s in p.suggestions)
    two = make_plan("a100-40gb", 8, "bf16", nodes=2)
    # TP16 EP16: 18 whole experts per GPU; the 8 KV heads are replicated (one per GPU)
    assert two.feasible and (two.tp, two.ep, two.experts_per_gpu) == (16, 16, 18)
    assert two.memory["weights"] == weight_breakdown(CFG, "bf16", 16, 16)


@pytest.fixture(scope="module")
def sglang_state():
    gpu_contract.sglang_world_of_one()


@pytest.mark.parametrize("gpu,n,quant,mtp,nodes", [MULTI_NODE[0], MULTI_NODE[1]])
def test_multinode_tp_ep_ranks_construct_with_the_planned_bytes(sglang_state, monkeypatch, gpu, n, quant, mtp, nodes):
    """Ranks on node 0 and the last node of a TP16 / TP8-over-two-nodes plan build our model with the
    per-rank parameter and buffer bytes the plan counted (reduced depth, real widths)."""
    from test_plan_constructs import REDUCED, _buffer_bytes, _build, _bytes_by_component

    p = make_plan(gpu, n, quant, mtp=mtp, nodes=nodes)
    expected = weight_breakdown(REDUCED, p.quant, p.tp, p.ep, p.mtp, shared_expert_replicated=p.shared_expert_replicated)
    for rank in (0, p.tp - 1):
        model, drafts = _build(p, rank, monkeypatch)
        got = _bytes_by_component(model.named_parameters())
        for k, v in expected.items():
            if k != "mtp":
                assert got.get(k, 0) == v, (gpu, p.tp, rank, k)
        assert sum(q.numel() * q.element_size() for d in drafts for q in d.parameters()) == expected["mtp"]
        assert _buffer_bytes(model, drafts) == buffer_breakdown(REDUCED, p.mtp)
        assert all(layer.moe.experts.num_local_experts == 288 // p.ep for layer in model.model.layers if layer.is_moe)


# ---------------------------------------------------------------- pipeline parallelism


@pytest.mark.parametrize("n,pp", [(45, 1), (45, 2), (45, 3), (45, 4), (45, 8), (4, 3), (48, 5)])
def test_stage_layers_are_sglangs_split(n, pp):
    from sglang.srt.distributed.utils import get_pp_indices

    assert [(r.start, r.stop) for r in pp_stage_layers(n, pp)] == [get_pp_indices(n, r, pp) for r in range(pp)]


def test_pp_gate_admits_our_class_and_refuses_pp_with_mtp():
    """PP plans are emitted exactly when SGLang would admit our class (model_runner.support_pp:
    forward takes pp_proxy_tensors), and never with MTP (the launch guard's rule)."""
    from sglang_step35.models.step3p5 import Step3p5ForCausalLM
    from sglang_step35.launch.parallel_guard import PP_MTP_REASON, PipelineParallelError, guard_pipeline_parallel

    assert "pp_proxy_tensors" in inspect.signature(Step3p5ForCausalLM.forward).parameters
    assert model_class_pp_refusal(2, 0) is None and model_class_pp_refusal(1, 3) is None
    why = model_class_pp_refusal(2, 3)
    assert why.startswith("--pp 2 with --mtp 3: ") and "use --mtp 0 with --pp 2" in why and "--pp 1" in why
    cfg = {"num_hidden_layers": 45, "num_nextn_predict_layers": 3}
    with pytest.raises(PipelineParallelError) as refused:  # the launcher refuses what the planner refuses
        guard_pipeline_parallel({"pp_size": 2, "speculative_algorithm": "EAGLE"}, cfg, env={})
    assert PP_MTP_REASON in why and PP_MTP_REASON in str(refused.value)  # for the same reason, worded once
    guard_pipeline_parallel({"pp_size": 2}, cfg, env={})


def test_pp_plan_per_stage_memory_and_commands(sglang_parser):
    p = make_plan("h20", 8, "fp8", nodes=2, pp=2)
    assert p.feasible, p.problems
    assert (p.tp, p.ep, p.pp) == (8, 8, 2)
    assert [s["layers"] for s in p.stages] == [[0, 22], [22, 45]]
    for k, nc in enumerate(p.node_commands):
        ns = _parse(sglang_parser, p, nc["command"])
        assert ns.pp_size == 2 and ns.disable_overlap_schedule and ns.node_rank == k and ns.nnodes == 2
    # the stages together hold the model once: embedding on the first, head + final norm on the last
    w0 = weight_breakdown(CFG, "fp8", 8, 8, layer_ids=range(0, 22), last_stage=False, shared_expert_replicated=True)
    w1 = weight_breakdown(CFG, "fp8", 8, 8, layer_ids=range(22, 45), first_stage=False, shared_expert_replicated=True)
    whole = weight_breakdown(CFG, "fp8", 8, 8, shared_expert_replicated=True)
    assert {k: w0[k] + w1[k] for k in whole} == whole
    assert w0["lm_head"] == 0 and w1["embedding"] == 0
    assert [s["weights_total"] for s in p.stages] == [sum(w0.values()), sum(w1.values())]
    # the memory shown is the stage with the least headroom, and every stage fits
    assert p.memory["headroom"] == min(s["headroom"] for s in p.stages) >= 0
    # one more request does not fit on some stage
    assert not make_plan("h20", 8, "fp8", nodes=2, pp=2, concurrency=p.concurrency + 1).feasible


def test_pp_stages_construct_with_the_planned_bytes(sglang_state, monkeypatch):
    """Each pipeline stage of a PP plan (TP ranks first and last) builds our model with the stage's
    layers and the parameter and buffer bytes the plan counted for that stage (reduced depth: 4
    layers, real widths): embedding on the first stage only, norm and lm_head on the last, other
    stages' layers missing."""
    from sglang.srt.layers.utils import PPMissingLayer
    from test_plan_constructs import REDUCED, _buffer_bytes, _build, _bytes_by_component

    p = make_plan("h20", 8, "fp8", nodes=2, pp=2)
    assert p.feasible and p.pp == 2
    stages = pp_stage_layers(int(REDUCED["num_hidden_layers"]), p.pp)
    for pp_rank, layers in enumerate(stages):
        first, last = pp_rank == 0, pp_rank == p.pp - 1
        expected = weight_breakdown(REDUCED, p.quant, p.tp, p.ep, 0, layer_ids=layers, first_stage=first,
                                    last_stage=last, shared_expert_replicated=p.shared_expert_replicated)  # fmt: skip
        for rank in (0, p.tp - 1):
            model, drafts = _build(p, rank, monkeypatch, pp_rank=pp_rank)
            assert drafts == [] and (model.start_layer, model.end_layer) == (layers.start, layers.stop)
            got = _bytes_by_component(model.named_parameters())
            for k, v in expected.items():
                assert got.get(k, 0) == v, (pp_rank, rank, k, got.get(k, 0), v)
            assert sum(got.values()) == sum(expected.values())
            held = [i for i, layer in enumerate(model.model.layers) if not isinstance(layer, PPMissingLayer)]
            assert held == list(layers)
            assert isinstance(model.model.embed_tokens, PPMissingLayer) is not first
            assert isinstance(model.lm_head, PPMissingLayer) is not last
            assert _buffer_bytes(model, drafts) == buffer_breakdown(REDUCED, 0, layer_ids=layers, last_stage=last)


def test_pp_with_mtp_is_refused_naming_both_flags():
    p = make_plan("h20", 8, "fp8", nodes=2, pp=2, mtp=3)
    assert not p.feasible and p.problems == [model_class_pp_refusal(2, 3)]


def test_fp8_tp16_is_refused_with_pp_as_the_fix():
    p = make_plan("h20", 8, "fp8", nodes=2)
    assert not p.feasible and "11264/16 = 704" in p.problems[0] and "use --pp 2" in p.problems[0]
    assert any("--pp-size 2" in s["command_line"] for s in p.suggestions)


# ---------------------------------------------------------------- refusals


def test_layouts_sglang_cannot_map_are_refused():
    p = make_plan("h100", 8, "bf16", nodes=2, pp=3)
    assert not p.feasible and "--pp 3" in p.problems[0]
    p = make_plan("h100", 4, "bf16", nodes=3, pp=2)
    assert not p.feasible and "--pp 2 with --nodes 3" in p.problems[0] and "use --pp one of" in p.problems[0]
    p = make_plan("h100", 16, "bf16")
    assert not p.feasible and "use --num-gpus 8 --nodes 2" in p.problems[0]
    p = make_plan("a100-40gb", 8, "fp8", nodes=2)
    assert not p.feasible and "--quant fp8" in p.problems[0] and "use --quant bf16" in p.problems[0]
    p = make_plan("h100", 8, "bf16", nodes=0)
    assert not p.feasible


# ---------------------------------------------------------------- replicas behind the router


def test_replicas_commands_and_router(sglang_parser):
    p = make_plan("h200", 8, "fp8", mtp=3, replicas=2)
    single = make_plan("h200", 8, "fp8", mtp=3)
    assert p.feasible and p.memory == single.memory and p.concurrency == single.concurrency
    assert [(nc["replica"], nc["node_rank"]) for nc in p.node_commands] == [(0, 0), (1, 0)]
    for nc in p.node_commands:
        ns = _parse(sglang_parser, p, nc["command"])
        assert (ns.host, ns.port, ns.nnodes) == ("0.0.0.0", 30000, 1)
    assert p.router_command[:3] == ["python", "-m", "sglang_router.launch_router"]
    from sglang_router.launch_router import parse_router_args

    args = parse_router_args(p.router_command[3:])
    assert args.worker_urls == ["http://$REPLICA0_NODE0_IP:30000", "http://$REPLICA1_NODE0_IP:30000"]
    assert (args.policy, args.port) == ("cache_aware", 8000)


def test_multinode_replicas_point_the_router_at_each_replicas_node_0(sglang_parser):
    p = make_plan("h100", 4, "bf16", nodes=2, replicas=2)
    assert p.feasible and len(p.node_commands) == 4
    for nc in p.node_commands:
        ns = _parse(sglang_parser, p, nc["command"])
        assert ns.dist_init_addr == f"$REPLICA{nc['replica']}_NODE0_IP:5000" and ns.node_rank == nc["node_rank"]
    urls = p.router_command[p.router_command.index("--worker-urls") + 1 : p.router_command.index("--policy")]
    assert urls == ["http://$REPLICA0_NODE0_IP:30000", "http://$REPLICA1_NODE0_IP:30000"]


def test_replicas_sharing_a_node_take_their_own_gpus_and_ports(sglang_parser):
    """Four TP4 replicas on two 8-GPU nodes: two per node, the second on GPUs 4-7 (`--base-gpu-id 4`)
    and port 30001; the router gets every replica once; each replica's memory plan is a single
    replica's. Layouts that cannot share a node are refused with the fix."""
    from sglang_router.launch_router import parse_router_args

    p = make_plan("h200", 4, "fp8", replicas=4, replicas_per_node=2)
    single = make_plan("h200", 4, "fp8")
    assert p.feasible and p.memory == single.memory and p.concurrency == single.concurrency
    seen = set()
    for nc in p.node_commands:
        ns = _parse(sglang_parser, p, nc["command"])
        slot = nc["replica"] % 2
        assert (ns.base_gpu_id, ns.port, ns.host, ns.nnodes) == (4 * slot, 30000 + slot, "0.0.0.0", 1)
        assert nc["host"] == f"$NODE{nc['replica'] // 2}_IP"
        seen.add((nc["host"], ns.port))
    assert len(seen) == 4  # no two replicas on one host:port
    args = parse_router_args(p.router_command[3:])
    assert args.worker_urls == [f"http://{h}:{port}" for h, port in sorted(seen)]
    out = format_plan(p)
    assert "4 replicas (2 per node)" in out and "# replica 1 on $NODE0_IP: GPUs 4-7, port 30001" in out
    assert "--replicas-per-node 2" in plan_argv(p)
    for kw, why in (
        (dict(num_gpus=8, replicas=2, replicas_per_node=2), "more than the 8 GPUs of a node; use --replicas-per-node 1"),
        (dict(num_gpus=4, replicas=3, replicas_per_node=2), "--replicas 3 is not a multiple of --replicas-per-node 2"),
        (dict(num_gpus=4, replicas=2, replicas_per_node=2, nodes=2), "only replicas that fit on part of one node"),
    ):
        bad = make_plan("h200", kw.pop("num_gpus"), "fp8", **kw)
        assert not bad.feasible and any(why in x for x in bad.problems), (kw, bad.problems)


def test_cli_flags(capsys):
    assert plan_main(["--gpu", "h100", "--num-gpus", "4", "--quant", "bf16", "--nodes", "2", "--replicas", "2"]) == 0
    out = capsys.readouterr().out
    assert "# replica 1, node 1 ($REPLICA1_NODE1_IP)" in out and "sglang_router.launch_router" in out
    assert plan_main(["--gpu", "h100", "--num-gpus", "8", "--quant", "bf16", "--nodes", "2", "--pp", "3"]) == 2
    assert "--pp 3" in capsys.readouterr().out

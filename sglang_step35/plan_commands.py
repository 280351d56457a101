"""Step 4 of ``step35 plan`` (:func:`sglang_step35.plan.make_plan`): the ``sglang serve`` command of
every node of every replica (model path, layout, memory flags, MTP, ports, GPU offsets, rendezvous)
and the sglang_router command in front of the replicas, from a plan whose layout and memory fit."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import served
from .moe.quant import QUANTS
from .plan_hardware import GPUS
from .plan_memory import CHUNKED_PREFILL, MTP_SPEC
from .platform import for_arch

if TYPE_CHECKING:
    from .plan import Plan

MODEL_PATHS = {
    "bf16": "stepfun-ai/Step-3.5-Flash",
    "fp8": "stepfun-ai/Step-3.5-Flash-FP8",
    "int4": "stepfun-ai/Step-3.5-Flash-Int4",
}
# Formats without an official Step-3.5-Flash checkpoint: the user's export, a shell variable to set.
CHECKPOINT_VAR = "$STEP35_CHECKPOINT"
SERVER_PORT = 30000  # each replica's HTTP port (SGLang's default), on its node 0
DIST_INIT_PORT = 5000  # the torch.distributed rendezvous port on a replica's node 0
ROUTER_PORT = 8000
ROUTER_POLICY = "cache_aware"  # sglang_router's prefix-cache-aware load balancing


def _host(replica: int, node: int, replicas: int, replicas_per_node: int = 1) -> str:
    """Placeholder for a node's address in the emitted commands (shell variables to set)."""
    if replicas == 1:
        return f"$NODE{node}_IP"
    if replicas_per_node > 1:  # single-node replicas, packed: replica r is on node r // replicas_per_node
        return f"$NODE{replica // replicas_per_node}_IP"
    return f"$REPLICA{replica}_NODE{node}_IP"


def serve_command(plan: Plan) -> list[str]:
    """The ``sglang serve`` words every node of every replica shares."""
    cmd = ["sglang", "serve", "--model-path", MODEL_PATHS.get(plan.quant, CHECKPOINT_VAR), "--tp", str(plan.tp), "--ep", str(plan.ep)]
    if plan.pp > 1:
        # SGLang's pipeline refuses the overlap scheduler (check_pipeline_parallel_compat).
        cmd += ["--pp-size", str(plan.pp), "--disable-overlap-schedule"]
    if plan.moe_a2a_backend:
        cmd += ["--moe-a2a-backend", plan.moe_a2a_backend]
    # What the format needs to run on the path the allow-list serves (e.g. Triton int4, not Marlin).
    cmd += list(served.serving_flags(served.quant_label(QUANTS[plan.quant]))[1])
    cmd += [
        "--attention-backend", plan.attention_backend,
        "--reasoning-parser", "step3p5",
        "--tool-call-parser", "step3p5",
        "--context-length", str(plan.context),
        "--max-running-requests", str(plan.concurrency),
        "--chunked-prefill-size", str(CHUNKED_PREFILL),
        "--mem-fraction-static", f"{plan.mem_fraction_static:.2f}",
        "--swa-full-tokens-ratio", f"{plan.swa_full_tokens_ratio:.3f}",
    ]  # fmt: skip
    if plan.mtp:
        steps, drafts = MTP_SPEC[plan.mtp]
        cmd += [
            "--speculative-algorithm", "EAGLE",
            "--speculative-num-steps", str(steps),
            "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", str(drafts),
            "--enable-multi-layer-eagle",
        ]  # fmt: skip
    return cmd


def emit_commands(plan: Plan) -> None:
    """Step 4: the environment, one ``sglang serve`` per node of every replica (ports, GPU offsets,
    rendezvous) and the router in front of the replicas."""
    g, nodes, replicas, replicas_per_node = GPUS[plan.gpu], plan.nodes, plan.replicas, plan.replicas_per_node
    if nodes > 1:
        plan.assumptions.append(
            "multi-node: inter-node communication buffers fit the same per-GPU runtime reserve; node 0's "
            f"port {DIST_INIT_PORT} reachable from the other nodes"
        )
    if for_arch(g.arch).aiter:  # the platform the plan targets (sglang_step35.platform.for_arch)
        plan.env["SGLANG_USE_AITER"] = "1"  # AITER attention + MoE kernels (what the AMD seeds run)
    cmd = serve_command(plan)
    for r in range(replicas):
        slot = r % replicas_per_node  # this replica's place on its node: GPUs and port
        port = SERVER_PORT + slot
        for k in range(nodes):
            node_cmd = list(cmd)
            if replicas > 1:
                node_cmd += ["--host", "0.0.0.0", "--port", str(port)]  # reachable by the router
            if slot:
                node_cmd += ["--base-gpu-id", str(slot * plan.num_gpus)]
            if nodes > 1:
                node_cmd += ["--nnodes", str(nodes), "--node-rank", str(k),
                             "--dist-init-addr", f"{_host(r, 0, replicas)}:{DIST_INIT_PORT}"]  # fmt: skip
            plan.node_commands.append({"replica": r, "node_rank": k, "port": port,
                                       "host": _host(r, k, replicas, replicas_per_node), "command": node_cmd})
    plan.command = plan.node_commands[0]["command"]
    if replicas > 1:
        plan.router_command = [
            "python", "-m", "sglang_router.launch_router",
            "--worker-urls", *[f"http://{nc['host']}:{nc['port']}" for nc in plan.node_commands if nc["node_rank"] == 0],
            "--policy", ROUTER_POLICY,
            "--host", "0.0.0.0",
            "--port", str(ROUTER_PORT),
        ]  # fmt: skip

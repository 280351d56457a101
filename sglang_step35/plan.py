"""Deployment planner for Step-3.5: an ``sglang serve`` command plus a per-GPU memory plan.

Every model number comes from the config (the shipped Step-3.5-Flash ``config.json`` by default,
or ``--config``); the only constants here are hardware facts (GPU memory, vendor, architecture)
and serving conventions, each stated where it is defined. A plan that would not run is reported
as infeasible with the reason and the nearest feasible plans; it never prints a broken command.

Layout policy:
* EP = TP whenever the experts divide evenly: each GPU holds whole experts (N = full expert
  intermediate), the layout of every seed deployment, and mandatory on AMD (AITER's CK MoE cannot
  run Step's TP4 split, N = 320). Pure TP only as a fallback when the experts do not divide.
* The shared expert is a dense layer split by TP. Where that split breaks the quantization blocks
  (FP8 on 4 or 8 GPUs: 1280/4 = 320, 1280/8 = 160, not multiples of 128) our MoE block replicates
  it on every GPU (:func:`sglang_step35.moe.layout.moe_block_layout`, the rule the model builds
  from) and the plan counts it whole. No all-to-all backend is emitted: on Step-3.5-Flash every
  one would run the clamped layers 43-44 on a runner that drops the clamp
  (the ``--moe-a2a-backend`` rows of :mod:`sglang_step35.served`, the allow-list every emitted
  command passes).
* More than one node: ``--num-gpus`` is per node; a replica over ``nodes`` nodes runs TP x PP =
  nodes x GPUs per node (one ``sglang serve`` per node with --nnodes/--node-rank/--dist-init-addr).
  Pipeline stages hold the layers SGLang's get_pp_indices gives them (:func:`pp_stage_layers`), each
  stage's memory is planned and the tightest one sets the concurrency; PP plans pass
  :func:`model_class_pp_refusal`. ``replicas`` are independent copies behind sglang_router.
* The rule for what TP may split is :func:`sglang_step35.moe.layout.check_moe_layout`; the same
  rules guard the server at launch, so a planned command always passes the guard, and
  tests/test_plan_constructs.py builds our model class from every planned command.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional

from . import served
from .parallel_guard import pp_mtp_refusal, pp_stage_layers
from .plan_memory import (
    CHUNKED_PREFILL,
    MTP_SPEC,
    VOCAB_PADDING,
    kv_memory,
    format_kv_pool,
    kv_pool_summary,
    pad_to,
    buffer_breakdown,
    weight_breakdown,
)
from .config import Step35ConfigError, read_config, validate
from .moe.layout import check_moe_layout, moe_block_layout, recommended_layout
from .moe.policy import clamped_moe_layers, effective_moe_backend
from .moe.quant import QUANTS

GB = 10**9  # GPU memory is sold in decimal gigabytes
GiB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """Hardware facts only."""

    key: str
    name: str
    vendor: str  # "nvidia" | "amd"
    arch: str
    memory_gb: int  # vendor spec, decimal GB


GPUS: dict[str, GpuSpec] = {
    g.key: g
    for g in (
        GpuSpec("a100-40gb", "A100 40GB", "nvidia", "ampere", 40),
        GpuSpec("a100", "A100 80GB", "nvidia", "ampere", 80),
        GpuSpec("l40s", "L40S", "nvidia", "ada", 48),
        GpuSpec("h20", "H20", "nvidia", "hopper", 96),
        GpuSpec("h100", "H100 SXM", "nvidia", "hopper", 80),
        GpuSpec("h200", "H200", "nvidia", "hopper", 141),
        GpuSpec("b200", "B200", "nvidia", "blackwell", 180),  # DGX/HGX B200: 1,440 GB over 8 GPUs
        GpuSpec("mi300x", "MI300X", "amd", "cdna3", 192),
        GpuSpec("mi325x", "MI325X", "amd", "cdna3", 256),
        GpuSpec("mi350x", "MI350X", "amd", "cdna4", 288),
        GpuSpec("mi355x", "MI355X", "amd", "cdna4", 288),
    )
}

# The platform each GPU architecture stands for when the planner asks the attention rule
# (sglang_step35.attention.select, the same function the launch hook calls): a deployment node has
# SGLang's default kernels installed (flashinfer on NVIDIA, AITER on AMD).
_ARCH_PLATFORM = {
    "ampere": dict(kind="nvidia", compute_capability=(8, 0), flashinfer_available=True),
    "ada": dict(kind="nvidia", compute_capability=(8, 9), flashinfer_available=True),
    "hopper": dict(kind="nvidia", compute_capability=(9, 0), flashinfer_available=True),
    "blackwell": dict(kind="nvidia", compute_capability=(10, 0), flashinfer_available=True),
    "cdna3": dict(kind="amd", gcn_arch="gfx942", aiter_available=True),
    "cdna4": dict(kind="amd", gcn_arch="gfx950", aiter_available=True),
}


def attention_backend_for(arch: str) -> str:
    """The attention backend the launch hook would pick on `arch` for Step-3.5 (sliding layers)."""
    from sglang_step35.attention.select import PlatformInfo, choose_attention_backend

    return choose_attention_backend(PlatformInfo(**_ARCH_PLATFORM[arch]), None, True).backend


# Block-FP8 needs FP8 tensor cores (sm89+); Ampere has none. Not planned there.
NO_FP8_ARCHS = frozenset({"ampere"})

MODEL_PATHS = {
    "bf16": "stepfun-ai/Step-3.5-Flash",
    "fp8": "stepfun-ai/Step-3.5-Flash-FP8",
    "int4": "stepfun-ai/Step-3.5-Flash-Int4",
}
MAX_GPUS_PER_NODE = 8  # GPUs one node holds; more GPUs are more nodes (--nodes)
SERVER_PORT = 30000  # each replica's HTTP port (SGLang's default), on its node 0
DIST_INIT_PORT = 5000  # the torch.distributed rendezvous port on a replica's node 0
ROUTER_PORT = 8000
ROUTER_POLICY = "cache_aware"  # sglang_router's prefix-cache-aware load balancing
# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------


@dataclass
class Plan:
    gpu: str
    num_gpus: int
    quant: str
    mtp: int
    context: int
    concurrency: int
    feasible: bool
    auto_concurrency: bool = False  # concurrency was chosen as the most that fits
    problems: list[str] = field(default_factory=list)
    tp: Optional[int] = None
    ep: Optional[int] = None
    attention_backend: Optional[str] = None
    moe_a2a_backend: Optional[str] = None
    experts_per_gpu: Optional[int] = None
    routed_intermediate_per_gpu: Optional[int] = None
    shared_expert_replicated: bool = False
    mem_fraction_static: Optional[float] = None
    swa_full_tokens_ratio: Optional[float] = None
    kv_pool: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # bytes per GPU
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    nodes: int = 1  # nodes per replica
    pp: int = 1
    replicas: int = 1
    replicas_per_node: int = 1  # > 1: replicas share a node, each on its own GPUs (--base-gpu-id) and port
    stages: list[dict[str, Any]] = field(default_factory=list)  # per pipeline stage (pp > 1)
    # one entry per node of every replica: {"replica", "node_rank", "host", "command"}; `command`
    # above is replica 0's node 0
    node_commands: list[dict[str, Any]] = field(default_factory=list)
    router_command: list[str] = field(default_factory=list)  # sglang_router in front of the replicas

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["command_line"] = command_line(self)
        return d


ASSUMPTIONS = [
    "bf16 kept for embeddings, LM heads, router (+ fp32 bias), norms, attention g_proj and MTP layers; "
    "fp8 = 1 B/weight + one fp32 scale per 128x128 block; int4 = 0.5 B/weight + one bf16 scale per 128 inputs",
    "SGLang 0.5.23 gives each MTP layer its own embedding and LM head (counted per GPU, split by TP)",
    "KV cache bf16; full layers keep every token; the sliding layers' pool (--swa-full-tokens-ratio) holds "
    "SGLang's compute_swa_request_cap (window + eviction interval x draft tokens + page + decode allocation "
    "per request, two prefill chunks) plus one cached window per request; the MTP draft pool is sized like "
    "the target's full pool (sglang #17630)",
    "buffers in the static pool: one fp32 rotary cos/sin cache per distinct (rotary dim, theta) at "
    "max_position_embeddings (SGLang's get_rope shares them across layers and the MTP drafts), and the "
    "weight+1 copy GemmaRMSNorm keeps of every norm",
    "margin outside --mem-fraction-static = max(10% of GPU memory, 8 GiB) for CUDA/HIP graphs, NCCL/RCCL "
    "buffers and fragmentation, plus one prefill chunk's activations (fp32 logits over the local vocabulary, "
    "top-k gate/up rows, 8 hidden-size bf16 temporaries per token)",
]


def model_class_pp_refusal(pp_size: int, mtp: int) -> Optional[str]:
    """Why our model class cannot serve ``--pp-size pp_size`` (with ``mtp`` drafts), or None.

    The single gate every pipeline-parallel plan passes: Step3p5ForCausalLM takes part in SGLang's
    pipeline (its forward takes ``pp_proxy_tensors``), but not with MTP drafts -- the launch guard's
    rule (:func:`sglang_step35.parallel_guard.pp_mtp_refusal`), worded with the planner's flags."""
    return pp_mtp_refusal(pp_size, f"--mtp {mtp}" if mtp else None, pp_flag="--pp",
                          drop=f"use --mtp 0 with --pp {pp_size}",
                          keep=f"keep --mtp {mtp} with --pp 1 and the GPUs in tensor/expert parallel")


def _margin_bytes(cfg: Mapping, gpu: GpuSpec, tp: int, routed_n: int) -> tuple[int, int]:
    mem = gpu.memory_gb * GB
    reserve = max(int(0.10 * mem), 8 * GiB)
    h, v, k = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["moe_top_k"])
    per_token = pad_to(v, VOCAB_PADDING) // tp * 4 + k * 2 * routed_n * 2 + 8 * h * 2
    return reserve, CHUNKED_PREFILL * per_token


def _host(replica: int, node: int, replicas: int, replicas_per_node: int = 1) -> str:
    """Placeholder for a node's address in the emitted commands (shell variables to set)."""
    if replicas == 1:
        return f"$NODE{node}_IP"
    if replicas_per_node > 1:  # single-node replicas, packed: replica r is on node r // replicas_per_node
        return f"$NODE{replica // replicas_per_node}_IP"
    return f"$REPLICA{replica}_NODE{node}_IP"


def make_plan(
    gpu: str,
    num_gpus: int,
    quant: str,
    *,
    nodes: int = 1,
    pp: int = 1,
    replicas: int = 1,
    replicas_per_node: int = 1,
    mtp: int = 0,
    context: Optional[int] = None,
    concurrency: Optional[int] = None,
    cfg: Optional[Mapping] = None,
    suggest: bool = True,
) -> Plan:
    """Plan ``replicas`` x ``nodes`` x ``num_gpus`` x ``gpu`` for ``quant``; infeasible plans carry
    problems and suggestions.

    ``num_gpus`` are the GPUs of one node; one replica spans ``nodes`` nodes as TP x PP with
    TP = nodes x num_gpus / pp (EP = TP where the experts divide). ``replicas`` > 1 serves the
    same replica on separate nodes behind sglang_router, or ``replicas_per_node`` of them on one node
    (each on its own ``num_gpus`` GPUs, from ``--base-gpu-id``, and its own port). ``context`` defaults to the config's
    max_position_embeddings; ``concurrency`` (requests at full context, per replica) defaults to
    as many as fit in memory on every pipeline stage.
    """
    cfg = read_config() if cfg is None else cfg
    g = GPUS[gpu]
    max_ctx = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len"))
    context = max_ctx if context is None else int(context)
    plan = Plan(gpu, num_gpus, quant, mtp, context, concurrency or 0, feasible=False, assumptions=list(ASSUMPTIONS),
                nodes=nodes, pp=pp, replicas=replicas, replicas_per_node=replicas_per_node)  # fmt: skip
    plan.auto_concurrency = concurrency is None
    q = QUANTS[quant]
    problems = plan.problems
    n_layers = int(cfg["num_hidden_layers"])
    if not 1 <= num_gpus <= MAX_GPUS_PER_NODE:
        fix = f"; use --num-gpus {MAX_GPUS_PER_NODE} --nodes {-(-num_gpus // MAX_GPUS_PER_NODE)}" if num_gpus > 0 else ""
        problems.append(f"--num-gpus {num_gpus}: GPUs per node are 1..{MAX_GPUS_PER_NODE}{fix}")
    if nodes < 1 or replicas < 1 or pp < 1 or replicas_per_node < 1:
        problems.append(f"--nodes {nodes} --pp {pp} --replicas {replicas} --replicas-per-node {replicas_per_node}: "
                        "each must be >= 1")
    elif replicas_per_node > 1:
        if nodes > 1:
            problems.append(f"--replicas-per-node {replicas_per_node} with --nodes {nodes}: only replicas that fit "
                            "on part of one node share it; use --replicas-per-node 1")
        elif num_gpus * replicas_per_node > MAX_GPUS_PER_NODE:
            problems.append(f"--replicas-per-node {replicas_per_node} x --num-gpus {num_gpus}: more than the "
                            f"{MAX_GPUS_PER_NODE} GPUs of a node; use --replicas-per-node "
                            f"{max(1, MAX_GPUS_PER_NODE // num_gpus)}")
        elif replicas % replicas_per_node:
            problems.append(f"--replicas {replicas} is not a multiple of --replicas-per-node {replicas_per_node} "
                            "(every node holds the same number of replicas)")
    tp = num_gpus * nodes // pp if pp >= 1 and nodes >= 1 else 0
    if not problems:
        if (num_gpus * nodes) % pp:
            problems.append(f"--pp {pp}: does not divide the {num_gpus * nodes} GPUs of a replica (nodes x GPUs per node)")
        elif pp % nodes and nodes % pp:
            # SGLang places pp_size // nnodes whole stages on a node, or one stage over
            # nnodes // pp_size nodes (data_parallel_controller.py); anything else leaves GPUs unmapped.
            ok = sorted({d for d in range(1, 4 * nodes + 1) if d % nodes == 0 or nodes % d == 0}
                        & {d for d in range(1, num_gpus * nodes + 1) if (num_gpus * nodes) % d == 0})  # fmt: skip
            problems.append(
                f"--pp {pp} with --nodes {nodes}: SGLang puts whole pipeline stages on a node (pp a multiple of "
                f"nodes) or one stage over whole nodes (nodes a multiple of pp); use --pp one of {ok}"
            )
        elif pp > n_layers:
            problems.append(f"--pp {pp}: more stages than the {n_layers} decoder layers; use --pp {n_layers} or fewer")
    if context > max_ctx or context < 1:
        problems.append(f"--context {context} is outside 1..{max_ctx} (max_position_embeddings)")
    if concurrency is not None and concurrency < 1:
        problems.append("--concurrency must be >= 1")
    n_mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    if mtp and (mtp not in MTP_SPEC or mtp > n_mtp):
        problems.append(f"--mtp {mtp}: the config has {n_mtp} MTP layer(s); use one of {[m for m in MTP_SPEC if m <= n_mtp] or [0]}")
    if quant == "fp8" and g.arch in NO_FP8_ARCHS:
        problems.append(
            f"--quant fp8 on {g.name} ({g.arch}): no FP8 tensor cores for the block-FP8 checkpoint; use --quant bf16"
        )
    if not problems and pp > 1:
        why = model_class_pp_refusal(pp, mtp)
        if why:
            problems.append(why)
    if not problems:
        try:
            validate(cfg, tp)
        except Step35ConfigError as e:
            problems.append(f"--tp {tp}: {e}")
    backend = effective_moe_backend("auto", g.vendor)
    if not problems:
        # What the command below runs, judged by the allow-list the launch guard and the model ask
        # (sglang_step35.served): the default runner, no all-to-all backend, no EPLB; the AMD plans
        # run SGLANG_USE_AITER=1 (set below).
        problems += served.refusals(served.Setting(
            g.vendor, quant=served.quant_label(q), aiter=g.vendor == "amd", clamped_layers=clamped_moe_layers(cfg)
        ))
    rec = None if problems else recommended_layout(cfg, tp, q, g.vendor, backend)
    if not problems and rec is None:
        verdict = check_moe_layout(
            backend, q, int(cfg["moe_intermediate_size"]), tp, tp, num_experts=int(cfg["moe_num_experts"]),
            share_expert_dim=cfg.get("share_expert_dim"), dense_intermediate_size=cfg.get("intermediate_size"),
        )
        fix = f"; use --pp {nodes} to keep TP {num_gpus} inside each node" if nodes > 1 and pp == 1 else ""
        problems.append(f"no MoE layout runs {quant} on --tp {tp}: " + "; ".join(verdict.reasons) + fix)
    if problems:
        if suggest:
            plan.suggestions = _suggestions(plan, cfg)
        return plan

    ep, flags = rec
    a2a = None  # recommended_layout never needs one (see the module notes)
    plan.tp, plan.ep, plan.moe_a2a_backend = tp, ep, a2a
    block = moe_block_layout(a2a_backend=a2a, quant=q, share_expert_dim=cfg.get("share_expert_dim"), tp_size=tp)
    plan.shared_expert_replicated = block.shared_expert_replicated
    plan.attention_backend = attention_backend_for(g.arch)
    E, inter = int(cfg["moe_num_experts"]), int(cfg["moe_intermediate_size"])
    plan.experts_per_gpu = E // ep
    plan.routed_intermediate_per_gpu = inter // (tp // ep)

    stages = pp_stage_layers(n_layers, pp)
    reserve, activations = _margin_bytes(cfg, g, tp, plan.routed_intermediate_per_gpu)
    capacity = g.memory_gb * GB
    fraction = math.floor((capacity - reserve - activations) / capacity * 100) / 100
    static_pool = int(fraction * capacity)
    per_stage = []
    for r, layers in enumerate(stages):
        first, last = r == 0, r == pp - 1
        w = weight_breakdown(cfg, q, tp, ep, mtp if last else 0, shared_expert_replicated=plan.shared_expert_replicated,
                             layer_ids=layers, first_stage=first, last_stage=last)  # fmt: skip
        b = buffer_breakdown(cfg, mtp if last else 0, layer_ids=layers, last_stage=last)
        per_stage.append((layers, w, b, sum(w.values()) + sum(b.values())))  # resident: allocated at load

    def stage_kv(layers, c: int) -> dict[str, Any]:
        return kv_memory(cfg, tp, mtp, context, c, layer_ids=layers)

    if concurrency is None:
        # As many full-context requests as the static pool of every stage holds.
        def fits(c: int) -> bool:
            return all(stage_kv(layers, c)["kv_total"] + resident <= static_pool for layers, _, _, resident in per_stage)

        lo, hi = 0, 1
        while fits(hi) and hi < 1 << 16:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        concurrency = plan.concurrency = max(lo, 1)
    # The memory shown is the stage with the least headroom (the only one without PP).
    summaries = []
    for layers, w, b, resident in per_stage:
        kv = stage_kv(layers, concurrency)
        summaries.append((static_pool - resident - kv["kv_total"], layers, w, b, resident, kv))
    _, layers, weights, buffers, resident, kv = min(summaries, key=lambda t: t[0])
    weights_total = sum(weights.values())
    need = resident + kv["kv_total"]
    plan.mem_fraction_static, plan.swa_full_tokens_ratio = fraction, kv.pop("swa_full_tokens_ratio")
    plan.memory = {
        "weights": weights,
        "weights_total": weights_total,
        "buffers": buffers,
        "buffers_total": sum(buffers.values()),
        **kv,
        "runtime_reserve": reserve,
        "prefill_activations": activations,
        "static_pool": static_pool,
        "total": need + reserve + activations,
        "capacity": capacity,
        "headroom": static_pool - need,
    }
    if pp > 1:
        plan.memory["stage_layers"] = [layers.start, layers.stop]
        plan.stages = [
            {"pp_rank": r, "layers": [stage.start, stage.stop], "weights_total": sum(w.values()), "buffers_total": sum(b.values()),
             "kv_total": s_kv["kv_total"], "headroom": head}
            for r, (head, stage, w, b, _, s_kv) in enumerate(summaries)
        ]  # fmt: skip
    if need > static_pool:
        where = f" (pipeline stage with layers {layers.start}-{layers.stop - 1})" if pp > 1 else ""
        problems.append(
            f"needs {need / GiB:.1f} GiB per GPU for weights + buffers + KV ({concurrency} x {context:,} tokens){where} "
            f"but {g.name}'s static pool is {static_pool / GiB:.1f} GiB ({fraction:.2f} x {g.memory_gb} GB)"
        )
        if suggest:
            plan.suggestions = _suggestions(plan, cfg)
        return plan

    plan.feasible = True
    if pp == 1:
        plan.kv_pool = kv_pool_summary(cfg, static_pool - resident, plan.swa_full_tokens_ratio, tp, mtp)
    if nodes > 1:
        plan.assumptions.append(
            "multi-node: inter-node communication buffers fit the same per-GPU runtime reserve; node 0's "
            f"port {DIST_INIT_PORT} reachable from the other nodes"
        )
    if g.vendor == "amd":
        plan.env["SGLANG_USE_AITER"] = "1"  # AITER attention + MoE kernels (what the AMD seeds run)
    cmd = ["sglang", "serve", "--model-path", MODEL_PATHS[quant], "--tp", str(tp), "--ep", str(ep)]
    if pp > 1:
        # SGLang's pipeline refuses the overlap scheduler (check_pipeline_parallel_compat).
        cmd += ["--pp-size", str(pp), "--disable-overlap-schedule"]
    if a2a:
        cmd += ["--moe-a2a-backend", a2a]
    cmd += [
        "--attention-backend", plan.attention_backend,
        "--reasoning-parser", "step3p5",
        "--tool-call-parser", "step3p5",
        "--context-length", str(context),
        "--max-running-requests", str(concurrency),
        "--chunked-prefill-size", str(CHUNKED_PREFILL),
        "--mem-fraction-static", f"{plan.mem_fraction_static:.2f}",
        "--swa-full-tokens-ratio", f"{plan.swa_full_tokens_ratio:.3f}",
    ]  # fmt: skip
    if mtp:
        steps, drafts = MTP_SPEC[mtp]
        cmd += [
            "--speculative-algorithm", "EAGLE",
            "--speculative-num-steps", str(steps),
            "--speculative-eagle-topk", "1",
            "--speculative-num-draft-tokens", str(drafts),
            "--enable-multi-layer-eagle",
        ]  # fmt: skip
    for r in range(replicas):
        slot = r % replicas_per_node  # this replica's place on its node: GPUs and port
        port = SERVER_PORT + slot
        for k in range(nodes):
            node_cmd = list(cmd)
            if replicas > 1:
                node_cmd += ["--host", "0.0.0.0", "--port", str(port)]  # reachable by the router
            if slot:
                node_cmd += ["--base-gpu-id", str(slot * num_gpus)]
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
    return plan


def _suggestions(plan: Plan, cfg: Mapping) -> list[dict[str, Any]]:
    """Nearest feasible plans, one per kind of change: more GPUs, cheaper weights, shorter
    context, fewer concurrent requests (each keeps every other setting)."""
    base = dict(gpu=plan.gpu, num_gpus=plan.num_gpus, quant=plan.quant, mtp=plan.mtp, context=plan.context,
                nodes=plan.nodes, pp=plan.pp, replicas=plan.replicas, replicas_per_node=plan.replicas_per_node,
                concurrency=None if plan.auto_concurrency else plan.concurrency)  # fmt: skip
    tries: list[tuple[str, dict]] = []
    tries += [(f"use {n} GPUs", {"num_gpus": n}) for n in (1, 2, 4, 8) if n > plan.num_gpus]
    if plan.num_gpus > MAX_GPUS_PER_NODE:
        n = -(-plan.num_gpus // MAX_GPUS_PER_NODE)
        tries += [(f"use {n} nodes of {MAX_GPUS_PER_NODE} GPUs", {"num_gpus": MAX_GPUS_PER_NODE, "nodes": n})]
    tries += [(f"use {n} nodes", {"nodes": n}) for n in (2, 4) if n > plan.nodes and plan.num_gpus <= MAX_GPUS_PER_NODE]
    if plan.nodes > 1 and plan.pp == 1:
        tries.append((f"pipeline over the {plan.nodes} nodes (--pp {plan.nodes})", {"pp": plan.nodes}))
    tries += [(f"pipeline over {n} nodes (--pp {n})", {"pp": n, "nodes": n}) for n in (2, 4)
              if n > plan.nodes and plan.num_gpus <= MAX_GPUS_PER_NODE]  # fmt: skip
    tries += [(f"quantize to {qn}", {"quant": qn}) for qn in ("fp8", "int4") if qn != plan.quant and
              list(QUANTS).index(qn) > list(QUANTS).index(plan.quant)]  # fmt: skip
    ctx = plan.context
    while ctx > 4096:
        ctx //= 2
        tries.append((f"shorten context to {ctx}", {"context": ctx}))
    conc = 1 if plan.auto_concurrency else plan.concurrency  # auto already tried every concurrency
    while conc > 1:
        conc //= 2
        tries.append((f"serve {conc} concurrent requests", {"concurrency": conc}))
    out, kinds = [], set()
    for label, change in tries:
        kind = next(iter(change))
        if kind in kinds:
            continue
        args = {**base, **change}
        p = make_plan(args.pop("gpu"), args.pop("num_gpus"), args.pop("quant"), cfg=cfg, suggest=False, **args)
        if p.feasible:
            kinds.add(kind)
            out.append({"change": label, "plan_args": plan_argv(p), "command_line": command_line(p)})
    return out


def plan_argv(p: Plan) -> str:
    args = f"step35 plan --gpu {p.gpu} --num-gpus {p.num_gpus} --quant {p.quant} --mtp {p.mtp}"
    for flag, v in (("--nodes", p.nodes), ("--pp", p.pp), ("--replicas", p.replicas),
                    ("--replicas-per-node", p.replicas_per_node)):
        if v != 1:
            args += f" {flag} {v}"
    return args + f" --context {p.context} --concurrency {p.concurrency}"


def command_line(p: Plan, multiline: bool = False, command: Optional[list[str]] = None, env: bool = True) -> str:
    """``command`` (default: replica 0's node 0) as a shell line, prefixed with the plan's env."""
    command = p.command if command is None else command
    if not command:
        return ""
    env_words = [f"{k}={v}" for k, v in p.env.items()] if env else []
    head_n = 4 if command[:2] == ["python", "-m"] else 2
    if not multiline:
        return " ".join(env_words + command)
    head = " ".join(env_words + command[:head_n])
    rest, lines, i = command[head_n:], [], 0
    while i < len(rest):
        # keep "--flag value" on one line; bare flags stand alone
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            j = i + 1  # a flag and all its values (--worker-urls takes several)
            while j < len(rest) and not rest[j].startswith("--"):
                j += 1
            lines.append(" ".join(rest[i:j]))
            i = j
        else:
            lines.append(rest[i])
            i += 1
    return " \\\n  ".join([head] + lines)


def _gib(b: int) -> str:
    return f"{b / GiB:8.2f}"


def _shared_placement(p: Plan) -> str:
    if not p.shared_expert_replicated:
        return "split by TP"
    if p.moe_a2a_backend:
        return f"replicated ({p.moe_a2a_backend} all-to-all)"
    return f"replicated (split {p.tp} ways it would cut {p.quant} blocks)"


def format_plan(p: Plan) -> str:
    """Human-readable plan (what ``step35 plan`` prints)."""
    g = GPUS[p.gpu]
    where = f"{p.num_gpus}x {g.name} ({g.memory_gb} GB)"
    if p.nodes > 1:
        where = f"{p.nodes} nodes x {where}"
    if p.replicas > 1:
        per_node = f" ({p.replicas_per_node} per node)" if p.replicas_per_node > 1 else ""
        where = f"{p.replicas} replicas{per_node} x {where}"
    title = f"Step-3.5 on {where}, {p.quant}, context {p.context:,} x {p.concurrency} requests" + (
        " per replica" if p.replicas > 1 else ""
    ) + f", MTP {p.mtp}" + (f", PP {p.pp}" if p.pp > 1 else "")
    lines = [title, ""]
    if not p.feasible:
        lines.append("INFEASIBLE:")
        lines += [f"  - {x}" for x in p.problems]
        if p.suggestions:
            lines += ["", "Nearest feasible plans:"]
            for s in p.suggestions:
                lines += [f"  - {s['change']}: {s['plan_args']}", f"      {s['command_line']}"]
        else:
            lines += ["", "No nearby feasible plan found."]
        return "\n".join(lines) + "\n"
    m, w = p.memory, p.memory["weights"]
    if len(p.node_commands) == 1:
        lines += [command_line(p, multiline=True), ""]
    else:
        hosts = sorted({nc["host"] for nc in p.node_commands})
        lines += [f"Set {', '.join(h.lstrip('$') for h in hosts)} to the nodes' addresses; run on each node:", ""]
        for nc in p.node_commands:
            if p.replicas_per_node > 1:
                first = (nc["replica"] % p.replicas_per_node) * p.num_gpus
                head = (f"# replica {nc['replica']} on {nc['host']}: GPUs {first}-{first + p.num_gpus - 1}, "
                        f"port {nc['port']}")  # fmt: skip
            else:
                label = f"replica {nc['replica']}, " if p.replicas > 1 else ""
                head = f"# {label}node {nc['node_rank']} ({nc['host']})"
            lines += [head, command_line(p, True, nc["command"]), ""]
    if p.router_command:
        lines += [
            f"# router (pip install sglang-router), in front of the {p.replicas} replicas; clients use port {ROUTER_PORT}",
            command_line(p, True, p.router_command, env=False),
            "",
        ]
    whole = "whole experts" if p.tp == p.ep else f"each split {p.tp // p.ep} ways"
    lines.append(
        f"Layout: TP {p.tp}, EP {p.ep}: {p.experts_per_gpu} routed experts per GPU ({whole}, "
        f"N={p.routed_intermediate_per_gpu}); shared expert "
        f"{_shared_placement(p)}; "
        f"attention {p.attention_backend}"
    )
    if p.pp > 1:
        lines.append(f"Pipeline: {p.pp} stages, as SGLang splits the {sum(s['layers'][1] - s['layers'][0] for s in p.stages)} layers:")
        for s in p.stages:
            lines.append(
                f"  stage {s['pp_rank']}: layers {s['layers'][0]}-{s['layers'][1] - 1}, weights {s['weights_total'] / GiB:.2f} GiB, "
                f"KV {s['kv_total'] / GiB:.2f} GiB, headroom {s['headroom'] / GiB:.2f} GiB per GPU"
            )
    lines += ["", "Memory per GPU (GiB)" + (
        f", stage with the least headroom (layers {m['stage_layers'][0]}-{m['stage_layers'][1] - 1}):" if p.pp > 1 else ":"
    )]
    for k, v in w.items():
        lines.append(f"  {('weights: ' + k):30s}{_gib(v)}")
    lines.append(f"  {'weights total':30s}{_gib(m['weights_total'])}")
    for k, v in m["buffers"].items():
        lines.append(f"  {('buffers: ' + k):30s}{_gib(v)}")
    lines.append(f"  {'KV full-attention layers':30s}{_gib(m['kv_full_layers'])}")
    lines.append(f"  {'KV sliding-window layers':30s}{_gib(m['kv_sliding_layers'])}")
    if p.mtp:
        lines.append(f"  {'KV MTP draft layers':30s}{_gib(m['kv_mtp_draft'])}")
    lines.append(f"  {'runtime reserve':30s}{_gib(m['runtime_reserve'])}")
    lines.append(f"  {'prefill activations':30s}{_gib(m['prefill_activations'])}")
    lines.append(f"  {'total':30s}{_gib(m['total'])}   of {m['capacity'] / GiB:.2f} GiB")
    lines.append(
        f"  {'headroom in static pool':30s}{_gib(m['headroom'])}   "
        f"(--mem-fraction-static {p.mem_fraction_static:.2f}, --swa-full-tokens-ratio {p.swa_full_tokens_ratio:.3f})"
    )
    lines += format_kv_pool(p.kv_pool)
    lines += ["", "Assumptions:"] + [f"  - {a}" for a in p.assumptions]
    return "\n".join(lines) + "\n"

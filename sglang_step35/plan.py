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

:func:`make_plan` runs four named steps: :func:`check_request`, :func:`choose_layout`,
:func:`fit_memory` (arithmetic in :mod:`.plan_memory`) and :func:`~.plan_commands.emit_commands`.
Hardware facts are in :mod:`.plan_hardware`; how a plan is shown (text, JSON, nearest feasible
plans) in :mod:`.plan_render`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from . import served
from .launch.parallel_guard import pp_mtp_refusal, pp_stage_layers
from .platform import for_arch
from .plan_memory import (
    CHUNKED_PREFILL,
    MTP_SPEC,
    VOCAB_PADDING,
    kv_memory,
    kv_pool_summary,
    pad_to,
    buffer_breakdown,
    weight_breakdown,
)
from .config import Step35ConfigError, read_config, validate
from .moe.layout import check_moe_layout, moe_block_layout, recommended_layout
from .moe.policy import clamped_moe_layers, effective_moe_backend
from .moe.quant import QUANTS
from .plan_commands import CHECKPOINT_VAR, emit_commands
from .plan_hardware import GB, GPUS, MAX_GPUS_PER_NODE, GiB, GpuSpec, attention_backend_for, format_refusal

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

ASSUMPTIONS = [
    "bf16 kept for embeddings, LM heads, router (+ fp32 bias), norms, attention g_proj and MTP layers; "
    "fp8 = 1 B/weight + one fp32 scale per 128x128 block; int4 = 0.5 B/weight + one bf16 scale per 128 inputs",
    "SGLang 0.5.23 gives each MTP layer its own embedding and LM head (counted per GPU, split by TP)",
    "KV cache bf16; full layers keep every token; the sliding layers' pool (--swa-full-tokens-ratio) holds "
    "SGLang's compute_swa_request_cap (window + eviction interval x draft tokens + page + decode allocation "
    "per request, two prefill chunks) plus four cached windows per running request (SGLang's "
    "--swa-prefix-tails default); the MTP draft pool is sized like the target's full pool (sglang #17630)",
    "buffers in the static pool: one fp32 rotary cos/sin cache per distinct (rotary dim, theta) at "
    "max_position_embeddings (SGLang's get_rope shares them across layers and the MTP drafts), and the "
    "weight+1 copy GemmaRMSNorm keeps of every norm",
    "margin outside --mem-fraction-static = max(10% of GPU memory, 8 GiB) for CUDA/HIP graphs, NCCL/RCCL "
    "buffers and fragmentation, plus one prefill chunk's activations (fp32 logits over the local vocabulary, "
    "top-k gate/up rows, 8 hidden-size bf16 temporaries per token)",
]


# What each format beyond bf16 / fp8 / int4 stores (moe/quant.py's QuantSpec), stated in its plans.
FORMAT_NOTES = {
    "w8a8-int8": "w8a8-int8 = 1 B/weight + one fp32 scale per output channel (activations quantized per token "
                 "at run time)",
    "w4a16": "w4a16 = 0.5 B/weight (int4, 8 per int32) + one bf16 scale per 128 inputs, symmetric (AWQ/GPTQ "
             "checkpoints add a packed 4-bit zero point per group)",
    "w4a16-g32": "w4a16-g32 = 0.5 B/weight (int4, 8 per int32) + one bf16 scale per 32 inputs, symmetric",
    "nvfp4": "nvfp4 = 0.5 B/weight (fp4 e2m1) + one fp8-e4m3 scale per 16 inputs + fp32 weight_scale_2 and "
             "input_scale per weight (ModelOpt MIXED_PRECISION keeps some dense layers FP8: counted as NVFP4)",
    "mxfp4": "mxfp4 = 0.5 B/weight (fp4 e2m1) + one e8m0 scale per 32 inputs",
}


def model_class_pp_refusal(pp_size: int, mtp: int) -> Optional[str]:
    """Why our model class cannot serve ``--pp-size pp_size`` (with ``mtp`` drafts), or None.

    The single gate every pipeline-parallel plan passes: Step3p5ForCausalLM takes part in SGLang's
    pipeline (its forward takes ``pp_proxy_tensors``), but not with MTP drafts -- the launch guard's
    rule (:func:`sglang_step35.launch.parallel_guard.pp_mtp_refusal`), worded with the planner's flags."""
    return pp_mtp_refusal(pp_size, f"--mtp {mtp}" if mtp else None, pp_flag="--pp",
                          drop=f"use --mtp 0 with --pp {pp_size}",
                          keep=f"keep --mtp {mtp} with --pp 1 and the GPUs in tensor/expert parallel")


def _margin_bytes(cfg: Mapping, gpu: GpuSpec, tp: int, routed_n: int) -> tuple[int, int]:
    mem = gpu.memory_gb * GB
    reserve = max(int(0.10 * mem), 8 * GiB)
    h, v, k = int(cfg["hidden_size"]), int(cfg["vocab_size"]), int(cfg["moe_top_k"])
    per_token = pad_to(v, VOCAB_PADDING) // tp * 4 + k * 2 * routed_n * 2 + 8 * h * 2
    return reserve, CHUNKED_PREFILL * per_token



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

    Named steps, each stopping the plan with its problems: :func:`check_request`, then
    :func:`choose_layout` and :func:`fit_memory` (also for a format the allow-list refuses,
    :func:`served_refusals`, so its plan still says what it would take), :func:`emit_commands`.
    """
    cfg = read_config() if cfg is None else cfg
    max_ctx = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len"))
    context = max_ctx if context is None else int(context)
    plan = Plan(gpu, num_gpus, quant, mtp, context, concurrency or 0, feasible=False, assumptions=list(ASSUMPTIONS),
                nodes=nodes, pp=pp, replicas=replicas, replicas_per_node=replicas_per_node)  # fmt: skip
    plan.auto_concurrency = concurrency is None
    if quant in FORMAT_NOTES:
        plan.assumptions += [FORMAT_NOTES[quant], f"--model-path {CHECKPOINT_VAR}: your {quant} export of "
                             f"Step-3.5-Flash (no official one; `step35 tiny --quant {quant.split('-g')[0]}` writes a "
                             "small one in the same layout)"]
    plan.problems += check_request(plan, cfg, max_ctx)
    refused = [] if plan.problems else served_refusals(plan, cfg)
    if not plan.problems:
        plan.problems += choose_layout(plan, cfg)
    if not plan.problems:
        plan.problems += fit_memory(plan, cfg)
    if refused:
        plan.feasible = False
        plan.problems += refused
    if plan.problems:
        if suggest:
            from .plan_render import nearest_feasible  # presentation builds on make_plan, not the reverse

            plan.suggestions = nearest_feasible(plan, cfg)
        return plan
    emit_commands(plan)
    return plan


def replica_tp(num_gpus: int, nodes: int, pp: int) -> int:
    """TP of one replica: its GPUs (nodes x GPUs per node) over its pipeline stages."""
    return num_gpus * nodes // pp if pp >= 1 and nodes >= 1 else 0


def check_request(plan: Plan, cfg: Mapping, max_ctx: int) -> list[str]:
    """Step 1: what is wrong with the request itself (GPU and node counts, PP split, context, MTP,
    quantization on this GPU, the config at this TP, the allow-list of served combinations)."""
    g, num_gpus, nodes, pp = GPUS[plan.gpu], plan.num_gpus, plan.nodes, plan.pp
    replicas, replicas_per_node, mtp, context = plan.replicas, plan.replicas_per_node, plan.mtp, plan.context
    problems: list[str] = []
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
    tp = replica_tp(num_gpus, nodes, pp)
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
    if not plan.auto_concurrency and plan.concurrency < 1:
        problems.append("--concurrency must be >= 1")
    n_mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    if mtp and (mtp not in MTP_SPEC or mtp > n_mtp):
        problems.append(f"--mtp {mtp}: the config has {n_mtp} MTP layer(s); use one of {[m for m in MTP_SPEC if m <= n_mtp] or [0]}")
    no_kernel = format_refusal(plan.quant, g)
    if no_kernel:
        problems.append(no_kernel)
    if not problems and pp > 1:
        why = model_class_pp_refusal(pp, mtp)
        if why:
            problems.append(why)
    if not problems:
        try:
            validate(cfg, tp)
        except Step35ConfigError as e:
            problems.append(f"--tp {tp}: {e}")
    return problems


def served_refusals(plan: Plan, cfg: Mapping) -> list[str]:
    """Step 1b: "refused: <reason>" for each setting of the command outside the allow-list the launch
    guard and the model ask (:mod:`sglang_step35.served`, not a list of our own): the default
    runner (or the one the format needs, served.serving_flags), no all-to-all backend, no EPLB, the
    format's experts; the AMD plans run
    SGLANG_USE_AITER=1 (set by emit_commands). The layout and memory are still planned, so a refused
    format says how many GPUs it would take."""
    g = GPUS[plan.gpu]
    label = served.quant_label(QUANTS[plan.quant])
    found = served.refusals(served.Setting(
        g.vendor, quant=label, aiter=for_arch(g.arch).aiter, clamped_layers=clamped_moe_layers(cfg),
        **served.serving_flags(label)[0],
    ))
    return [f"refused: {why}" for why in found]


def choose_layout(plan: Plan, cfg: Mapping) -> list[str]:
    """Step 2: TP and EP (EP = TP where the experts divide, never an all-to-all backend), the
    shared expert's placement and the attention backend; the reasons when no layout runs."""
    g, q = GPUS[plan.gpu], QUANTS[plan.quant]
    tp = replica_tp(plan.num_gpus, plan.nodes, plan.pp)
    backend = effective_moe_backend("auto", g.vendor, q)
    rec = recommended_layout(cfg, tp, q, g.vendor, backend)
    if rec is None:
        verdict = check_moe_layout(
            backend, q, int(cfg["moe_intermediate_size"]), tp, tp, num_experts=int(cfg["moe_num_experts"]),
            share_expert_dim=cfg.get("share_expert_dim"), dense_intermediate_size=cfg.get("intermediate_size"),
        )
        fix = f"; use --pp {plan.nodes} to keep TP {plan.num_gpus} inside each node" if plan.nodes > 1 and plan.pp == 1 else ""
        return [f"no MoE layout runs {plan.quant} on --tp {tp}: " + "; ".join(verdict.reasons) + fix]
    ep, _flags = rec
    a2a = None  # recommended_layout never needs one (see the module notes)
    plan.tp, plan.ep, plan.moe_a2a_backend = tp, ep, a2a
    block = moe_block_layout(a2a_backend=a2a, quant=q, share_expert_dim=cfg.get("share_expert_dim"), tp_size=tp)
    plan.shared_expert_replicated = block.shared_expert_replicated
    plan.attention_backend = attention_backend_for(g.arch)
    E, inter = int(cfg["moe_num_experts"]), int(cfg["moe_intermediate_size"])
    plan.experts_per_gpu = E // ep
    plan.routed_intermediate_per_gpu = inter // (tp // ep)
    return []


def _stage_residents(plan: Plan, cfg: Mapping) -> list[tuple[range, dict, dict, int]]:
    """Per pipeline stage: its layers, weights, buffers and resident bytes (allocated at load)."""
    q, tp, ep, pp, mtp = QUANTS[plan.quant], plan.tp, plan.ep, plan.pp, plan.mtp
    per_stage = []
    for r, layers in enumerate(pp_stage_layers(int(cfg["num_hidden_layers"]), pp)):
        first, last = r == 0, r == pp - 1
        w = weight_breakdown(cfg, q, tp, ep, mtp if last else 0, shared_expert_replicated=plan.shared_expert_replicated,
                             layer_ids=layers, first_stage=first, last_stage=last)  # fmt: skip
        b = buffer_breakdown(cfg, mtp if last else 0, layer_ids=layers, last_stage=last)
        per_stage.append((layers, w, b, sum(w.values()) + sum(b.values())))
    return per_stage


def fit_memory(plan: Plan, cfg: Mapping) -> list[str]:
    """Step 3: the static pool (--mem-fraction-static), the concurrency (as many full-context
    requests as every stage holds, unless given), the memory of the stage with the least headroom
    and the SWA ratio; the shortfall when the weights, buffers and KV do not fit."""
    g, tp, mtp, context, pp = GPUS[plan.gpu], plan.tp, plan.mtp, plan.context, plan.pp
    per_stage = _stage_residents(plan, cfg)
    reserve, activations = _margin_bytes(cfg, g, tp, plan.routed_intermediate_per_gpu)
    capacity = g.memory_gb * GB
    fraction = math.floor((capacity - reserve - activations) / capacity * 100) / 100
    static_pool = int(fraction * capacity)

    def stage_kv(layers, c: int) -> dict[str, Any]:
        return kv_memory(cfg, tp, mtp, context, c, layer_ids=layers)

    if plan.auto_concurrency:
        # As many full-context requests as the static pool of every stage holds.
        def fits(c: int) -> bool:
            return all(stage_kv(layers, c)["kv_total"] + resident <= static_pool for layers, _, _, resident in per_stage)

        lo, hi = 0, 1
        while fits(hi) and hi < 1 << 16:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        plan.concurrency = max(lo, 1)
    concurrency = plan.concurrency
    # The memory shown is the stage with the least headroom (the only one without PP).
    summaries = []
    for layers, w, b, resident in per_stage:
        kv = stage_kv(layers, concurrency)
        summaries.append((static_pool - resident - kv["kv_total"], layers, w, b, resident, kv))
    _, layers, weights, buffers, resident, kv = min(summaries, key=lambda t: t[0])
    need = resident + kv["kv_total"]
    plan.mem_fraction_static, plan.swa_full_tokens_ratio = fraction, kv.pop("swa_full_tokens_ratio")
    plan.memory = {
        "weights": weights,
        "weights_total": sum(weights.values()),
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
        return [
            f"needs {need / GiB:.1f} GiB per GPU for weights + buffers + KV ({concurrency} x {context:,} tokens){where} "
            f"but {g.name}'s static pool is {static_pool / GiB:.1f} GiB ({fraction:.2f} x {g.memory_gb} GB)"
        ]
    plan.feasible = True
    if pp == 1:
        plan.kv_pool = kv_pool_summary(cfg, static_pool - resident, plan.swa_full_tokens_ratio, tp, mtp)
    return []

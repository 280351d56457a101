"""How ``step35 plan`` shows a plan: the text report (:func:`format_plan`), JSON
(:func:`plan_dict`), commands as shell lines, and for an infeasible plan the nearest feasible ones
(:func:`nearest_feasible`, one per kind of change, each re-planned with
:func:`sglang_step35.plan.make_plan`). Nothing here changes a plan."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping, Optional

from .moe.quant import QUANTS
from .plan import Plan, make_plan
from .plan_commands import ROUTER_PORT
from .plan_hardware import GPUS, MAX_GPUS_PER_NODE, GiB
from .plan_memory import format_kv_pool


def nearest_feasible(plan: Plan, cfg: Mapping) -> list[dict[str, Any]]:
    """Nearest feasible plans, one per kind of change: more GPUs, cheaper weights, shorter
    context, fewer concurrent requests (each keeps every other setting); for a format the
    allow-list refuses, the nearest served format."""
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
    if any(x.startswith("refused: ") for x in plan.problems):
        # Only another format changes the allow-list's answer: the served ones, on these GPUs or more.
        counts = sorted({n for n in (plan.num_gpus, 2, 4, 8) if n >= plan.num_gpus})
        tries = [(f"use --quant {qn}" + (f" on {n} GPUs" if n != plan.num_gpus else ""), {"quant": qn, "num_gpus": n})
                 for qn in ("fp8", "bf16") if qn != plan.quant for n in counts]
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


def plan_dict(p: Plan) -> dict[str, Any]:
    """The plan as JSON-ready data (what ``step35 plan --json`` prints): every field of :class:`Plan`
    plus replica 0's node 0 command as one shell line."""
    d = asdict(p)
    d["command_line"] = command_line(p)
    return d


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
        if p.memory and all(x.startswith("refused: ") for x in p.problems):
            # Only the allow-list stands in the way: say what the format would take.
            m = p.memory
            lines += ["", f"Fits if it were served: TP {p.tp}, EP {p.ep}; per GPU {m['weights_total'] / GiB:.2f} GiB "
                          f"weights + {m['kv_total'] / GiB:.2f} GiB KV ({p.concurrency} x {p.context:,} tokens), "
                          f"headroom {m['headroom'] / GiB:.2f} GiB of the {m['static_pool'] / GiB:.2f} GiB static pool"]
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

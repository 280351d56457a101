#!/usr/bin/env python3
"""Regenerate docs/deploy.md from `step35 plan` output for the seed deployments.

    python scripts/gen_deploy_docs.py          # rewrite docs/deploy.md
    python scripts/gen_deploy_docs.py --check  # exit 1 if the committed file is stale

tests/test_plan.py checks that the committed file equals :func:`render`, so the doc cannot drift
from the planner.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_step35.plan import make_plan
from sglang_step35.plan_hardware import GPUS
from sglang_step35.plan_render import format_plan

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "deploy.md"

# The deployments the seeds run (SGLang's benchmark, the AMD guide, StepFun's FP8 + MTP-3 setup).
SEEDS = [
    ("h200", 4, "bf16", 0, "SGLang's Step-3.5-Flash benchmark setup (TP4 EP4, no MTP)"),
    ("mi300x", 4, "bf16", 0, "AMD guide: always --tp 4 --ep 4 (AITER cannot run N=320 experts)"),
    ("h200", 8, "fp8", 3, "StepFun FP8 on 8 GPUs with MTP-3"),
    ("b200", 8, "fp8", 3, "FP8 with MTP-3 on Blackwell"),
]
# Deployments past one node: one command per node (TP/EP over the nodes), and replicas behind the
# router. (gpu, GPUs per node, quant, mtp, {nodes, replicas}, why)
MULTI = [
    ("a100-40gb", 8, "bf16", 0, {"nodes": 2},
     "BF16 does not fit one node of 8 A100-40GB (`step35 plan` says so and suggests this): TP16 EP16 over "
     "two nodes, 18 whole experts per GPU; FP8 is not planned on Ampere"),
    ("h100", 4, "bf16", 3, {"nodes": 2},
     "4-GPU H100 nodes: BF16 with MTP-3 as TP8 EP8 over two nodes"),
    ("h200", 8, "fp8", 3, {"replicas": 2},
     "Throughput: two independent 8x H200 FP8 MTP-3 replicas behind SGLang's router "
     "(`sglang_router`, from the sglang-router package); the memory plan is per GPU of each replica"),
    ("h200", 4, "fp8", 0, {"replicas": 2, "replicas_per_node": 2},
     "Throughput on one 8x H200 node: two TP4 EP4 FP8 replicas sharing it, on GPUs 0-3 and 4-7 "
     "(`--base-gpu-id 4`) and ports 30000 / 30001, behind the router"),
]


# The 8- and 4-bit exports (issue #25, `step35 tiny --quant` names) and the GPUs each has kernels on.
FORMATS = [
    ("w8a8-int8", ("h100", "h200", "b200", "mi300x", "mi355x")),
    ("w4a16", ("h100", "h200", "b200", "mi300x", "mi355x")),
    ("w4a16-g32", ("h100", "h200")),
    # AWQ / GPTQ int4 (moe_wna16); SGLang refuses moe_wna16 on ROCm (configs/model_config.py).
    ("int4", ("h100", "h200", "b200", "mi300x")),
    ("nvfp4", ("h100", "h200", "b200")),
    ("mxfp4", ("mi300x", "mi355x")),
]


def _smallest_fit(gpu: str, quant: str):
    """The plan on the fewest GPUs (1, 2, 4, 8) whose weights + KV for one full-context request fit,
    served or refused by the allow-list (None: not even 8 fit)."""
    for n in (1, 2, 4, 8):
        plan = make_plan(gpu, n, quant, suggest=False)
        if plan.feasible or (plan.problems and all(x.startswith("refused: ") for x in plan.problems)):
            return plan
    return None


def _formats() -> list[str]:
    out = [
        "# 8- and 4-bit checkpoints",
        "",
        "`step35 plan --quant NAME` plans the formats `step35 tiny --quant` writes, with each format's bytes",
        "(sglang_step35/moe/quant.py) and the TP splits SGLang's kernels for it can run (a split they cannot",
        "run is refused by name, or fixed by EP = TP where that keeps whole experts). Whether a format is",
        "served on a platform is the allow-list's answer (sglang_step35/served.py, docs/correctness.md);",
        "a refused format's plan still says how many GPUs it would take. No official Step-3.5-Flash",
        "checkpoint exists in these formats: the commands read your export from `$STEP35_CHECKPOINT`.",
        "",
        "| format | GPU | fewest GPUs (full 262,144-token context) | layout | requests at full context | allow-list |",
        "|---|---|---|---|---|---|",
    ]
    reasons: dict[str, str] = {}
    examples = []
    for quant, gpus in FORMATS:
        for gpu in gpus:
            plan = _smallest_fit(gpu, quant)
            if plan is None:
                out.append(f"| {quant} | {GPUS[gpu].name} | more than 8 | - | - | - |")
                continue
            status = "served" if plan.feasible else "refused (below)"
            for x in plan.problems:
                reasons[f"{quant} on {GPUS[gpu].vendor}"] = x.removeprefix("refused: ")
            out.append(f"| {quant} | {GPUS[gpu].name} | {plan.num_gpus} | TP {plan.tp}, EP {plan.ep} | "
                       f"{plan.concurrency} | {status} |")
            if gpu in ("h200", "mi300x") and not any(e[1] == quant for e in examples):
                examples.append((gpu, quant, plan))
    if reasons:
        out += ["", "Refused (the allow-list's words):", ""]
        out += [f"- {k}: {v}" for k, v in reasons.items()]
    out.append("")
    for gpu, quant, plan in examples:
        plan = make_plan(gpu, plan.num_gpus, quant)  # with the nearest served alternatives
        out += [
            f"## {plan.num_gpus}x {GPUS[gpu].name}, {quant}",
            "",
            f"`step35 plan --gpu {gpu} --num-gpus {plan.num_gpus} --quant {quant}`",
            "",
            "```text",
            format_plan(plan).rstrip("\n"),
            "```",
            "",
        ]
    return out


def _flags(extra: dict) -> str:
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in extra.items())


def _section(gpu, n, quant, mtp, extra, why) -> list[str]:
    plan = make_plan(gpu, n, quant, mtp=mtp, **extra)
    assert plan.feasible, f"deployment {n}x{gpu} {quant} {extra} became infeasible: {plan.problems}"
    head = f"{n}x {GPUS[gpu].name}, {quant}" + (f", MTP-{mtp}" if mtp else "")
    if extra.get("nodes", 1) > 1:
        head = f"{extra['nodes']} nodes x {head}"
    if extra.get("replicas_per_node", 1) > 1:
        head = f"{extra['replicas']} replicas of {head}, {extra['replicas_per_node']} per node, behind the router"
    elif extra.get("replicas", 1) > 1:
        head = f"{extra['replicas']} replicas x {head}, behind the router"
    return [
        f"## {head}",
        "",
        why + ".",
        "",
        f"`step35 plan --gpu {gpu} --num-gpus {n} --quant {quant} --mtp {mtp}{_flags(extra)}`",
        "",
        "```text",
        format_plan(plan).rstrip("\n"),
        "```",
        "",
    ]


def render() -> str:
    out = [
        "# Deploy",
        "",
        "Generated by `scripts/gen_deploy_docs.py` from `step35 plan` (do not edit by hand).",
        "Each plan is for the full 262,144-token context with as many concurrent requests as fit;",
        "pass `--context` / `--concurrency` to `step35 plan` for your own mix. `step35 plan` exits 2",
        "and prints the nearest feasible plans when a request cannot run.",
        "",
    ]
    for gpu, n, quant, mtp, why in SEEDS:
        out += _section(gpu, n, quant, mtp, {}, why)
    out += [
        "# More than one node",
        "",
        "`--num-gpus` counts the GPUs of one node; `--nodes N` spreads one replica over N nodes (one",
        "`sglang serve` per node with `--nnodes`, `--node-rank` and `--dist-init-addr` on node 0);",
        "`--pp P` splits the layers into P pipeline stages as SGLang does (`--pp-size`), planned only",
        "where our model class passes SGLang's pipeline check (`model_class_pp_refusal` in",
        "sglang_step35/plan.py) and never with MTP (SGLang 0.5.23 pipelines only single-layer EAGLE);",
        "`--replicas R` plans R independent replicas behind `python -m sglang_router.launch_router`.",
        "Set the `$..._IP` variables to the nodes' addresses before running the commands.",
        "",
    ]
    for gpu, n, quant, mtp, extra, why in MULTI:
        out += _section(gpu, n, quant, mtp, extra, why)
    out += _formats()
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if docs/deploy.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text() if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is stale; run scripts/gen_deploy_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

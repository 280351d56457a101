"""``step35 plan``: print the ``sglang serve`` command(s) and per-GPU memory plan for a deployment
(one node, several nodes per replica, or replicas behind sglang_router).

Exit status: 0 for a feasible plan, 2 for an infeasible one (the reason and the nearest feasible
plans are printed instead of a command). ``--json`` prints :func:`~.plan_render.plan_dict` instead of text.
``step35 plan`` (sglang_step35/cli.py) calls :func:`add_plan_parser` / :func:`run_plan`;
``python -m sglang_step35.plan_cli`` runs the same standalone.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .config import Step35ConfigError
from .config import read_config
from .moe.quant import QUANTS
from .plan import make_plan
from .plan_hardware import GPUS
from .plan_render import format_plan, plan_dict
from .plan_memory import MTP_SPEC

EXIT_INFEASIBLE = 2


def _configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--gpu", required=True, choices=sorted(GPUS), help="GPU model")
    p.add_argument("--num-gpus", type=int, required=True, help="GPUs per node (1..8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per replica (one command per node: --nnodes/--node-rank)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (SGLang --pp-size); TP = nodes x GPUs / pp")
    p.add_argument("--replicas", type=int, default=1, help="identical replicas behind sglang_router (throughput)")
    p.add_argument("--replicas-per-node", type=int, default=1,
                   help="replicas sharing one node, each on its own --num-gpus GPUs (--base-gpu-id) and port")
    p.add_argument("--quant", required=True, choices=list(QUANTS), help="checkpoint weights")
    p.add_argument("--mtp", type=int, default=0, choices=[0, *MTP_SPEC], help="MTP draft layers (0 = off)")
    p.add_argument("--context", type=int, default=None, help="tokens per request (default: the config's max)")
    p.add_argument(
        "--concurrency", type=int, default=None, help="concurrent requests at full context (default: as many as fit)"
    )
    p.add_argument("--config", default=None, help="config.json to plan for (default: Step-3.5-Flash)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``plan`` on an ``argparse`` subparsers object; returns the new parser."""
    p = subparsers.add_parser("plan", help="plan a Step-3.5 deployment: serve command + memory per GPU")
    _configure(p)
    p.set_defaults(func=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan for parsed ``args``; 0 when feasible, 2 when not."""
    try:
        cfg = read_config(args.config)
    except (OSError, ValueError) as e:
        print(f"step35 plan: cannot read config {args.config!r}: {e}", file=sys.stderr)
        return EXIT_INFEASIBLE
    try:
        plan = make_plan(
            args.gpu, args.num_gpus, args.quant, nodes=args.nodes, pp=args.pp, replicas=args.replicas,
            replicas_per_node=args.replicas_per_node,
            mtp=args.mtp, context=args.context,
            concurrency=args.concurrency, cfg=cfg,
        )  # fmt: skip
    except (KeyError, Step35ConfigError) as e:  # a config missing keys the plan needs
        print(f"step35 plan: config {args.config or '(built-in)'} cannot be planned: {e}", file=sys.stderr)
        return EXIT_INFEASIBLE
    if args.json:
        print(json.dumps(plan_dict(plan), indent=2))
    else:
        sys.stdout.write(format_plan(plan))
    return 0 if plan.feasible else EXIT_INFEASIBLE


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _configure(argparse.ArgumentParser(prog="step35 plan", description=__doc__.splitlines()[0]))
    return run_plan(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

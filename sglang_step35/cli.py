"""`step35` command line: tiny checkpoints, the end-to-end demo, deployment planning, the doctor."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sglang_step35.doctor import add_doctor_parser
from sglang_step35.plan_cli import add_plan_parser

DEFAULT_TINY_DIR = Path.home() / ".cache" / "sglang-step35" / "tiny-seed0"


def cmd_tiny(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sglang_step35.tiny import write_tiny_checkpoint, write_trained_checkpoint

    if args.real_width:
        return cmd_tiny_real(args)
    if args.moe_layers is not None or args.experts is not None or args.dry_run:
        print("step35 tiny: --moe-layers, --experts and --dry-run go with --real-width", file=sys.stderr)
        return 2
    if args.fp8:
        if args.quant not in (None, "fp8"):
            print(f"step35 tiny: --fp8 is --quant fp8; it excludes --quant {args.quant}", file=sys.stderr)
            return 2
        args.quant = "fp8"
    if args.trained and (args.quant or args.seed is not None):
        given = [f for f, on in (("--seed", args.seed is not None), ("--fp8", args.fp8),
                                 (f"--quant {args.quant}", args.quant and not args.fp8)) if on]
        print(f"step35 tiny: --trained copies the one embedded trained checkpoint; drop {' and '.join(given)} "
              "(it takes no --seed, --quant or --fp8)", file=sys.stderr)
        return 2
    what = "trained" if args.trained else f"seed {args.seed or 0}"
    with tqdm(total=1, desc=f"writing tiny Step-3.5 checkpoint ({what})", unit="ckpt") as bar:
        if args.trained:
            out = write_trained_checkpoint(args.out)
        else:
            out = write_tiny_checkpoint(args.out, seed=args.seed or 0, quant=args.quant)
        bar.update(1)
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def cmd_tiny_real(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from sglang_step35.tiny_real import checkpoint_bytes, describe, real_width_config, write_real_width_checkpoint

    if args.trained:
        print("step35 tiny: --trained and --real-width exclude each other", file=sys.stderr)
        return 2
    if args.quant not in (None, "fp8"):
        print(f"step35 tiny: --real-width writes BF16 or FP8 (--fp8) only, not --quant {args.quant}; "
              "use --quant without --real-width", file=sys.stderr)
        return 2
    args.fp8 = args.fp8 or args.quant == "fp8"
    moe_layers = 3 if args.moe_layers is None else args.moe_layers
    try:
        cfg, src = real_width_config(moe_layers, args.experts)
    except ValueError as e:
        print(f"step35 tiny: {e}", file=sys.stderr)
        return 2
    total = checkpoint_bytes(cfg)
    print(f"real-width Step-3.5 checkpoint: layers {describe(cfg)}; from the real model's layers {src}; "
          f"{total / 1e9:.1f} GB in BF16{' (FP8: about half the projections)' if args.fp8 else ''}", flush=True)
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    with tqdm(total=total, unit="B", unit_scale=True, desc="generating + writing shards") as bar:
        info = write_real_width_checkpoint(args.out, moe_layers=moe_layers, experts=args.experts,
                                           seed=args.seed or 0, fp8=args.fp8,
                                           progress=lambda _stem, n: bar.update(n))
    print(f"wrote {args.out} ({info['bytes'] / 1e9:.2f} GB, {len(list(Path(args.out).glob('*.safetensors')))} shards) "
          f"in {time.perf_counter() - t0:.1f} s, weights generated on {info['device']}")
    return 0


def cmd_train_tiny(args: argparse.Namespace) -> int:
    from sglang_step35.training.train import train_tiny

    summary = train_tiny(args.out, seed=args.seed, steps=args.steps, mtp_steps=args.mtp_steps,
                         batch_size=args.batch_size, lr=args.lr)
    print(f"trained {args.out} in {summary['train_seconds']} s; final losses {summary['final_loss']}")
    print(f"loss curves: {args.out}/loss_curves.png, log: {args.out}/train_log.json")
    return 0


def ensure_tiny(path: Path = DEFAULT_TINY_DIR, seed: int = 0) -> Path:
    from sglang_step35.tiny import write_tiny_checkpoint

    if not (path / "model.safetensors").exists():
        write_tiny_checkpoint(path, seed=seed)
    return path


def cmd_demo(args: argparse.Namespace) -> int:
    from openai import OpenAI

    from sglang_step35.platform import current_platform
    from sglang_step35.server import SGLangServer
    from sglang_step35.tiny import TRAINED_TINY_DIR

    model = Path(args.model) if args.model else TRAINED_TINY_DIR
    server_args = ["--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5"]
    server_args += ["--device", "cpu"] if not current_platform().has_accelerator else []
    print(f"[demo] starting: sglang serve --model-path {model} {' '.join(server_args)}", flush=True)
    with SGLangServer(str(model), server_args) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        print(f"[demo] server up at {server.base_url}; streaming one chat request\n", flush=True)
        stream = client.chat.completions.create(
            model=str(model),
            messages=[{"role": "user", "content": args.prompt}],
            max_tokens=args.max_tokens,
            temperature=0,
            stream=True,
        )
        reasoning, answer = [], []
        for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            r = getattr(delta, "reasoning_content", None) or (delta.model_extra or {}).get("reasoning_content")
            if r:
                reasoning.append(r)
            if delta.content:
                answer.append(delta.content)
        print("=== reasoning_content ===")
        print("".join(reasoning) or "(none)")
        print("=== content (answer) ===")
        print("".join(answer) or f"(none: the model did not close its reasoning within {args.max_tokens} tokens)")
        served_by = "sglang_step35.models.step3p5" if "sglang_step35.models.step3p5" in server.log_text() else "?"
        print(f"\n[demo] model class: {served_by}.Step3p5ForCausalLM; stopping server")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="step35", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tiny", help="write a tiny deterministic Step-3.5 checkpoint (real layout, < 10 MB)")
    t.add_argument("out", help="output directory")
    t.add_argument("--trained", action="store_true",
                   help="write the embedded trained checkpoint (GSM8K + tool calls, `step35 train-tiny`)")
    t.add_argument("--seed", type=int, default=None, help="seed of the random weights (default 0)")
    t.add_argument("--fp8", action="store_true",
                   help="write the Step-3.5-Flash-FP8 layout (128x128 block FP8 e4m3 + weight_scale_inv); "
                        "= --quant fp8")
    from sglang_step35.quant import tiny_names

    t.add_argument("--quant", choices=tiny_names(), default=None,
                   help="write the tiny checkpoint in this quantized format's real tensor names and config "
                        "(block-aligned sizes; sglang_step35/quant)")
    t.add_argument("--real-width", action="store_true",
                   help="Step-3.5-Flash's real widths (from the shipped config) at reduced depth: the dense layers, "
                        "--moe-layers MoE layers (the last one clamped like 43/44) and the 3 MTP layers; "
                        "sharded, ~38 GB BF16 at the default, generated on the GPU when there is one")
    t.add_argument("--moe-layers", type=int, default=None,
                   help="with --real-width: MoE layers kept (default 3; ~9.1 GB each at 288 experts)")
    t.add_argument("--experts", type=int, default=None,
                   help="with --real-width: routed experts per MoE layer instead of the real 288 (tests)")
    t.add_argument("--dry-run", action="store_true", help="with --real-width: print the layers and size, write nothing")
    t.set_defaults(func=cmd_tiny)

    tr = sub.add_parser("train-tiny", help="train the tiny architecture on GSM8K + tool calls (CPU, ~30 min)")
    tr.add_argument("out", help="output directory")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=2500, help="main-model steps (phase 1)")
    tr.add_argument("--mtp-steps", type=int, default=500, help="MTP-layer steps on the frozen main model (phase 2)")
    tr.add_argument("--batch-size", type=int, default=16)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.set_defaults(func=cmd_train_tiny)

    d = sub.add_parser("demo", help="serve the tiny checkpoint with sglang and stream one chat request")
    d.add_argument("--model", help="checkpoint directory (default: the embedded trained tiny checkpoint)")
    d.add_argument("--prompt", default="Janet's ducks lay 16 eggs per day. She eats three for breakfast every "
                   "morning and bakes muffins for her friends every day with four. She sells the remainder at the "
                   "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make every day "
                   "at the farmers' market?", help="user message (default: the first GSM8K test question)")
    d.add_argument("--max-tokens", type=int, default=384)
    d.set_defaults(func=cmd_demo)

    add_plan_parser(sub)
    add_doctor_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

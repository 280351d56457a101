"""Serving benchmark: the seed's three bench_serving scenarios, our model vs SGLang's built-in.

The scenarios are those of the seed's Step-3.5-Flash table (4xH200, TP4 EP4, no MTP, 1000 input /
1000 output tokens per request):

    low      10 prompts, concurrency   1
    medium   80 prompts, concurrency  16
    high    500 prompts, concurrency 100

Every number comes from SGLang's own client, `python -m sglang.bench_serving --backend sglang`,
run once per scenario. It runs fully offline: `--dataset-name random-ids` draws token ids from the
tokenizer of the served checkpoint (the seed's `random` downloads ShareGPT) and `--tokenize-prompt`
sends those ids as they are, so every request has exactly the requested input length.

Two modes:

* default: start `sglang serve` on a checkpoint (the tiny one unless --model is given) twice, once
  with our Step3p5ForCausalLM and once with SGLang's built-in one (`SGLANG_STEP35_USE_BUILTIN_MODEL=1`)
  on the same weights, run every scenario against each, and print ours / built-in;
* `--base-url URL` [--builtin-base-url URL2]: measure deployments someone else started.

`--scale S` multiplies prompt counts, concurrencies and lengths by S so the run fits a CPU; on a
machine without a GPU the default is CPU_DEFAULT_SCALE (the whole run then takes a few minutes on
2 cores). Results go to bench/out/serving.json and bench/out/serving.png (gitignored).

    python bench/serving.py                         # CPU: tiny checkpoint, scaled, both models
    python bench/serving.py --scale 1 --model /models/Step-3.5-Flash --server-args="--tp 4 --ep 4"
    python bench/serving.py --base-url http://gpu-host:30000 --tokenizer stepfun-ai/Step-3.5-Flash
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as `python bench/serving.py`
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/gsm8k.py beside it

OUT_DIR = ROOT / "bench" / "out"
SEED_INPUT_LEN = 1000
SEED_OUTPUT_LEN = 1000
# name -> (prompts, max concurrency), from the seed's benchmark table.
SEED_SCENARIOS: dict[str, tuple[int, int]] = {"low": (10, 1), "medium": (80, 16), "high": (500, 100)}
# Measured: the three scaled scenarios for both models took 8 min on a shared 2-core VM (bench/RESULTS.md).
CPU_DEFAULT_SCALE = 0.1
# bench_serving metrics we keep (all are in its --output-file record).
METRICS = [
    "completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "input_throughput", "output_throughput", "total_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
    "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
    "mean_itl_ms", "median_itl_ms", "p99_itl_ms",
    "mean_e2e_latency_ms", "median_e2e_latency_ms", "concurrency",
]
# (metric, label, higher is better) for the ratio table and the plot.
HEADLINE = [
    ("output_throughput", "output tok/s", True),
    ("median_tpot_ms", "median TPOT (ms)", False),
    ("median_ttft_ms", "median TTFT (ms)", False),
]
MODELS = {
    "ours": {"env": {}, "log_marker": "serving with model class sglang_step35.models.step3p5.Step3p5ForCausalLM"},
    "builtin": {
        "env": {"SGLANG_STEP35_USE_BUILTIN_MODEL": "1"},
        "log_marker": "Step-3.5 model classes from sglang.srt.models.step3p5 (built-in",
    },
}


@dataclass(frozen=True)
class Scenario:
    name: str
    num_prompts: int
    concurrency: int
    input_len: int
    output_len: int


def scaled_scenarios(
    names: list[str],
    scale: float,
    num_prompts: Optional[int] = None,
    input_len: Optional[int] = None,
    output_len: Optional[int] = None,
) -> list[Scenario]:
    """The seed's scenarios shrunk by `scale`; explicit counts/lengths override the scaled ones."""
    if not 0 < scale <= 1:
        raise ValueError(f"--scale must be in (0, 1], got {scale}")
    out = []
    for name in names:
        if name not in SEED_SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(SEED_SCENARIOS)}")
        prompts, conc = SEED_SCENARIOS[name]
        conc = max(1, math.ceil(conc * scale))
        # At least `conc` prompts so the concurrency is reached, and 2 so a median is not one sample.
        n = num_prompts if num_prompts is not None else max(2, conc, math.ceil(prompts * scale))
        conc = min(conc, n)
        out.append(Scenario(
            name=name,
            num_prompts=n,
            concurrency=conc,
            input_len=input_len if input_len is not None else max(4, round(SEED_INPUT_LEN * scale)),
            output_len=output_len if output_len is not None else max(4, round(SEED_OUTPUT_LEN * scale)),
        ))
    return out


def bench_serving_command(
    base_url: str, sc: Scenario, output_file: Path, tokenizer: Optional[str], seed: int
) -> list[str]:
    """The exact `python -m sglang.bench_serving` line for one scenario (also printed for reproduction)."""
    cmd = [
        sys.executable, "-m", "sglang.bench_serving",
        "--backend", "sglang",
        "--base-url", base_url,
        "--dataset-name", "random-ids",
        "--tokenize-prompt",
        "--random-input-len", str(sc.input_len),
        "--random-output-len", str(sc.output_len),
        # Fixed lengths (ratio 1): every request is exactly input_len in / output_len out, so TPOT
        # and throughput compare across models and runs.
        "--random-range-ratio", "1.0",
        "--num-prompts", str(sc.num_prompts),
        "--max-concurrency", str(sc.concurrency),
        "--request-rate", "inf",
        # The warmup request is prompt 0; without a flush its KV would be reused by the measured run.
        "--flush-cache",
        "--seed", str(seed),
        "--output-file", str(output_file),
        "--disable-tqdm",
    ]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer, "--model", tokenizer]
    return cmd


def run_scenario(
    base_url: str, sc: Scenario, tokenizer: Optional[str], seed: int, log_path: Path, timeout: float
) -> dict:
    """Run bench_serving once; return its result record restricted to METRICS."""
    with tempfile.TemporaryDirectory(prefix="step35-bench-") as tmp:
        # bench_serving appends to its output file; a fresh one per run holds exactly one record.
        result_file = Path(tmp) / "result.jsonl"
        cmd = bench_serving_command(base_url, sc, result_file, tokenizer, seed)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=tmp)
        if proc.returncode != 0 or not result_file.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"bench_serving failed for scenario {sc.name} (exit {proc.returncode}):\n{tail}")
        record = json.loads(result_file.read_text().splitlines()[-1])
    if record.get("completed") != sc.num_prompts:
        raise RuntimeError(f"scenario {sc.name}: {record.get('completed')} of {sc.num_prompts} requests completed")
    return {k: record.get(k) for k in METRICS} | {"command": shlex.join(cmd[1:]).replace(str(result_file), "OUT.jsonl")}


def ratios(results: dict) -> dict:
    """ours / builtin per scenario and headline metric (throughput: > 1 is better; latencies: < 1)."""
    if "ours" not in results or "builtin" not in results:
        return {}
    out = {}
    for name, ours in results["ours"].items():
        base = results["builtin"].get(name)
        if base is None:
            continue
        out[name] = {
            metric: (ours[metric] / base[metric]) if base.get(metric) else None for metric, _, _ in HEADLINE
        }
    return out


def plot(results: dict, scenarios: list[Scenario], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: CI and servers have no display
    import matplotlib.pyplot as plt

    labels = list(results)
    names = [s.name for s in scenarios]
    fig, axes = plt.subplots(1, len(HEADLINE), figsize=(5 * len(HEADLINE), 4.2))
    width = 0.8 / max(1, len(labels))
    for ax, (metric, label, higher) in zip(axes, HEADLINE):
        for i, model in enumerate(labels):
            vals = [results[model].get(n, {}).get(metric) or 0.0 for n in names]
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, vals, width, label=model)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(names)), [f"{s.name}\n{s.num_prompts}p c{s.concurrency}" for s in scenarios])
        ax.set_title(f"{label} ({'higher' if higher else 'lower'} is better)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "gpu_count": torch.cuda.device_count() if gpu else 0,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory to serve (default: the tiny checkpoint)")
    p.add_argument("--models", default="ours,builtin", help="which model classes to serve: ours, builtin or both")
    p.add_argument("--server-args", default="", help='extra `sglang serve` flags as one string: --server-args="--tp 4 --ep 4"')
    p.add_argument("--base-url", help="benchmark a running server instead of starting one (labelled 'ours')")
    p.add_argument("--builtin-base-url", help="with --base-url: a second server running the built-in model")
    p.add_argument("--tokenizer", help="tokenizer for bench_serving (default: the served model's path)")
    p.add_argument("--scenarios", default="low,medium,high")
    p.add_argument("--scale", type=float, help=f"shrink counts/lengths (default 1 on GPU, {CPU_DEFAULT_SCALE} on CPU)")
    p.add_argument("--num-prompts", type=int, help="override every scenario's prompt count")
    p.add_argument("--input-len", type=int, help="override the (scaled) input length")
    p.add_argument("--output-len", type=int, help="override the (scaled) output length")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per bench_serving run")
    p.add_argument("--out", type=Path, default=OUT_DIR, help="output directory (default bench/out)")
    p.add_argument("--name", default="serving", help="basename of the JSON/PNG outputs")
    args = p.parse_args(argv)

    import sglang
    import torch
    from tqdm import tqdm

    on_gpu = torch.cuda.is_available()
    scale = args.scale if args.scale is not None else (1.0 if on_gpu else CPU_DEFAULT_SCALE)
    scenarios = scaled_scenarios(
        [s for s in args.scenarios.split(",") if s], scale, args.num_prompts, args.input_len, args.output_len
    )
    args.out.mkdir(parents=True, exist_ok=True)

    # targets: label -> (base_url or None to start a server, env for that server)
    if args.base_url:
        targets = {"ours": args.base_url} | ({"builtin": args.builtin_base_url} if args.builtin_base_url else {})
        model_path = None
    else:
        from sglang_step35.cli import ensure_tiny

        targets = {m: None for m in args.models.split(",") if m}
        unknown = set(targets) - set(MODELS)
        if unknown:
            p.error(f"unknown --models {sorted(unknown)}; choose from {', '.join(MODELS)}")
        model_path = str(Path(args.model).resolve()) if args.model else str(ensure_tiny())
    tokenizer = args.tokenizer or model_path

    print(f"[bench] scale {scale:g}; scenarios: " + "; ".join(
        f"{s.name} {s.num_prompts} prompts c{s.concurrency} {s.input_len}/{s.output_len}" for s in scenarios), flush=True)
    results: dict[str, dict[str, dict]] = {}
    servers_info: dict[str, dict] = {}
    bar = tqdm(total=len(targets) * len(scenarios), desc="bench_serving", unit="run")
    for label, url in targets.items():
        server = None
        if url is None:
            from sglang_step35.server import SGLangServer

            # CPU defaults (device, one KV pool, KV budget) come from the plugin, as for any user.
            server_args = shlex.split(args.server_args)
            bar.set_postfix_str(f"starting {label} server")
            server = SGLangServer(model_path, server_args, env=MODELS[label]["env"]).start()
            url = server.base_url
            servers_info[label] = {"command": shlex.join(server.command()[1:]), "env": MODELS[label]["env"]}
        try:
            if server is not None and MODELS[label]["log_marker"] not in server.log_text():
                # A ratio between two runs of the same class would be meaningless: refuse it.
                raise RuntimeError(f"{label}: server log lacks {MODELS[label]['log_marker']!r}:\n{server.log_tail()}")
            results[label] = {}
            for sc in scenarios:
                bar.set_postfix_str(f"{label}/{sc.name}")
                log_path = args.out / f"{args.name}-{label}-{sc.name}.log"
                load_before = os.getloadavg()[0]
                rec = run_scenario(url, sc, tokenizer, args.seed, log_path, args.timeout)
                # Host load next to each figure: on a shared CPU box other processes skew timings.
                rec["load_avg_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                results[label][sc.name] = rec
                bar.update(1)
        finally:
            if server is not None:
                server.stop()
    bar.close()

    device = "GPU" if on_gpu else "CPU"
    title = f"Step-3.5 bench_serving ({device}, scale {scale:g}, model {Path(model_path).name if model_path else args.base_url})"
    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "sglang_version": sglang.__version__,
        "model": model_path or args.base_url,
        "scale": scale,
        "scenarios": [asdict(s) for s in scenarios],
        "servers": servers_info,
        "results": results,
        "ratio_ours_over_builtin": ratios(results),
    }
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, scenarios, title, png_path)

    print(f"\n{'scenario':<8} {'model':<8} " + " ".join(f"{lab:>18}" for _, lab, _ in HEADLINE))
    for sc in scenarios:
        for label in results:
            r = results[label][sc.name]
            print(f"{sc.name:<8} {label:<8} " + " ".join(f"{r[m]:>18.2f}" for m, _, _ in HEADLINE))
    for name, rat in report["ratio_ours_over_builtin"].items():
        print(f"ratio ours/built-in {name:<7} " + "  ".join(
            f"{lab} {v:.3f}" if v is not None else f"{lab} n/a" for (m, lab, _), v in zip(HEADLINE, rat.values())))
    print(f"[bench] wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GSM8K few-shot accuracy with SGLang's own harness, `python -m sglang.test.few_shot_gsm8k`.

The harness is run unchanged against a served model, reading the GSM8K test set shipped with the
package (`sglang_step35/data/gsm8k/test.jsonl`, MIT licence beside it), so nothing is downloaded.
It prints accuracy, invalid rate, latency and output throughput; we capture them into
bench/out/gsm8k.json together with the exact command.

* default: start `sglang serve` on the embedded trained tiny checkpoint (CPU when there is no GPU; our model class
  unless `--builtin`), run the harness, stop the server;
* `--host H --port P`: evaluate a deployment that is already running (e.g. 4xH200 TP4 EP4).

The trained tiny checkpoint (4M parameters, 30 CPU minutes of training, `step35 train-tiny`) writes
GSM8K-style answers, so invalid rate and format are meaningful; its accuracy says nothing about
Step-3.5-Flash. The seed's reference for the real model (200 questions, 4xH200): accuracy 0.885,
invalid 0.005.

    python bench/gsm8k.py                               # trained tiny checkpoint on CPU, 50 questions
    python bench/gsm8k.py --host 10.0.0.5 --port 30000 --num-questions 200 --parallel 128
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as `python bench/gsm8k.py`

OUT_DIR = ROOT / "bench" / "out"
DATA = ROOT / "sglang_step35" / "data" / "gsm8k" / "test.jsonl"
# The harness's result lines, e.g. "Accuracy: 0.885" / "Output throughput: 1234.5 token/s".
RESULT_PATTERNS = {
    "accuracy": r"^Accuracy:\s*([0-9.]+)",
    "invalid": r"^Invalid:\s*([0-9.]+)",
    "latency_s": r"^Latency:\s*([0-9.]+)\s*s",
    "output_throughput_tok_s": r"^Output throughput:\s*([0-9.]+)\s*token/s",
}


def parse_harness_output(text: str) -> dict:
    """The four figures few_shot_gsm8k prints; raises if any is missing (the run then failed)."""
    out = {}
    for key, pat in RESULT_PATTERNS.items():
        m = re.search(pat, text, re.MULTILINE)
        if m is None:
            raise ValueError(f"few_shot_gsm8k output has no {key!r} line")
        out[key] = float(m.group(1))
    return out


def harness_command(host: str, port: int, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "sglang.test.few_shot_gsm8k",
        "--data-path", str(args.data_path),
        "--num-questions", str(args.num_questions),
        "--num-shots", str(args.num_shots),
        "--max-new-tokens", str(args.max_new_tokens),
        "--parallel", str(args.parallel),
        "--host", host,  # a bare host: the harness builds http://HOST:PORT itself
        "--port", str(port),
    ]


def run_harness(host: str, port: int, args: argparse.Namespace, log_path: Path) -> tuple[dict, list[str]]:
    cmd = harness_command(host, port, args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    # The harness writes tmp_output_gsm8k.txt into its working directory: keep that out of the repo.
    with tempfile.TemporaryDirectory(prefix="step35-gsm8k-") as tmp:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp, text=True)
        lines = []
        with open(log_path, "w") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            for line in proc.stdout:  # stream: the harness's own tqdm bar shows progress
                sys.stdout.write(line)
                log.write(line)
                lines.append(line)
        code = proc.wait(timeout=args.timeout)
    if code != 0:
        raise RuntimeError(f"few_shot_gsm8k exited with {code}; log: {log_path}")
    return parse_harness_output("".join(lines)), cmd


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help="evaluate a running server at this host instead of starting one")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", help="checkpoint to serve when starting a server (default: the embedded trained tiny checkpoint)")
    p.add_argument("--builtin", action="store_true", help="serve SGLang's built-in Step3p5ForCausalLM instead of ours")
    p.add_argument("--server-args", default="", help="extra `sglang serve` flags")
    p.add_argument("--data-path", type=Path, default=DATA)
    p.add_argument("--num-questions", type=int, default=50)
    p.add_argument("--num-shots", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--name", default="gsm8k", help="basename of the JSON output")
    args = p.parse_args(argv)
    if not args.data_path.exists():
        p.error(f"no GSM8K data at {args.data_path}")
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / f"{args.name}.log"

    import sglang
    import torch

    server_info = None
    if args.host:
        result, cmd = run_harness(args.host, args.port, args, log_path)
        target = f"http://{args.host}:{args.port}"
    else:
        from sglang_step35.server import SGLangServer
        from sglang_step35.tiny import TRAINED_TINY_DIR

        model = str(Path(args.model).resolve()) if args.model else str(TRAINED_TINY_DIR)
        server_args = shlex.split(args.server_args)  # CPU defaults come from the plugin
        env = {"SGLANG_STEP35_USE_BUILTIN_MODEL": "1"} if args.builtin else {}
        print(f"[gsm8k] starting sglang serve --model-path {model} {shlex.join(server_args)}", flush=True)
        with SGLangServer(model, server_args, env=env) as server:
            server_info = {"command": shlex.join(server.command()[1:]), "env": env}
            result, cmd = run_harness("127.0.0.1", server.port, args, log_path)
        target = model

    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu_cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "sglang_version": sglang.__version__,
        "target": target,
        "model_class": None if args.host else ("builtin" if args.builtin else "ours"),
        "server": server_info,
        "command": shlex.join(cmd[1:]),
        "num_questions": args.num_questions,
        **result,
    }
    json_path = args.out / f"{args.name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"[gsm8k] {args.num_questions} questions: accuracy {result['accuracy']:.3f}, invalid {result['invalid']:.3f}, "
        f"latency {result['latency_s']:.1f} s, output throughput {result['output_throughput_tok_s']:.1f} tok/s"
    )
    print(f"[gsm8k] wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

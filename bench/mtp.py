"""MTP benchmark on CPU: output tok/s and accept length, no spec vs MTP-1 vs MTP-3, written to
bench/out/mtp.json and bench/out/mtp.png. Not part of CI (a few minutes).

    python bench/mtp.py [--model DIR | --rewired] [--requests 8] [--concurrency 1] [--max-new 256]

Default model: the embedded trained tiny checkpoint (its MTP layers were trained to predict 2, 3, 4
tokens ahead), prompted with GSM8K test questions in its chat template; generation stops at the
end of the turn. `--rewired` uses the random tiny checkpoint rewired so that drafts are often
accepted (tests/mtp_checkpoint.py) with `ignore_eos`. Accept length = (accepted drafts + bonus
token) per verify step; per-layer acceptance = P(draft i accepted | reached), from SGLang's meta_info
`spec_correct_drafts_histogram` (sglang_step35.mtp_check.mtp_acceptance). On a tiny model the draft
costs about as much as the target, so tok/s shows the mechanics, not real speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from sglang_step35.mtp_check import mtp_acceptance  # noqa: E402
from sglang_step35.server import SGLangServer  # noqa: E402

CONFIGS = {
    "no_spec": [],
    "mtp1": ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "1", "--speculative-eagle-topk", "1",
             "--speculative-num-draft-tokens", "2"],
    "mtp3": ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
             "--speculative-num-draft-tokens", "4", "--enable-multi-layer-eagle"],
}


def prompts(n: int, model: str, chat: bool) -> list[str]:
    data = ROOT / "sglang_step35" / "data" / "gsm8k" / "test.jsonl"
    questions = [json.loads(line)["question"] for line in data.read_text().splitlines()[100:100 + n]]
    if not chat:
        return questions
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def run_config(model: str, name: str, args: list[str], ps: list[str], conc: int, max_new: int, dtype: str,
               ignore_eos: bool) -> dict:
    server = SGLangServer(model, ["--device", "cpu", "--max-total-tokens", "4096", "--dtype", dtype, *args])
    server.start()
    try:
        url = server.base_url + "/generate"
        body = lambda p: {"text": p, "sampling_params": {"max_new_tokens": max_new, "temperature": 0,  # noqa: E731
                                                         "ignore_eos": ignore_eos}}
        requests.post(url, json=body("warm up"), timeout=600).raise_for_status()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            outs = list(pool.map(lambda p: requests.post(url, json=body(p), timeout=600).json(), ps))
        wall = time.perf_counter() - t0
    finally:
        server.stop()
    tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    hist: list[int] = []
    for o in outs:
        for k, c in enumerate(o["meta_info"].get("spec_correct_drafts_histogram") or []):
            hist += [0] * (k + 1 - len(hist))
            hist[k] += c
    res = {"config": name, "args": args, "requests": len(ps), "concurrency": conc, "output_tokens": tokens,
           "wall_s": wall, "output_tok_s": tokens / wall}
    if hist:
        res.update(mtp_acceptance({"spec_correct_drafts_histogram": hist}))
    print(json.dumps({k: v for k, v in res.items() if k != "args"}), flush=True)
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["config"] for r in results]
    a.bar(names, [r["output_tok_s"] for r in results], color="tab:blue")
    a.set_ylabel("output tok/s (CPU, tiny)")
    a.set_title("throughput")
    b.bar(names, [r.get("accept_length") or 1.0 for r in results], color="tab:green")
    b.set_ylabel("mean accepted tokens per verify step")
    b.set_title("accept length")
    for r, x in zip(results, range(len(results))):
        if r.get("acceptance_per_layer"):
            b.text(x, (r["accept_length"] or 1) / 2, "\n".join(f"L{i}: {p:.2f}" for i, p in
                                                              enumerate(r["acceptance_per_layer"])), ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: the embedded trained tiny checkpoint)")
    ap.add_argument("--rewired", action="store_true",
                    help="random tiny checkpoint with MTP layers rewired to be predictable, ignore_eos")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", default="no_spec,mtp1,mtp3")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    a = ap.parse_args()
    if a.model and a.rewired:
        ap.error("--model and --rewired exclude each other")
    model = a.model
    if a.rewired:
        from mtp_checkpoint import write_predictable_mtp_checkpoint

        from sglang_step35.tiny import write_tiny_checkpoint

        tmp = Path(tempfile.mkdtemp(prefix="step35-mtp-bench-"))
        model = str(write_predictable_mtp_checkpoint(write_tiny_checkpoint(tmp / "tiny"), tmp / "mtp"))
    elif model is None:
        from sglang_step35.tiny import TRAINED_TINY_DIR

        model = str(TRAINED_TINY_DIR)
    ps = prompts(a.requests, model, chat=not a.rewired)
    results = [run_config(model, c, CONFIGS[c], ps, a.concurrency, a.max_new, a.dtype, ignore_eos=a.rewired)
               for c in a.configs.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mtp.json").write_text(json.dumps({"model": model, "dtype": a.dtype, "results": results}, indent=2))
    plot(results, out / "mtp.png")
    print(f"wrote {out / 'mtp.json'} and {out / 'mtp.png'}")


if __name__ == "__main__":
    main()

"""Measure the trained tiny checkpoint through plain `sglang serve` (issue 5's acceptance figures).

- GSM8K test prompts in chat form: share of answers whose reasoning is closed (`</think>`, so the
  step3p5 reasoning parser returns non-empty `content`) and whose content has a `#### N` line;
  accuracy of that N (whatever it is).
- Held-out tool prompts: share whose response carries a tool call our step3p5 parser accepted, and
  share whose call names the expected tool with the expected arguments.
Writes JSON to bench/out/tiny_eval.json and prints a summary.

    python bench/tiny_eval.py [--model DIR] [--gsm8k 100] [--tools 60]   # default: the embedded checkpoint
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI
from tqdm import tqdm

from sglang_step35.server import SGLangServer
from sglang_step35.tiny import TRAINED_TINY_DIR
from sglang_step35.training.data import TOOLS, final_answer, read_gsm8k, tool_prompts

OUT = Path(__file__).parent / "out"


def _chat(client, messages, max_tokens, tools=None):
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens, temperature=0,
                                       tools=tools)
    return r.choices[0].message


def eval_gsm8k(client, n: int, max_tokens: int, parallel: int) -> dict:
    rows = read_gsm8k("test")[:n]
    with ThreadPoolExecutor(parallel) as pool:
        msgs = list(tqdm(pool.map(lambda r: _chat(client, [{"role": "user", "content": r["question"]}], max_tokens),
                                  rows), total=n, desc="gsm8k chat"))
    closed = formatted = correct = 0
    for row, m in zip(rows, msgs):
        content = m.content or ""
        closed += bool(content.strip())
        hit = re.search(r"^#### *(-?[\d,\.]+)", content, re.M)
        formatted += bool(hit)
        correct += bool(hit) and hit.group(1).replace(",", "").rstrip(".") == final_answer(row["answer"])
    return {"n": n, "think_closed": closed / n, "hash_answer_line": formatted / n, "accuracy": correct / n}


def eval_tools(client, n: int, max_tokens: int, parallel: int) -> dict:
    prompts = tool_prompts(held_out=True)[:n]
    with ThreadPoolExecutor(parallel) as pool:
        msgs = list(tqdm(pool.map(lambda p: _chat(client, p.messages, max_tokens, TOOLS), prompts),
                         total=len(prompts), desc="tool prompts"))
    parsed = exact = 0
    for p, m in zip(prompts, msgs):
        calls = m.tool_calls or []
        parsed += bool(calls)
        if calls and calls[0].function.name == p.tool:
            exact += _arguments(calls[0].function.arguments) == p.arguments
    return {"n": len(prompts), "parsed_call": parsed / len(prompts), "exact_call": exact / len(prompts)}


def _arguments(text: str):
    """A call cut off by max_tokens keeps its arguments as generated (unclosed JSON): not exact."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TRAINED_TINY_DIR),
                    help="checkpoint dir, e.g. the output of `step35 train-tiny` (default: the embedded one)")
    ap.add_argument("--gsm8k", type=int, default=100)
    ap.add_argument("--tools", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--parallel", type=int, default=8)
    args = ap.parse_args(argv)
    t0 = time.time()
    with SGLangServer(args.model, ["--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5"]) as server:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
        result = {"model": args.model, "gsm8k_chat": eval_gsm8k(client, args.gsm8k, args.max_tokens, args.parallel),
                  "tools_held_out": eval_tools(client, args.tools, 96, args.parallel)}
    result["seconds"] = round(time.time() - t0, 1)
    OUT.mkdir(exist_ok=True)
    (OUT / "tiny_eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

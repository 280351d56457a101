"""Agent sessions bench: how much of each turn's prompt SGLang serves from its radix cache.

Step-3.5 is built for agents, which resend a growing conversation every turn. With sliding layers
SGLang's radix cache can only reuse a cached prefix whose last window of sliding-layer KV is still
in the SWA pool (sglang #35515: a session parked on a slow tool can lose that tail under SWA-pool
pressure, and then its whole prefix stops matching). This bench measures it through the public API:

* N concurrent sessions x M turns. Each session starts from one long agent system prompt (the tools
  block plus workspace notes: shared by every session, as in real agent deployments) and a task.
  Every turn appends the assistant's reasoning, its tool call (the trained tiny checkpoint writes
  them; where a reply carries none the task's intended call is appended and counted as scripted)
  and a tool result, then asks the next task.
* Per turn: prompt tokens, cached tokens (SGLang's ``--enable-cache-report``:
  ``usage.prompt_tokens_details.cached_tokens``), the cached share of the prompt, and TTFT (streamed).
* Two scenarios per server: ``steady`` (all sessions every round) and ``parked`` (more sessions,
  some idle for a few rounds while the others run, then resuming: the #35515 pattern); the radix
  cache is flushed between them.
* Pool set-ups (one ``sglang serve`` each, one at a time): ``planned`` (the hybrid SWA pool at the
  ratio sglang-step35's launch policy plans: the flag left unset), ``sglang-default``
  (``--swa-full-tokens-ratio 0.8``), ``one-pool`` (``--disable-hybrid-swa-memory``), and
  ``planned+session-radix`` (``--enable-session-radix-cache``, sessions sent with a ``session_id``:
  SGLang 0.5.23's UnifiedRadixCache then evicts KV no open session references first).

Default: the embedded trained tiny checkpoint on CPU at a size that fits ~10 min on 2 cores. With
``--base-url`` it measures a running deployment instead (started with ``--enable-cache-report``;
label it with ``--label``). JSON + PNG go to bench/out/agent_sessions.{json,png}.

    python bench/agent_sessions.py                                  # CPU, trained tiny, all set-ups
    python bench/agent_sessions.py --sessions 2 --turns 2 --setups planned --scenarios steady
    python bench/agent_sessions.py --base-url http://gpu-host:30000 --label flash-planned \\
        --sessions 32 --turns 8 --notes 400 --max-tokens 512
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout as `python bench/agent_sessions.py`

from sglang_step35.training.data import TOOLS, read_gsm8k, tool_prompts  # noqa: E402

OUT_DIR = ROOT / "bench" / "out"
TARGET_SHARE = 0.9  # issue 26: every turn after the first serves >= 90% of its prompt from cache
# label -> extra `sglang serve` flags. "planned" leaves --swa-full-tokens-ratio unset, so the
# plugin's launch policy plans it (its log line is recorded); the others are SGLang's own switches.
SETUPS: dict[str, list[str]] = {
    "planned": [],
    "sglang-default": ["--swa-full-tokens-ratio", "0.8"],
    "one-pool": ["--disable-hybrid-swa-memory"],
    "planned+session-radix": ["--enable-session-radix-cache"],
}
SESSION_SETUPS = {"planned+session-radix"}  # set-ups whose requests carry a session_id
SCENARIOS = ("steady", "parked")
# Server flags every CPU run shares: the cache report, Step-3.5's parsers, and a KV budget, chunk and
# running-request count that give the planned ratio a real load to size for (with the CPU defaults,
# chunked prefill unset, the policy must assume 16,384-token chunks: ratio 1.0 on the tiny's 16,384
# tokens). Two running requests: the steady scenario's sessions all run at once, the parked one
# has three times as many sessions as running slots, so cached prefixes outnumber planned windows.
CPU_SERVER_ARGS = ["--enable-cache-report", "--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5",
                   "--max-total-tokens", "8192", "--chunked-prefill-size", "128", "--max-running-requests", "2"]
PLANNED_RE = re.compile(r"--swa-full-tokens-ratio ([0-9.]+) planned")
POOL_RE = re.compile(r"SWAKVPool mem usage: .*swa size: (\d+), full size: (\d+)")


@dataclass
class Scenario:
    name: str
    sessions: int
    turns: int
    parked: int = 0  # sessions that sit out `park_rounds` rounds after their first turn
    park_rounds: int = 0


@dataclass
class Session:
    sid: int
    messages: list
    tasks: list  # tool_prompts entries, one per turn
    session_id: Optional[str] = None  # SGLang radix session id (session-radix set-ups only)
    turn: int = 0
    parked_left: int = 0
    records: list = field(default_factory=list)


def system_prompt(notes: int) -> str:
    """An agent system prompt: instructions plus `notes` workspace notes (GSM8K train questions,
    text the tiny tokenizer knows), the long shared prefix agent deployments send every turn."""
    rows = read_gsm8k("train")[:notes]
    body = "\n".join(f"- {r['question']}" for r in rows)
    return ("You are an agent working for the user. Use the tools to act; answer briefly.\n"
            f"Workspace notes:\n{body}")


def tool_result(name: str, args: dict) -> str:
    """A deterministic tool output for the call, as a tool runner would return it."""
    if name == "get_weather":
        return json.dumps({"location": args.get("location"), "days": args.get("days"),
                           "forecast": ["sunny", "cloudy", "rain"][len(str(args.get("location", ""))) % 3]})
    if name == "calculator":
        expr = str(args.get("expression", ""))
        value = eval(expr, {"__builtins__": {}}) if re.fullmatch(r"[\d\s+*\-]+", expr) else None  # digits/ops only
        return json.dumps({"expression": expr, "value": value})
    return json.dumps({"status": "sent", **{k: v for k, v in args.items()}})


def _parse_args(text: str) -> Optional[dict]:
    try:
        v = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None
    return v if isinstance(v, dict) else None


def stream_chat(base_url: str, model: str, messages: list, max_tokens: int, session_id: Optional[str],
                timeout: float) -> dict:
    """One streamed chat completion; TTFT is the time to the first chunk carrying generated text
    (reasoning, content or a tool call). Usage comes from the final chunk (include_usage)."""
    body = {"model": model, "messages": messages, "tools": TOOLS, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if session_id is not None:
        body["session_id"] = session_id
    t0 = time.perf_counter()
    ttft = None
    reasoning, content, usage = [], [], None
    calls: dict[int, dict] = {}
    with requests.post(base_url + "/v1/chat/completions", json=body, stream=True, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"chat completion failed ({r.status_code}): {r.text[:500]}")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"chat completion failed: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                got = False
                if delta.get("reasoning_content"):
                    reasoning.append(delta["reasoning_content"])
                    got = True
                if delta.get("content"):
                    content.append(delta["content"])
                    got = True
                for tc in delta.get("tool_calls") or []:
                    slot = calls.setdefault(tc.get("index", 0), {"name": "", "arguments": ""})
                    fn = tc.get("function") or {}
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
                    got = True
                if got and ttft is None:
                    ttft = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the stream carried no usage: the server must send it with stream_options.include_usage")
    details = usage.get("prompt_tokens_details")
    if not details or details.get("cached_tokens") is None:
        raise RuntimeError("usage has no prompt_tokens_details.cached_tokens: start the server with "
                           "--enable-cache-report")
    return {"ttft_s": ttft, "prompt_tokens": usage["prompt_tokens"], "cached_tokens": details["cached_tokens"],
            "completion_tokens": usage.get("completion_tokens"), "reasoning": "".join(reasoning),
            "content": "".join(content), "tool_calls": [calls[i] for i in sorted(calls)]}


def run_turn(base_url: str, model: str, s: Session, rnd: int, max_tokens: int, timeout: float,
             resumed: bool) -> dict:
    task = s.tasks[s.turn]
    s.messages.append({"role": "user", "content": task.messages[-1]["content"]})
    out = stream_chat(base_url, model, s.messages, max_tokens, s.session_id, timeout)
    # The model's own call when it wrote a parseable one, else the task's intended call (scripted).
    model_call = next((c for c in out["tool_calls"] if c["name"] and _parse_args(c["arguments"]) is not None), None)
    if model_call is not None:
        name, args, source = model_call["name"], _parse_args(model_call["arguments"]), "model"
    else:
        name, args, source = task.tool, task.arguments, "scripted"
    call_id = f"call_{s.sid}_{s.turn}"
    s.messages.append({"role": "assistant", "content": out["content"], "reasoning_content": out["reasoning"] or None,
                       "tool_calls": [{"id": call_id, "type": "function",
                                       "function": {"name": name, "arguments": json.dumps(args)}}]})
    s.messages.append({"role": "tool", "tool_call_id": call_id, "content": tool_result(name, args)})
    rec = {"session": s.sid, "turn": s.turn + 1, "round": rnd, "resumed_after_park": resumed,
           "prompt_tokens": out["prompt_tokens"], "cached_tokens": out["cached_tokens"],
           "cached_share": out["cached_tokens"] / out["prompt_tokens"] if out["prompt_tokens"] else None,
           "ttft_ms": None if out["ttft_s"] is None else round(out["ttft_s"] * 1000, 2),
           "completion_tokens": out["completion_tokens"], "tool_call": source}
    s.turn += 1
    s.records.append(rec)
    return rec


def run_scenario(base_url: str, model: str, sc: Scenario, notes: int, max_tokens: int, timeout: float,
                 use_sessions: bool, bar=None) -> list[dict]:
    """Rounds of concurrent turns: each round every session that is neither parked nor done takes
    its next turn; parked sessions sit out `park_rounds` rounds after their first turn."""
    sys_prompt = system_prompt(notes)
    tasks = tool_prompts(held_out=True)
    sessions = []
    for i in range(sc.sessions):
        sid = f"agent-{uuid.uuid4().hex[:12]}" if use_sessions else None
        sessions.append(Session(i, [{"role": "system", "content": sys_prompt}],
                                [tasks[(i * sc.turns + t) % len(tasks)] for t in range(sc.turns)], sid))
    lock = threading.Lock()
    records: list[dict] = []
    rnd = 0
    try:
        with ThreadPoolExecutor(max(1, sc.sessions)) as pool:
            while any(s.turn < sc.turns for s in sessions):
                active = [s for s in sessions if s.turn < sc.turns and s.parked_left == 0]
                for s in sessions:
                    if s.turn < sc.turns and s.parked_left > 0:
                        s.parked_left -= 1
                resumed = {s.sid: bool(s.records) and s.records[-1]["round"] < rnd - 1 for s in active}

                def one(s, rnd=rnd, resumed=resumed):
                    rec = run_turn(base_url, model, s, rnd, max_tokens, timeout, resumed[s.sid])
                    with lock:
                        records.append(rec)
                        if bar is not None:
                            bar.update(1)
                    return rec

                list(pool.map(one, active))
                for s in active:
                    if s.turn == 1 and s.sid < sc.parked:
                        s.parked_left = sc.park_rounds
                rnd += 1
    finally:
        for s in sessions:
            if s.session_id is not None:
                requests.post(base_url + "/close_session", json={"session_id": s.session_id}, timeout=30)
    return sorted(records, key=lambda r: (r["session"], r["turn"]))


def summarize(records: list[dict]) -> dict:
    """Per turn: median / min cached share and median TTFT; over turns after the first: the minimum
    share and whether it meets the target; the shares of turns that resumed after a park."""
    by_turn: dict[int, list[dict]] = {}
    for r in records:
        by_turn.setdefault(r["turn"], []).append(r)
    per_turn = {}
    for t, rs in sorted(by_turn.items()):
        shares = [r["cached_share"] for r in rs if r["cached_share"] is not None]
        ttfts = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
        per_turn[t] = {"n": len(rs), "median_cached_share": statistics.median(shares) if shares else None,
                       "min_cached_share": min(shares) if shares else None,
                       "median_prompt_tokens": statistics.median(r["prompt_tokens"] for r in rs),
                       "median_ttft_ms": statistics.median(ttfts) if ttfts else None}
    later = [r["cached_share"] for r in records if r["turn"] > 1 and r["cached_share"] is not None]
    resumed = [r["cached_share"] for r in records if r["resumed_after_park"]]
    parked_ids = {r["session"] for r in records if r["resumed_after_park"]}
    never_parked = [r["cached_share"] for r in records
                    if r["turn"] > 1 and r["session"] not in parked_ids and r["cached_share"] is not None]
    return {
        "per_turn": per_turn,
        "min_share_after_turn1": min(later) if later else None,
        "median_share_after_turn1": statistics.median(later) if later else None,
        "target_met": bool(later) and min(later) >= TARGET_SHARE,
        "resumed_after_park_shares": resumed,
        "min_share_after_turn1_never_parked": min(never_parked) if never_parked else None,
        "tool_calls_by_model": sum(r["tool_call"] == "model" for r in records),
        "tool_calls_scripted": sum(r["tool_call"] == "scripted" for r in records),
    }


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    scen = sorted({sc for r in results.values() for sc in r["scenarios"]}, key=SCENARIOS.index)
    if not scen:  # every set-up failed: nothing to draw
        return
    fig, axes = plt.subplots(2, len(scen), figsize=(5.5 * len(scen), 7.5), squeeze=False)
    for j, sc in enumerate(scen):
        for label, res in results.items():
            summ = res["scenarios"].get(sc, {}).get("summary")
            if not summ:
                continue
            turns = sorted(int(t) for t in summ["per_turn"])
            row = [summ["per_turn"][t] for t in turns]
            line, = axes[0][j].plot(turns, [100 * (p["median_cached_share"] or 0) for p in row], marker="o",
                                    label=f"{label} (median)")
            # The minimum too: one session losing its prefix hides behind the median.
            axes[0][j].plot(turns, [100 * (p["min_cached_share"] or 0) for p in row], ls=":", marker="v",
                            color=line.get_color(), label=f"{label} (min)")
            axes[1][j].plot(turns, [p["median_ttft_ms"] or 0 for p in row], marker="o", label=label)
            for ax in (axes[0][j], axes[1][j]):
                ax.set_xticks(turns)
        axes[0][j].axhline(100 * TARGET_SHARE, color="grey", ls="--", lw=0.8)
        axes[0][j].set_title(f"{sc}: cached share of the prompt (%), median and min", fontsize=10)
        axes[1][j].set_title(f"{sc}: median TTFT (ms)", fontsize=10)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xlabel("turn")
            ax.grid(alpha=0.3)
        axes[0][j].set_ylim(0, 105)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine_description() -> dict:
    return {"host_cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
            "python": platform.python_version()}


def measure(base_url: str, model: str, scenarios: list[Scenario], args, use_sessions: bool, bar) -> dict:
    out = {}
    for sc in scenarios:
        requests.post(base_url + "/flush_cache", timeout=60)  # each scenario starts from an empty cache
        load = os.getloadavg()[0]
        t0 = time.time()
        recs = run_scenario(base_url, model, sc, args.notes, args.max_tokens, args.timeout, use_sessions, bar)
        out[sc.name] = {"scenario": asdict(sc), "records": recs, "summary": summarize(recs),
                        "seconds": round(time.time() - t0, 1), "load_avg_1m": [round(load, 2),
                                                                               round(os.getloadavg()[0], 2)]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint to serve (default: the embedded trained tiny checkpoint)")
    p.add_argument("--base-url", help="measure a running deployment (started with --enable-cache-report)")
    p.add_argument("--label", default="deployment", help="with --base-url: the name of its set-up in the output")
    p.add_argument("--session-radix", action="store_true",
                   help="with --base-url: send session ids (a server with --enable-session-radix-cache)")
    p.add_argument("--setups", default=",".join(SETUPS), help=f"pool set-ups to serve, from {', '.join(SETUPS)}")
    p.add_argument("--setup", action="append", default=[], metavar="LABEL=FLAGS",
                   help='one more set-up: its label and `sglang serve` flags, e.g. --setup "ratio-0.2=--swa-full-tokens-ratio 0.2"')
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--server-args", default=shlex.join(CPU_SERVER_ARGS),
                   help="flags every started server gets (default: the CPU bench's KV budget, chunk, parsers)")
    p.add_argument("--sessions", type=int, default=2, help="sessions in the steady scenario")
    p.add_argument("--turns", type=int, default=3, help="turns per session")
    p.add_argument("--parked-sessions", type=int, default=6, help="sessions in the parked scenario")
    p.add_argument("--parked", type=int, default=2, help="of those, sessions idle for --park-rounds rounds")
    p.add_argument("--park-rounds", type=int, default=1)
    p.add_argument("--notes", type=int, default=12, help="workspace notes in the shared system prompt")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per assistant reply")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--name", default="agent_sessions", help="basename of the JSON/PNG outputs")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)

    import sglang
    from tqdm import tqdm

    scen_names = [s for s in args.scenarios.split(",") if s]
    bad = set(scen_names) - set(SCENARIOS)
    if bad:
        p.error(f"unknown --scenarios {sorted(bad)}; choose from {', '.join(SCENARIOS)}")
    scenarios = [Scenario("steady", args.sessions, args.turns) if n == "steady" else
                 Scenario("parked", args.parked_sessions, args.turns, args.parked, args.park_rounds)
                 for n in scen_names]
    if args.base_url:
        targets = {args.label: None}
        model_path = None
    else:
        targets = {s: SETUPS.get(s) for s in args.setups.split(",") if s}
        bad = [s for s, v in targets.items() if v is None]
        if bad:
            p.error(f"unknown --setups {bad}; choose from {', '.join(SETUPS)}")
        for spec in args.setup:
            label, sep, flags = spec.partition("=")
            if not sep or not label or label in targets:
                p.error(f"--setup {spec!r}: give LABEL=FLAGS with a new label")
            targets[label] = shlex.split(flags)
        from sglang_step35.tiny import TRAINED_TINY_DIR

        model_path = str(Path(args.model).resolve()) if args.model else str(TRAINED_TINY_DIR)
    args.out.mkdir(parents=True, exist_ok=True)
    total = len(targets) * sum(sc.sessions * sc.turns for sc in scenarios)
    bar = tqdm(total=total, desc="agent turns", unit="turn")
    results: dict[str, dict] = {}
    for label, extra in targets.items():
        server = None
        url, info = args.base_url, {"base_url": args.base_url}
        use_sessions = label in SESSION_SETUPS or (args.base_url is not None and args.session_radix)
        try:
            if url is None:
                from sglang_step35.server import SGLangServer

                bar.set_postfix_str(f"starting {label}")
                server = SGLangServer(model_path, [*shlex.split(args.server_args), *extra])
                info = {"command": shlex.join(server.command()[1:])}
                server.start()
                url = server.base_url
                log = server.log_text()
                planned, pool = PLANNED_RE.search(log), POOL_RE.search(log)
                info |= {"planned_ratio": float(planned.group(1)) if planned else None,
                         "swa_pool_tokens": int(pool.group(1)) if pool else None,
                         "full_pool_tokens": int(pool.group(2)) if pool else None}
            model = requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            bar.set_postfix_str(label)
            results[label] = {"server": info, "session_ids": use_sessions,
                              "scenarios": measure(url, model, scenarios, args, use_sessions, bar)}
        except (RuntimeError, TimeoutError, requests.RequestException) as e:
            if args.base_url:
                raise
            # One set-up SGLang refuses (or that fails mid-run) must not lose the others' figures.
            results[label] = {"server": info, "session_ids": use_sessions, "scenarios": {},
                              "error": f"{type(e).__name__}: {e}"[-1500:],
                              "log_tail": server.log_tail(15) if server is not None else ""}
            print(f"[agent-bench] {label} failed: {results[label]['error']}", file=sys.stderr)
        finally:
            if server is not None:
                server.stop()
    bar.close()

    report = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_description(), "sglang_version": sglang.__version__,
              "model": model_path or args.base_url, "target_share_after_turn1": TARGET_SHARE,
              "settings": {k: getattr(args, k) for k in ("sessions", "turns", "parked_sessions", "parked",
                                                         "park_rounds", "notes", "max_tokens", "server_args")},
              "results": results}
    json_path, png_path = args.out / f"{args.name}.json", args.out / f"{args.name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        plot(results, png_path, f"Step-3.5 agent sessions ({Path(model_path).name if model_path else args.base_url})")
    for label, res in results.items():
        if res.get("error"):
            print(f"{label:<22} FAILED: {res['error'][:300]}")
        for sc, r in res["scenarios"].items():
            s = r["summary"]
            shares = " ".join(f"t{t}:{100 * (v['median_cached_share'] or 0):.0f}%/{v['median_ttft_ms'] or 0:.0f}ms"
                              for t, v in s["per_turn"].items())
            print(f"{label:<22} {sc:<7} min share after turn 1 {100 * (s['min_share_after_turn1'] or 0):5.1f}% "
                  f"(target {'met' if s['target_met'] else 'MISSED'}); resumed {[round(x, 3) for x in s['resumed_after_park_shares']]}; "
                  f"{shares}")
    print(f"[agent-bench] wrote {json_path}" + ("" if args.no_plot else f" and {png_path}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

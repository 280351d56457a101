"""Smoke of the agent sessions bench (bench/agent_sessions.py, `make bench-agent`) at tiny size.

Two concurrent sessions x two turns (`--base-url`, as against a real deployment) on the session's
trained tiny server (conftest `served_trained`: the hybrid SWA pool at the ratio the launch policy
plans, --enable-cache-report, the step3p5 parsers); the bench's own servers (its CPU flags, the
other pool set-ups) are `make bench-agent`'s. The JSON carries every per-turn field, and the second
turn of each session serves at least 90% of its prompt from SGLang's radix cache (issue 26's target).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import agent_sessions  # noqa: E402

RECORD_FIELDS = {"session", "turn", "round", "resumed_after_park", "prompt_tokens", "cached_tokens", "cached_share",
                 "ttft_ms", "completion_tokens", "tool_call"}


@pytest.mark.server
def test_agent_bench_smoke(served_trained, tmp_path):
    # The session's trained-checkpoint server (conftest: --enable-cache-report, no explicit
    # --swa-full-tokens-ratio): the launch policy planned its SWA ratio (the "planned" set-up).
    planned_server = served_trained
    assert agent_sessions.PLANNED_RE.search(planned_server.log_text()), planned_server.log_tail()
    rc = agent_sessions.main(["--base-url", planned_server.base_url, "--label", "planned", "--sessions", "2",
                              "--turns", "2", "--scenarios", "steady", "--max-tokens", "12", "--out", str(tmp_path),
                              "--name", "smoke"])
    assert rc == 0
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert report["target_share_after_turn1"] == 0.9
    assert shlex.split(report["settings"]["server_args"]) == agent_sessions.CPU_SERVER_ARGS
    steady = report["results"]["planned"]["scenarios"]["steady"]
    records = steady["records"]
    assert [(r["session"], r["turn"]) for r in records] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    for r in records:
        assert RECORD_FIELDS <= set(r)
        assert 0 <= r["cached_tokens"] <= r["prompt_tokens"]
        assert r["cached_share"] == pytest.approx(r["cached_tokens"] / r["prompt_tokens"])
        assert r["ttft_ms"] > 0 and r["tool_call"] in ("model", "scripted")
    for r in records:
        if r["turn"] == 2:
            # The turn resends turn 1's prompt and reply plus a tool call, its result and a new task.
            first = next(x for x in records if x["session"] == r["session"] and x["turn"] == 1)
            assert r["prompt_tokens"] > first["prompt_tokens"]
            assert r["cached_share"] >= 0.9, records
    summary = steady["summary"]
    assert summary["target_met"] is True
    assert summary["min_share_after_turn1"] == min(r["cached_share"] for r in records if r["turn"] == 2)
    assert set(summary["per_turn"]) == {"1", "2"}

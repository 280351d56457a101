"""bench/serving.py and bench/gsm8k.py: scenario scaling, ratios, harness parsing, and one real tiny run
of each against the shared CPU server (SGLang's own bench_serving and few_shot_gsm8k as subprocesses,
as the benches run them; each bench's `main` with its command-line arguments in this process).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


serving = _load("serving")
gsm8k = _load("gsm8k")


def test_full_scale_is_the_seed_table():
    got = {s.name: (s.num_prompts, s.concurrency, s.input_len, s.output_len) for s in serving.scaled_scenarios(
        ["low", "medium", "high"], 1.0)}
    assert got == {"low": (10, 1, 1000, 1000), "medium": (80, 16, 1000, 1000), "high": (500, 100, 1000, 1000)}


def test_scaling_keeps_every_scenario_meaningful():
    low, med, high = serving.scaled_scenarios(["low", "medium", "high"], 0.1)
    assert (low.num_prompts, low.concurrency) == (2, 1)  # at least 2 prompts: a median is not one sample
    assert (med.num_prompts, med.concurrency) == (8, 2)
    assert (high.num_prompts, high.concurrency, high.input_len, high.output_len) == (50, 10, 100, 100)
    (tiny,) = serving.scaled_scenarios(["high"], 0.1, num_prompts=3, input_len=16, output_len=8)
    assert (tiny.num_prompts, tiny.concurrency, tiny.input_len, tiny.output_len) == (3, 3, 16, 8)
    with pytest.raises(ValueError):
        serving.scaled_scenarios(["low"], 0.0)
    with pytest.raises(ValueError):
        serving.scaled_scenarios(["extreme"], 1.0)


def test_bench_serving_command_is_offline_and_fixed_length():
    (sc,) = serving.scaled_scenarios(["medium"], 1.0)
    cmd = serving.bench_serving_command("http://h:1", sc, Path("/tmp/o.jsonl"), "/m", seed=1)
    flags = dict(zip(cmd, cmd[1:]))
    assert cmd[1:3] == ["-m", "sglang.bench_serving"]
    assert flags["--dataset-name"] == "random-ids"  # `random` would download ShareGPT
    assert "--tokenize-prompt" in cmd and flags["--random-range-ratio"] == "1.0"
    assert (flags["--num-prompts"], flags["--max-concurrency"]) == ("80", "16")
    assert (flags["--random-input-len"], flags["--random-output-len"]) == ("1000", "1000")


def test_ratios_are_ours_over_builtin():
    res = {
        "ours": {"low": {"output_throughput": 30.0, "median_tpot_ms": 10.0, "median_ttft_ms": 50.0}},
        "builtin": {"low": {"output_throughput": 20.0, "median_tpot_ms": 20.0, "median_ttft_ms": 0.0}},
    }
    assert serving.ratios(res) == {"low": {"output_throughput": 1.5, "median_tpot_ms": 0.5, "median_ttft_ms": None}}
    assert serving.ratios({"ours": res["ours"]}) == {}


def test_gsm8k_harness_output_parsing():
    text = "100%|####| 2/2\nAccuracy: 0.885\nInvalid: 0.005\nLatency: 61.250 s\nOutput throughput: 2345.678 token/s\n"
    assert gsm8k.parse_harness_output(text) == {
        "accuracy": 0.885, "invalid": 0.005, "latency_s": 61.25, "output_throughput_tok_s": 2345.678}
    with pytest.raises(ValueError):
        gsm8k.parse_harness_output("Accuracy: 0.5\n")  # a crashed run must not produce a report


def _numbers(d: dict) -> bool:
    return all(isinstance(v, (int, float)) and v == v and v >= 0 for v in d.values())


@pytest.mark.server
def test_serving_tiny_run_writes_json_and_png(served_trained, tmp_path, capsys):
    # Both labels point at the one shared server: exercises the two-model JSON, ratio and plot paths
    # without a second `sglang serve` (CI time); the ratio of a server to itself is ~1.
    rc = serving.main([
        "--base-url", served_trained.base_url, "--builtin-base-url", served_trained.base_url,
        "--tokenizer", served_trained.model_path, "--scenarios", "low",
        "--num-prompts", "2", "--input-len", "16", "--output-len", "16",
        "--out", str(tmp_path), "--name", "t",
    ])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout[-3000:]
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["scenarios"] == [
        {"name": "low", "num_prompts": 2, "concurrency": 1, "input_len": 16, "output_len": 16}]
    for label in ("ours", "builtin"):
        r = report["results"][label]["low"]
        assert r["completed"] == 2 and r["total_output_tokens"] == 32 and r["total_input_tokens"] == 32
        metrics = {k: r[k] for k in ("output_throughput", "median_tpot_ms", "median_ttft_ms", "duration")}
        assert _numbers(metrics) and metrics["output_throughput"] > 0, metrics
    ratio = report["ratio_ours_over_builtin"]["low"]
    assert _numbers(ratio) and ratio["output_throughput"] > 0
    assert "ratio ours/built-in low" in stdout
    png = (tmp_path / "t.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000  # a rendered figure, not an empty canvas


@pytest.mark.server
def test_gsm8k_tiny_run_against_running_server(served_trained, tmp_path):
    host, port = served_trained.base_url.removeprefix("http://").split(":")
    assert gsm8k.main(["--host", host, "--port", port, "--num-questions", "2", "--max-new-tokens", "8",
                       "--parallel", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gsm8k.json").read_text())
    assert report["num_questions"] == 2 and "--data-path" in report["command"]
    assert 0 <= report["accuracy"] <= 1 and 0 <= report["invalid"] <= 1
    assert report["latency_s"] > 0 and report["output_throughput_tok_s"] > 0

"""MTP (multi-layer EAGLE) speculative decoding through plain `sglang serve --device cpu`.

At temperature 0 MTP-3 and MTP-1 must produce the tokens of plain greedy decoding: 16 prompts (MTP-1:
6 of them), one at a time and 4 concurrent, prompts and generations longer than the sliding window (16), and
radix-cache hits. Plain greedy decoding is the fp32 reference's (sglang_step35.reference, teacher-forced
on each served sequence): every served token is the reference's argmax, up to REF_TIE near-ties
(the plain `sglang serve` of the same model is the reference's within 1e-4, tests/test_parity_served.py).
The checkpoint is the tiny one rewired so that MTP drafts are often right
(tests/mtp_checkpoint.py): with random weights nothing would ever be accepted and the accept paths
would go untested. Servers run in float32: on CPU, bf16 attention/GEMMs over a 4-token verify batch
round differently from 1-token decode steps, which flips near-tied argmaxes of a random model
(measured: identical in fp32, one divergence in two bf16 prompts) — a numerics effect, not MTP's.

One server at a time: each fixture starts its server, collects every result, and stops it.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from safetensors.torch import load_file, save_file

from mtp_checkpoint import write_predictable_mtp_checkpoint
from reference import Step35Reference
from reference.serving import reference_greedy_ties
from sglang_step35.mtp_check import Step35MTPError, check_mtp_request, mtp_acceptance
from sglang_step35.server import SGLangServer

pytestmark = pytest.mark.server

MAX_NEW = 32  # > sliding window 16, prompts are longer than it too
# A served token counts as the reference's greedy choice if its fp32 reference logprob is within this
# of the best (fp32 server vs fp32 reference: ~2e-6, tests/test_parity_served.py); at most MAX_TIES
# positions of all may be that close to a tie, so the check cannot pass on a flat distribution.
REF_TIE, MAX_TIES = 1e-3, 8
COMMON = ["--device", "cpu", "--max-total-tokens", "4096", "--dtype", "float32"]
MTP3 = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "4", "--enable-multi-layer-eagle"]
MTP1 = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "1", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "2"]
# MTP-3 runs on SGLang's hybrid SWA pool with the sliding layers' pool at 3% of the full one: 122
# slots, fewer than 4 concurrent requests hold (measured peak ~165 at 512 slots), so admission and
# retraction run under SWA pressure, with the draft's own SWA pool; MTP-1 runs at the planned ratio.
SMALL_SWA = ["--swa-full-tokens-ratio", "0.03"]
SWA_POOL_LINE = "Use sliding window memory pool. full_layer_tokens=4096, swa_layer_tokens="


def _prompts() -> list[str]:
    data = Path(__file__).resolve().parents[1] / "sglang_step35" / "data" / "gsm8k" / "test.jsonl"
    qs = [json.loads(line)["question"] for line in data.read_text().splitlines()[:14]]
    # Two prompts sharing a long prefix with qs[0]: radix-cache hits inside a batch too.
    return qs + [qs[0] + " Explain each step.", qs[0] + " Answer briefly."]


PROMPTS = _prompts()


def _prompt_ids(model_dir) -> list[list[int]]:
    """PROMPTS as the checkpoint's tokenizer encodes them (sent as input_ids: the reference reads ids)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return [tok(p)["input_ids"] for p in PROMPTS]


def _generate(url: str, ids: list[int], temperature: float = 0.0) -> dict:
    params = {"max_new_tokens": MAX_NEW, "temperature": temperature, "ignore_eos": True}
    if temperature > 0:
        params["top_p"] = 0.95
    r = requests.post(url + "/generate", json={"input_ids": ids, "sampling_params": params}, timeout=600)
    r.raise_for_status()
    return r.json()


def _run_all(server: SGLangServer, prompts: list[list[int]], n_bs1: int) -> dict:
    """The first `n_bs1` prompts one at a time, the rest 4 at a time, a repeat of prompt 0 (cached) and
    `n_bs1` sampled runs."""
    url = server.base_url
    out = {"prompts": prompts, "bs1": [_generate(url, p) for p in prompts[:n_bs1]]}
    with ThreadPoolExecutor(4) as pool:
        out["bs4"] = []
        for i in range(n_bs1, len(prompts), 4):
            out["bs4"] += list(pool.map(lambda p: _generate(url, p), prompts[i:i + 4]))
        out["repeat"] = _generate(url, prompts[0])  # whole prompt cached now
        out["sampled"] = list(pool.map(lambda p: _generate(url, p, 0.9), prompts[:n_bs1]))
    out["log"] = server.log_text()
    return out


def _serve_and_run(model_dir, args, env=None, which=None, n_bs1=4) -> dict:
    """Serve `model_dir` and run `_run_all` on PROMPTS (or those at the indices `which`)."""
    server = SGLangServer(str(model_dir), COMMON + args, env=env)
    server.start()
    try:
        ids = _prompt_ids(model_dir)
        return _run_all(server, [ids[i] for i in which] if which else ids, n_bs1)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mtp_dir(tiny_dir, tmp_path_factory):
    return write_predictable_mtp_checkpoint(tiny_dir, tmp_path_factory.mktemp("tiny-mtp"))


@pytest.fixture(scope="module")
def nested_mtp_dir(mtp_dir, tmp_path_factory):
    """Same weights, MTP decoder tensors under `model.layers.{n+i}.transformer.` (some checkpoints)."""
    d = tmp_path_factory.mktemp("tiny-mtp-nested")
    n = json.loads((mtp_dir / "config.json").read_text())["num_hidden_layers"]
    for f in mtp_dir.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    w = load_file(str(mtp_dir / "model.safetensors"))
    nested = {}
    for k, v in w.items():
        m = re.match(r"model\.layers\.(\d+)\.(self_attn|mlp|input_layernorm|post_attention_layernorm)\.", k)
        if m and int(m.group(1)) >= n:
            k = k.replace(f"model.layers.{m.group(1)}.", f"model.layers.{m.group(1)}.transformer.", 1)
        nested[k] = v
    save_file(nested, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def reference(mtp_dir):
    return Step35Reference(mtp_dir)  # nested_mtp_dir holds the same weights


@pytest.fixture(scope="module")
def mtp3(mtp_dir):
    # SGLANG_ENABLE_SPEC_V2 is not read by SGLang 0.5.23 (EAGLE always runs the v2 worker; on CPU
    # without overlap): set here so the flag users copy from guides is shown to be harmless.
    return _serve_and_run(mtp_dir, MTP3 + SMALL_SWA, env={"SGLANG_ENABLE_SPEC_V2": "1"})


# MTP-1 on 6 of the prompts: 2 alone, one batch of 4 with the two sharing prompt 0's prefix (MTP-3
# runs all 16: the batching, retraction and cache paths both share are exercised there at length).
MTP1_PROMPTS = (0, 1, 2, 3, 14, 15)


@pytest.fixture(scope="module")
def mtp1(nested_mtp_dir, mtp3):  # after mtp3: never two servers at once
    return _serve_and_run(nested_mtp_dir, MTP1, which=MTP1_PROMPTS, n_bs1=2)


def _assert_plain_greedy_tokens(spec, ref, cache_hit=True):
    """Every greedy output (bs1, bs4 and the cached repeat of prompt 0) is plain greedy decoding: at
    each position the served token is the reference's argmax (teacher-forced on the served sequence)."""
    prompts = spec["prompts"]
    runs = spec["bs1"] + spec["bs4"] + [spec["repeat"]]
    assert len(runs) == len(prompts) + 1
    ties = 0
    for prompt, resp in zip([*prompts, prompts[0]], runs):
        assert len(resp["output_ids"]) == MAX_NEW
        ties += reference_greedy_ties(ref, prompt, resp["output_ids"], REF_TIE)
    assert ties <= MAX_TIES, f"{ties} near-tied positions: the comparison would not tell tokens apart"
    assert spec["repeat"]["output_ids"] == spec["bs1"][0]["output_ids"]
    if cache_hit:  # not under SMALL_SWA: its 122 slots may legitimately evict the prefix's window first
        assert spec["repeat"]["meta_info"]["cached_tokens"] > 0  # radix-cache hit on the repeat


def _totals(spec):
    hist = []
    for r in spec["bs1"] + spec["bs4"] + [spec["repeat"]]:
        for k, c in enumerate(r["meta_info"]["spec_correct_drafts_histogram"]):
            hist += [0] * (k + 1 - len(hist))
            hist[k] += c
    return mtp_acceptance({"spec_correct_drafts_histogram": hist})


def test_mtp3_ran_on_a_small_hybrid_swa_pool(mtp3):
    assert SWA_POOL_LINE + "122" in mtp3["log"]


def test_mtp3_greedy_output_equals_plain_decoding(mtp3, reference):
    assert len(mtp3["prompts"]) == len(PROMPTS)
    _assert_plain_greedy_tokens(mtp3, reference, cache_hit=False)


def test_mtp3_uses_three_chained_mtp_layers_and_accepts_drafts(mtp3, mtp_dir):
    n = json.loads((mtp_dir / "config.json").read_text())["num_hidden_layers"]
    for i in range(3):
        assert f"Step3p5MTP draft step {i} = checkpoint layer model.layers.{n + i}" in mtp3["log"]
    assert "Non-overlap (synchronous) spec v2" in mtp3["log"]
    stats = _totals(mtp3)
    # Every draft position got accepted sometimes (otherwise the test could not catch accept bugs),
    # and some verify steps accepted all three drafts.
    assert len(stats["histogram"]) == 4 and stats["histogram"][3] > 0
    assert all(a is not None and a > 0 for a in stats["acceptance_per_layer"])
    assert stats["accept_length"] > 1.3


def test_mtp3_sampling_runs(mtp3):
    for r in mtp3["sampled"]:
        assert len(r["output_ids"]) == MAX_NEW
        assert r["meta_info"]["spec_verify_ct"] > 0


def test_mtp1_greedy_output_equals_plain_decoding_with_nested_checkpoint(mtp1, reference):
    _assert_plain_greedy_tokens(mtp1, reference)
    assert SWA_POOL_LINE in mtp1["log"]  # the hybrid pool, as on GPUs (torch_native: cpu/swa_attention.py)
    # The planned ratio (swa_ratio.py): one line, and the placeholder SGLang resolves for it is no launch.
    assert mtp1["log"].count("Step-3.5 hybrid SWA KV pool: --swa-full-tokens-ratio") == 1
    assert "config.json of dummy" not in mtp1["log"]
    stats = _totals(mtp1)
    assert len(stats["histogram"]) == 2 and stats["histogram"][1] > 0
    assert "Step3p5MTP draft step 1" not in mtp1["log"]
    assert all(len(r["output_ids"]) == MAX_NEW for r in mtp1["sampled"])


def test_checkpoint_without_mtp_layers_is_a_clear_error(mtp_dir, tmp_path):
    cfg = json.loads((mtp_dir / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    w = load_file(str(mtp_dir / "model.safetensors"))
    save_file({k: v for k, v in w.items() if not re.match(rf"model\.layers\.({n}|{n + 1}|{n + 2})\.", k)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(Step35MTPError, match=rf"checkpoint has no MTP layers \(model\.layers\.{n}\.\.\.\)"):
        check_mtp_request(cfg, 3, tmp_path)
    with pytest.raises(Step35MTPError, match=rf"checkpoint has no MTP layers \(model\.layers\.{n}\.\.\.\)"):
        check_mtp_request(dict(cfg, num_nextn_predict_layers=0), 1)
    check_mtp_request(cfg, 3, mtp_dir)  # the complete checkpoint passes

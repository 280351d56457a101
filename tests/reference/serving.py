"""Helpers of the server parity tests: one `sglang serve` at a time, and SGLang logprobs as tensors.

The responses' logprobs as tensors lined up with the reference's: `sglang_step35.served_logprobs`
(re-exported here).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests

from sglang_step35.server import SGLangServer
from sglang_step35.served_logprobs import (  # noqa: F401 - re-exported for the tests
    full_sequence,
    max_abs_diff,
    reference_token_logprobs,
    served_logprobs,
    served_token_logprobs,
)

# Small KV pool keeps each server's RAM low (CPU CI); --skip-server-warmup saves a few seconds.
CPU_ARGS = ["--device", "cpu", "--max-total-tokens", "4096", "--skip-server-warmup"]
OUR_CLASS_LINE = "serving with model class sglang_step35.models.step3p5.Step3p5ForCausalLM"


def reference_greedy_ties(ref, prompt: Sequence[int], out: Sequence[int], tie: float) -> int:
    """Assert every served token of `out` is greedy decoding of the fp32 reference `ref` after `prompt`
    (teacher-forced on the served sequence: its reference logprob within `tie` of the best); returns
    how many positions had their top two within `tie` (near-ties the check cannot tell apart)."""
    import torch

    lp = ref.logprobs([*prompt, *out][:-1])[len(prompt) - 1:]
    gap = lp.max(-1).values - lp[torch.arange(len(out)), torch.tensor(list(out))]
    assert float(gap.max()) <= tie, f"token {int(gap.argmax())} of {len(out)} is not the reference's greedy choice"
    top2 = lp.topk(2, dim=-1).values
    return int(((top2[:, 0] - top2[:, 1]) <= tie).sum())


def start_expecting_exit(server: SGLangServer) -> str:
    """Start `server`, which must exit during start-up ("exited with code" from SGLangServer.start), and
    return its log. A server that comes up instead is stopped before the test fails: a launch that
    should have been refused must not stay running (and spinning) for the rest of the session."""
    import pytest

    try:
        server.start()
    except RuntimeError as e:
        if "exited with code" not in str(e):
            raise
        return server.log_text()
    finally:
        server.stop()
    pytest.fail(f"the server started, but its launch should have failed; log tail:\n{server.log_tail()}")


def generate(server: SGLangServer, input_ids: Sequence[int], max_new_tokens: int, vocab_size: int,
             logprob_start_len: int = 0, top_logprobs: bool = True) -> dict:
    """Greedy /generate on token ids (EOS ignored so every request decodes `max_new_tokens`)."""
    body = {
        "input_ids": list(input_ids),
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True},
        "return_logprob": True,
        "logprob_start_len": logprob_start_len,
    }
    if top_logprobs:
        body["top_logprobs_num"] = vocab_size
    r = requests.post(server.base_url + "/generate", json=body, timeout=600)
    r.raise_for_status()
    return r.json()


def generate_concurrently(server: SGLangServer, jobs: Sequence[tuple[Sequence[int], int]], vocab_size: int,
                          top_logprobs: bool = True) -> list[dict]:
    """All (input_ids, max_new_tokens) jobs in flight at once, so the scheduler batches them."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(generate, server, ids, n, vocab_size, 0, top_logprobs) for ids, n in jobs]
        return [f.result() for f in futures]


def prefill_batch_sizes(log: str) -> list[int]:
    """`#new-seq` of every prefill batch in a server log (> 1 means requests were batched)."""
    return [int(m) for m in re.findall(r"Prefill batch, #new-seq: (\d+)", log)]


def running_during_prefill(log: str) -> list[int]:
    """`#running-req` at each prefill: > 0 means a prefill was mixed into running decodes."""
    return [int(m) for m in re.findall(r"Prefill batch.*?#running-req: (\d+)", log)]


def serve_parallel_layouts(ckpt, layouts: dict, prompt: Sequence[int], max_new_tokens: int, vocab_size: int,
                           env_for=lambda name: {}) -> dict:
    """One fp32 plain `sglang serve` per parallel layout (name -> extra flags), one greedy run of
    `prompt` on each: name -> (response, server log)."""
    runs = {}
    for name, flags in layouts.items():
        with SGLangServer(str(ckpt), [*CPU_ARGS, "--dtype", "float32", *flags], env=env_for(name),
                          startup_timeout=400) as server:  # fmt: skip
            runs[name] = (generate(server, prompt, max_new_tokens, vocab_size), server.log_text())
    return runs


def assert_layouts_agree(runs: dict, base: str, ref, prompt: Sequence[int], vocab_size: int, tol: float) -> None:
    """Every layout of :func:`serve_parallel_layouts` decodes `base`'s tokens, and its logprobs are
    within `tol` of `base`'s and of the plain-PyTorch reference `ref` (so is `base`)."""
    want = runs[base][0]
    base_lp = served_logprobs(want, vocab_size)
    assert max_abs_diff(base_lp, ref.logprobs(full_sequence(prompt, want)[:-1])) <= tol, base
    for name, (resp, _) in runs.items():
        if name == base:
            continue
        assert resp["output_ids"] == want["output_ids"], name
        lp = served_logprobs(resp, vocab_size)
        diff = max_abs_diff(lp, base_lp)
        print(f"{name} vs {base} max |Δlogprob| {diff:.2e}")
        assert diff <= tol, name
        assert max_abs_diff(lp, ref.logprobs(full_sequence(prompt, resp)[:-1])) <= tol, name

"""Helpers of the server parity tests: one `sglang serve` at a time, and SGLang logprobs as tensors.

SGLang 0.5.23's `/generate` returns, with `return_logprob: true, logprob_start_len: 0,
top_logprobs_num: V` (V = vocab size), the whole next-token distribution at every position:
`meta_info.input_top_logprobs[j]` is the distribution of prompt token j given tokens < j (j = 0 is
None), `meta_info.output_top_logprobs[s]` that of output token s (s = 0 comes from the prefill's last
position, s >= 1 from decode steps). Greedy requests return the raw (temperature-free) logprobs.
Concatenated they line up with the reference's `logprobs(prompt + output[:-1])` row for row.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import requests
import torch

from sglang_step35.server import SGLangServer

# Small KV pool keeps each server's RAM low (CPU CI); --skip-server-warmup saves a few seconds.
CPU_ARGS = ["--device", "cpu", "--max-total-tokens", "4096", "--skip-server-warmup"]
OUR_CLASS_LINE = "serving with model class sglang_step35.models.step3p5.Step3p5ForCausalLM"


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


def _dense(rows, vocab_size: int) -> torch.Tensor:
    out = torch.full((len(rows), vocab_size), float("nan"), dtype=torch.float64)
    for i, row in enumerate(rows):
        for lp, tid, _ in row:
            out[i, tid] = lp
    return out


def served_logprobs(resp: dict, vocab_size: int, from_prompt: bool = True) -> torch.Tensor:
    """[positions, V] log-probabilities: prompt positions (if requested from 0) then each output step.
    Rows align with reference `logprobs(prompt + output[:-1])` (or its last len(output) rows)."""
    mi = resp["meta_info"]
    parts = []
    if from_prompt:
        assert mi["input_top_logprobs"][0] is None  # position "-1" has no distribution
        parts.append(_dense(mi["input_top_logprobs"][1:], vocab_size))
    parts.append(_dense(mi["output_top_logprobs"], vocab_size))
    out = torch.cat(parts)
    assert not torch.isnan(out).any(), "server returned fewer than V logprobs at some position"
    return out


def served_token_logprobs(resp: dict) -> torch.Tensor:
    """Log-probability of each actual next token (prompt tokens 1.. then outputs): cheap to return,
    so long greedy runs use it instead of the full distribution."""
    mi = resp["meta_info"]
    rows = mi["input_token_logprobs"][1:] + mi["output_token_logprobs"]
    return torch.tensor([lp for lp, _, _ in rows], dtype=torch.float64)


def reference_token_logprobs(ref_logprobs: torch.Tensor, seq) -> torch.Tensor:
    """The reference's log-probability of seq[t+1] at each position t."""
    return ref_logprobs.double().gather(1, torch.as_tensor(seq[1:])[:, None])[:, 0]


def full_sequence(prompt: Sequence[int], resp: dict) -> list[int]:
    return list(prompt) + list(resp["output_ids"])


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


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

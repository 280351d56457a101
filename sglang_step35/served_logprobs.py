"""SGLang `/generate` logprobs as tensors, lined up with the plain reference's (`sglang_step35.reference`).

SGLang 0.5.23's `/generate` returns, with `return_logprob: true, logprob_start_len: 0,
top_logprobs_num: V` (V = vocab size), the whole next-token distribution at every position:
`meta_info.input_top_logprobs[j]` is the distribution of prompt token j given tokens < j (j = 0 is
None), `meta_info.output_top_logprobs[s]` that of output token s (s = 0 comes from the prefill's last
position, s >= 1 from decode steps). Greedy requests return the raw (temperature-free) logprobs.
Concatenated they line up with the reference's `logprobs(prompt + output[:-1])` row for row.
Used by the parity tests and by bench/gpu_check.py; no SGLang import.
"""

from __future__ import annotations

from typing import Sequence

import torch


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

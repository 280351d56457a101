"""Plain-torch reference for Step-3.5 MoE under expert parallelism: dispatch, local compute, combine.

What EP must compute, written so that a test can run it on CPU with simulated ranks:

1. every rank routes every token identically (same router, same ``scores + bias`` top-k selection,
   same *unbiased* renormalized weights x ``moe_router_scaling_factor``);
2. rank ``r`` evaluates only the experts it holds (:class:`sglang_step35.moe.placement.ExpertPlacement`, SGLang's
   contiguous blocks); a token whose chosen expert lives elsewhere contributes 0 on that rank;
3. the ranks' partial outputs are summed (the all-reduce / combine);
4. the shared expert is added **once** to the combined output. Adding it on every rank before the
   all-reduce multiplies it by ``ep_size`` — the bug of sglang #26845 (GSM8K 94% -> 0.9%).
   :func:`diagnose_ep_output` recognises that signature in a real engine's output.

All-to-all EP (``--moe-a2a-backend deepep`` / ``mori``; :func:`a2a_moe_forward`) computes the same
sum with different messages: each rank routes only its own slice of the tokens, *dispatch* sends
every (token, chosen expert) pair to the expert's owner, the owner returns ``weight * expert(x)``,
and *combine* sums the returns on the token's source rank — complete, so no all-reduce follows;
each rank adds the replicated shared expert to its own tokens (once), and the slices are gathered.

The expert math (router, clamped SwiGLU, the routed sum) is the plain model's
(:mod:`sglang_step35.reference`); this module adds the EP placement, messages and reductions.
This module is a specification and a test oracle, not a fast path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang_step35.moe.placement import ExpertPlacement, place_experts
from sglang_step35.reference import route as _route
from sglang_step35.reference import routed_experts, swiglu  # swiglu: the tests take it from here too



@dataclass
class MoEWeights:
    """One Step MoE block: router, routed experts stacked on dim 0, one shared expert."""

    router: torch.Tensor  # [E, H]
    router_bias: torch.Tensor  # [E], used only for selection
    gate: torch.Tensor  # [E, I, H]
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    shared_gate: torch.Tensor  # [S, H]
    shared_up: torch.Tensor  # [S, H]
    shared_down: torch.Tensor  # [H, S]
    top_k: int
    scaling: float = 1.0
    limit: float = 0.0  # routed experts' swiglu limit
    shared_limit: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.router.shape[0]

    @classmethod
    def random(
        cls,
        num_experts: int = 8,
        top_k: int = 2,
        hidden: int = 16,
        intermediate: int = 12,
        shared: int = 12,
        *,
        scaling: float = 3.0,
        limit: float = 7.0,
        shared_limit: float = 16.0,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> "MoEWeights":
        g = torch.Generator().manual_seed(seed)

        def r(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, dtype=dtype) * scale

        return cls(
            router=r(num_experts, hidden, scale=hidden**-0.5),
            router_bias=r(num_experts, scale=0.1),
            # Large enough that the clamp is active for some tokens (the tests rely on it).
            gate=r(num_experts, intermediate, hidden, scale=2.0),
            up=r(num_experts, intermediate, hidden, scale=2.0),
            down=r(num_experts, hidden, intermediate, scale=intermediate**-0.5),
            shared_gate=r(shared, hidden, scale=2.0),
            shared_up=r(shared, hidden, scale=2.0),
            shared_down=r(hidden, shared, scale=shared**-0.5),
            top_k=top_k,
            scaling=scaling,
            limit=limit,
            shared_limit=shared_limit,
        )


def route(x: torch.Tensor, w: MoEWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """Step routing: sigmoid scores, top-k of ``scores + bias``, unbiased weights renormalized x scale."""
    ids, weights = _route(x, w.router, w.router_bias, w.top_k, w.scaling)
    return ids, weights.to(x.dtype)


def shared_expert(x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    return swiglu(x, w.shared_gate, w.shared_up, w.shared_down, w.shared_limit)


def routed_partial(
    x: torch.Tensor, w: MoEWeights, ids: torch.Tensor, weights: torch.Tensor, local: Optional[range] = None
) -> torch.Tensor:
    """Sum of ``weight * expert(x)`` over the chosen experts that are in ``local`` (all when None)."""
    return routed_experts(x, w.gate, w.up, w.down, ids, weights, w.limit, local).to(x.dtype)


def moe_forward(x: torch.Tensor, w: MoEWeights) -> torch.Tensor:
    """EP = 1: the whole block on one rank."""
    ids, weights = route(x, w)
    return routed_partial(x, w, ids, weights) + shared_expert(x, w)


def ep_rank_partials(x: torch.Tensor, w: MoEWeights, placement: ExpertPlacement) -> list[torch.Tensor]:
    """What each EP rank contributes from its own experts (before the all-reduce)."""
    ids, weights = route(x, w)  # identical on every rank: routing is replicated
    return [routed_partial(x, w, ids, weights, placement.local_experts(r)) for r in range(placement.ep_size)]


def ep_moe_forward(x: torch.Tensor, w: MoEWeights, ep_size: int, *, shared_on_every_rank: bool = False) -> torch.Tensor:
    """Simulated EP: all-reduce of the ranks' partials, plus the shared expert once.

    ``shared_on_every_rank=True`` reproduces sglang #26845 (each rank adds the shared expert before
    the reduction); it exists so tests can prove the detector catches it.
    """
    placement = place_experts(w.num_experts, ep_size)
    partials = ep_rank_partials(x, w, placement)
    if shared_on_every_rank:
        s = shared_expert(x, w)
        partials = [p + s for p in partials]
        return torch.stack(partials).sum(0)
    return torch.stack(partials).sum(0) + shared_expert(x, w)


def diagnose_ep_output(
    ep_out: torch.Tensor, ref_out: torch.Tensor, shared_out: torch.Tensor, *, atol: float = 1e-6, rtol: float = 1e-5
) -> str:
    """Classify an EP engine's MoE output against the EP=1 reference.

    Returns "ok", "shared expert added {k} times" (k > 1: the #26845 signature — the excess is an
    exact multiple of the shared expert's output), or "mismatch".
    """
    if torch.allclose(ep_out, ref_out, atol=atol, rtol=rtol):
        return "ok"
    excess = ep_out - ref_out
    denom = (shared_out * shared_out).sum()
    if denom > 0:
        k = float((excess * shared_out).sum() / denom)  # least-squares multiple of the shared output
        extra = round(k)
        if extra >= 1 and torch.allclose(excess, extra * shared_out, atol=atol * 10, rtol=rtol * 10):
            return f"shared expert added {extra + 1} times"
    return "mismatch"


def a2a_moe_forward(
    x: torch.Tensor, w: MoEWeights, ep_size: int, *, every_rank_dispatches_all_tokens: bool = False
) -> torch.Tensor:
    """Simulated all-to-all EP with explicit per-rank send/receive buffers (see the module notes).

    Tokens are split over the ranks in contiguous slices (``tensor_split``, SGLang's attention-TP
    slice). ``every_rank_dispatches_all_tokens=True`` models a MoE block that ignores the a2a
    contract: no token split, and a TP all-reduce after the (already complete) combine — every
    token's output then arrives ``ep_size`` times, the shared expert included.
    """
    placement = place_experts(w.num_experts, ep_size)
    owner = torch.tensor([placement.rank_of(e) for e in range(w.num_experts)])
    rows = [x] * ep_size if every_rank_dispatches_all_tokens else list(x.tensor_split(ep_size))
    # Dispatch: rank src sends (its token index, slot, hidden row, weight, expert) to each owner.
    inbox: list[list[tuple]] = [[] for _ in range(ep_size)]
    routing = []
    for src, xs in enumerate(rows):
        ids, weights = route(xs, w)  # each rank routes only the tokens it holds
        routing.append((ids, weights))
        for dst in range(ep_size):
            token_idx, slot = (owner[ids] == dst).nonzero(as_tuple=True)
            if token_idx.numel():
                inbox[dst].append((src, token_idx, xs[token_idx], weights[token_idx, slot], ids[token_idx, slot]))
    # Expert compute on the owner, only on what it received; results go back to their source.
    returns: list[list[tuple]] = [[] for _ in range(ep_size)]
    for dst in range(ep_size):
        for src, token_idx, xr, wr, er in inbox[dst]:
            y = torch.zeros_like(xr)
            for e in er.unique().tolist():
                assert placement.rank_of(e) == dst, "dispatch sent a token to a rank without its expert"
                m = er == e
                y[m] = swiglu(xr[m], w.gate[e], w.up[e], w.down[e], w.limit) * wr[m].unsqueeze(-1)
            returns[src].append((token_idx, y))
    # Combine on the source rank: the complete routed output of its own tokens; shared expert once.
    outs = []
    for src, xs in enumerate(rows):
        combined = torch.zeros_like(xs)
        for token_idx, y in returns[src]:
            combined.index_add_(0, token_idx, y)
        outs.append(combined + shared_expert(xs, w))
    if every_rank_dispatches_all_tokens:
        return torch.stack(outs).sum(0)  # the all-reduce a complete combine must not get
    return torch.cat(outs)  # the gather back to every token, in rank order

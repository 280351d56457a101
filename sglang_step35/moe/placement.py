"""Routed-expert placement under expert parallelism (EP).

SGLang 0.5.23 gives EP rank ``r`` the contiguous block of global experts
``[r * E/ep, (r + 1) * E/ep)`` and stores them locally in that order
(``FusedMoE._map_global_expert_id_to_local_expert_id`` in
``sglang/srt/layers/moe/fused_moe_triton/layer.py``; it asserts ``E % ep == 0``). Each rank holds
whole experts (full intermediate width) when ``ep == tp``; with ``ep < tp`` the remaining
``moe_tp = tp // ep`` factor splits each expert's intermediate dimension (``moe_tp_size =
tp_size // ep_size // moe_dp_size`` in ``runtime_context.py``).

We mirror that layout exactly so that weight-loading, the planner's experts-per-GPU figure and the
simulated EP reference agree with what SGLang will do. An uneven split is refused up front with the
numbers and the nearest EP sizes that work, instead of SGLang's bare ``assert``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Step35ConfigError


def valid_ep_sizes(num_experts: int, max_size: int | None = None) -> list[int]:
    """EP sizes that split ``num_experts`` into equal whole-expert blocks (divisors), ascending."""
    limit = num_experts if max_size is None else min(num_experts, max_size)
    return [k for k in range(1, limit + 1) if num_experts % k == 0]


def nearest_valid_ep_sizes(num_experts: int, ep_size: int) -> tuple[int | None, int | None]:
    """The closest valid EP sizes below and above ``ep_size`` (None where there is none)."""
    sizes = valid_ep_sizes(num_experts)
    below = max((k for k in sizes if k < ep_size), default=None)
    above = min((k for k in sizes if k > ep_size), default=None)
    return below, above


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts each of ``ep_size`` ranks holds (contiguous blocks, SGLang's order)."""

    num_experts: int
    ep_size: int

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    def rank_of(self, expert: int) -> int:
        """EP rank that stores global expert ``expert``."""
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"expert {expert} outside 0..{self.num_experts - 1}")
        return expert // self.experts_per_rank

    def local_experts(self, rank: int) -> range:
        """Global ids held by ``rank``, in local storage order."""
        if not 0 <= rank < self.ep_size:
            raise IndexError(f"rank {rank} outside 0..{self.ep_size - 1}")
        start = rank * self.experts_per_rank
        return range(start, start + self.experts_per_rank)

    def global_to_local(self, expert: int, rank: int) -> int:
        """Local slot of ``expert`` on ``rank``, or -1 where another rank holds it (SGLang's contract)."""
        start = rank * self.experts_per_rank
        if start <= expert < start + self.experts_per_rank:
            return expert - start
        return -1

    def rank_table(self) -> list[range]:
        return [self.local_experts(r) for r in range(self.ep_size)]


def place_experts(num_experts: int, ep_size: int) -> ExpertPlacement:
    """Placement of ``num_experts`` over ``ep_size`` ranks; uneven splits raise Step35ConfigError."""
    if ep_size < 1:
        raise Step35ConfigError(f"--ep-size must be >= 1, got {ep_size}")
    if num_experts % ep_size:
        below, above = nearest_valid_ep_sizes(num_experts, ep_size)
        options = " or ".join(str(k) for k in (below, above) if k is not None)
        raise Step35ConfigError(
            f"--ep-size {ep_size} does not divide moe_num_experts={num_experts} "
            f"({num_experts} / {ep_size} = {num_experts / ep_size:.2f} experts per rank); every EP rank "
            f"must hold the same number of whole experts. Nearest valid EP sizes: {options}"
        )
    return ExpertPlacement(num_experts=num_experts, ep_size=ep_size)

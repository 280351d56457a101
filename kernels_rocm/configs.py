"""AMD (CDNA3 gfx942 MI300X/MI325X, CDNA4 gfx950 MI350X/MI355X) launch configs for the shared
Step-3.5 Triton kernels in ``kernels_cuda``.

Why these differ from the NVIDIA ones:
- On ROCm, Triton's ``num_warps`` counts 64-lane wavefronts, so the same tile needs half the warps
  to give each lane the same amount of work as on NVIDIA's 32-lane warps.
- ``waves_per_eu`` is an occupancy hint for the AMD backend: it caps VGPR use so that many waves
  stay resident per SIMD. All three kernels are memory-bound and hold little state, so we ask for
  high occupancy (latency hiding) except on the router, whose 512-wide expert row in registers
  would spill if squeezed.
- No K-loops, so ``num_stages`` (software pipelining, LDS double buffering) stays 1.
"""

from __future__ import annotations

from kernels_cuda._common import LaunchConfig, next_pow2

WAVEFRONT = 64


def _waves(block_t: int, block_n: int, elems_per_lane: int) -> int:
    return max(1, min(8, next_pow2(max(1, (block_t * block_n) // (WAVEFRONT * elems_per_lane)))))


def swiglu_clamp_config(num_tokens: int, inter: int) -> LaunchConfig:
    block_i = min(next_pow2(inter), 1024)
    block_t = 1 if num_tokens <= 16 else (2 if num_tokens <= 512 else 4)
    # 16 bf16 pairs per lane keeps global loads at 2x128-bit per operand.
    return LaunchConfig(
        block_t=block_t,
        block_n=block_i,
        num_warps=_waves(block_t, block_i, 16),
        num_stages=1,
        extra={"waves_per_eu": 4 if num_tokens > 512 else 2},
    )


def head_gate_config(num_tokens: int, width: int) -> LaunchConfig:
    block_n = min(next_pow2(width), 2048)
    block_t = 1 if num_tokens <= 32 else 2
    return LaunchConfig(
        block_t=block_t,
        block_n=block_n,
        num_warps=_waves(block_t, block_n, 16),
        num_stages=1,
        extra={"waves_per_eu": 4 if num_tokens > 512 else 2},
    )


def router_config(num_tokens: int, num_experts: int) -> LaunchConfig:
    block_e = next_pow2(num_experts)
    block_t = 1 if num_tokens <= 64 else (2 if num_tokens <= 1024 else 4)
    # Whole expert row in registers plus the top-k temporaries: allow 2 waves per EU only, so the
    # compiler has VGPR room (8 lanes' worth of elements per lane at 64-wide waves).
    return LaunchConfig(
        block_t=block_t,
        block_n=block_e,
        num_warps=_waves(block_t, block_e, 8),
        num_stages=1,
        extra={"waves_per_eu": 2},
    )

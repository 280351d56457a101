"""Hardware facts the planner needs: each GPU's memory, vendor and architecture, the platform an
architecture stands for when the attention rule is asked, and which weight formats its tensor cores
run. Nothing here depends on the model."""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9  # GPU memory is sold in decimal gigabytes
GiB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    """Hardware facts only."""

    key: str
    name: str
    vendor: str  # "nvidia" | "amd"
    arch: str
    memory_gb: int  # vendor spec, decimal GB


GPUS: dict[str, GpuSpec] = {
    g.key: g
    for g in (
        GpuSpec("a100-40gb", "A100 40GB", "nvidia", "ampere", 40),
        GpuSpec("a100", "A100 80GB", "nvidia", "ampere", 80),
        GpuSpec("l40s", "L40S", "nvidia", "ada", 48),
        GpuSpec("h20", "H20", "nvidia", "hopper", 96),
        GpuSpec("h100", "H100 SXM", "nvidia", "hopper", 80),
        GpuSpec("h200", "H200", "nvidia", "hopper", 141),
        GpuSpec("b200", "B200", "nvidia", "blackwell", 180),  # DGX/HGX B200: 1,440 GB over 8 GPUs
        GpuSpec("mi300x", "MI300X", "amd", "cdna3", 192),
        GpuSpec("mi325x", "MI325X", "amd", "cdna3", 256),
        GpuSpec("mi350x", "MI350X", "amd", "cdna4", 288),
        GpuSpec("mi355x", "MI355X", "amd", "cdna4", 288),
    )
}

def attention_backend_for(arch: str) -> str:
    """The attention backend the launch hook would pick on `arch` for Step-3.5 (sliding layers): the
    same rule (sglang_step35.attention.select) on the platform a node of `arch` presents
    (sglang_step35.platform.for_arch: SGLang's default kernels installed, flashinfer / AITER)."""
    from sglang_step35.attention.select import choose_attention_backend
    from sglang_step35.platform import for_arch

    return choose_attention_backend(for_arch(arch), None, True).backend


# Block-FP8 needs FP8 tensor cores (sm89+); Ampere has none. Not planned there.
NO_FP8_ARCHS = frozenset({"ampere"})

MAX_GPUS_PER_NODE = 8  # GPUs one node holds; more GPUs are more nodes (--nodes)

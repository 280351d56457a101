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

# The vendor whose kernels SGLang 0.5.23 has for a format's experts (others: none at all).
# ModelOpt NVFP4: Marlin (sm80-sm90), FlashInfer TRT-LLM / CUTLASS (sm100) — CUDA only
# (quantization/modelopt_quant.py: ModelOptNvFp4FusedMoEMethod). Quark MXFP4 (AMD's exports):
# AITER only (quantization/quark/schemes/quark_w4a4_mxfp4_moe.py).
FORMAT_VENDOR = {"nvfp4": ("nvidia", "SGLang's ModelOpt NVFP4 MoE kernels (Marlin, FlashInfer, CUTLASS) are CUDA only"),
                 "mxfp4": ("amd", "SGLang's Quark MXFP4 MoE runs on AITER (ROCm) only")}


def format_refusal(quant: str, gpu: GpuSpec) -> str | None:
    """Why ``gpu`` has no kernels for ``quant`` weights, or None (whether the format is *served*
    there is the allow-list's question, :mod:`sglang_step35.served`)."""
    if quant == "fp8" and gpu.arch in NO_FP8_ARCHS:
        return f"--quant fp8 on {gpu.name} ({gpu.arch}): no FP8 tensor cores for the block-FP8 checkpoint; use --quant bf16"
    vendor, why = FORMAT_VENDOR.get(quant, (gpu.vendor, ""))
    if vendor != gpu.vendor:
        return f"--quant {quant} on {gpu.name} ({gpu.vendor}): {why}"
    return None

MAX_GPUS_PER_NODE = 8  # GPUs one node holds; more GPUs are more nodes (--nodes)

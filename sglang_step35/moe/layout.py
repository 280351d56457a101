"""May tensor parallelism split Step-3.5's experts, and where does the shared expert live?  The layout rule.

Under ``--tp T --ep E`` SGLang splits every routed expert's intermediate dimension ``I`` across
``moe_tp = T // E`` ranks (``N = I / moe_tp`` per GPU), and splits the shared expert (width
``share_expert_dim``) and the dense MLP layers across all ``T`` ranks. Step-3.5-Flash has
``I = share_expert_dim = 1280``, so TP4 gives ``N = 320`` and TP8 gives 160. Whether those shapes
run depends on the kernel and the quantization:

* FP8 block (128, 128): each partition must hold whole 128-blocks, ``N % 128 == 0``; SGLang checks
  ``intermediate_size_per_partition % block_n`` for the fused MoE (``fp8.py``) and
  ``output_partition_size % block_n`` for dense linears (``validate_block_quant_shapes``) — the
  shared-expert failure of sglang #26107 (``320 is not divisible by block_n = 128``, even with
  ``--ep 4``, because EP does not touch the shared expert).
* INT4 weight-only, group 128: groups run along the input dimension of ``down_proj``, which is the
  split dimension, so a partition must hold whole groups, ``N % 128 == 0``.
* AITER CK 2-stage MoE (ROCm): the kernel tiles ``N`` by 64 when ``N <= 192`` and by 128 above that
  and rejects other sizes ("device_gemm ... does not support this GEMM problem"; threshold measured
  against the kernel in vllm #55368). ``N = 320`` (Step TP4, the known AMD failure) is rejected;
  ``N = 1280`` (EP4, 72 whole experts per GPU) runs. The CK 4-bit MoE path needs ``N % 256`` (vllm
  #38166), which we apply to the 4-bit formats AITER runs (MXFP4). SGLang 0.5.23 never hands INT4 /
  W4A16 (or W8A8-INT8) experts to AITER: their methods build a Triton runner on ROCm too, so
  ``auto`` is judged as Triton for them (:func:`.policy.effective_moe_backend`).
* Triton fused MoE masks ragged tiles, so bf16 has no extra rule; other grouped-GEMM backends
  (DeepGEMM, CUTLASS, FlashInfer) are held to 128, a conservative rule we have not measured.

Where the MoE block's tokens and shared expert live (:func:`moe_block_layout`, the one rule the
model, the launch guard and the planner read):

* SGLang's standard dispatcher (no ``--moe-a2a-backend``): every rank holds every token; the routed
  output is a partial sum (each rank's experts) completed by one TP all-reduce. The shared expert is
  TP-split when its split holds whole quantization blocks, and **replicated** otherwise (FP8 on 4 or
  8 GPUs: 1280/4 = 320, 1280/8 = 160) — SGLang's own ``parallel_group="replicated"`` linear layers,
  added once, after the all-reduce (what SGLang's Laguna does under ``SGLANG_SHARED_EXPERT_TP1``).
  That is how FP8 runs on 4 and 8 GPUs here, with SGLang's Triton MoE runner and Step's exact clamp.
* An all-to-all backend (deepep on NVIDIA, mori on AMD): SGLang pads each batch to a multiple of the
  attention-TP size; each attention-TP rank routes its own slice of the tokens (SGLang's
  layer-boundary ``attn_tp_slice``), the dispatcher's combine returns their *complete* MoE output (no
  all-reduce), the shared expert is replicated and computed on the same slice, and the slices are
  all-gathered back (``attn_tp_gather``). Refused where the runner the backend selects drops Step's
  SwiGLU clamp (:func:`.policy.a2a_refusal`): every a2a backend on Step-3.5-Flash, whose layers 43-44 clamp.

Which runner serves a layer, and the launch guard that refuses or corrects a layout, live in
:mod:`.policy`; the bytes and split multiple of each quantization in :mod:`.quant`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..config import cfg_get
from .placement import nearest_valid_ep_sizes
from .quant import QuantSpec, parse_quant

def a2a_name(a2a_backend: Any) -> Optional[str]:
    """'deepep', 'mori', ... from a flag value or SGLang's ``MoeA2ABackend``; None for none."""
    value = getattr(a2a_backend, "value", a2a_backend)
    value = str(value).lower() if value is not None else "none"
    return None if value in ("none", "") else value


@dataclass(frozen=True)
class MoeBlockLayout:
    """Where one Step-3.5 MoE block's tokens, routed sum and shared expert live (see module notes)."""

    a2a_backend: Optional[str]  # None: SGLang's standard dispatcher
    shared_expert_replicated: bool
    reason: str  # why the shared expert is placed so (for logs and the plan)

    @property
    def tokens_on_attn_tp_slice(self) -> bool:
        """Each attention-TP rank routes only its slice of the tokens (the a2a contract)."""
        return self.a2a_backend is not None

    @property
    def routed_output_complete(self) -> bool:
        """The experts' output needs no all-reduce: the a2a combine already summed every expert."""
        return self.a2a_backend is not None


def moe_block_layout(*, a2a_backend: Any, quant: Any, share_expert_dim: Optional[int], tp_size: int) -> MoeBlockLayout:
    """THE placement rule for the MoE block (model, launch guard and planner all call it)."""
    a2a = a2a_name(a2a_backend)
    if a2a is not None:
        # Each rank holds different tokens: a TP-split shared expert would need a sum over ranks
        # that hold other tokens. Replicated, it completes on the rank's own slice.
        return MoeBlockLayout(a2a, True, f"{a2a} all-to-all: each rank computes its own tokens")
    q = parse_quant(quant)
    if share_expert_dim and tp_size > 1:
        n, why_not = _split(int(share_expert_dim), tp_size, q, "shared expert")
        if why_not:
            return MoeBlockLayout(None, True, f"{why_not[0]}; replicated, added once after the all-reduce")
    return MoeBlockLayout(None, False, "split by TP" if tp_size > 1 else "one GPU")



def backend_multiple(backend: str, quant: QuantSpec, n: int) -> tuple[int, str]:
    """The multiple a per-GPU expert intermediate ``n`` must be for ``backend`` (kernel rule only)."""
    if backend == "aiter":
        if quant.weight_bits == 4:
            return 256, "AITER CK 4-bit MoE needs N % 256 (vllm #38166)"
        tile = 64 if n <= 192 else 128
        return tile, f"AITER CK 2-stage MoE tiles N by {tile} at N={n} (vllm #55368)"
    if backend in ("triton", "auto", "triton_kernel", "torch_native", "cpu"):
        return 1, "Triton fused MoE masks ragged tiles"
    return 128, f"{backend} grouped GEMM: 128 assumed (not measured for this backend)"


@dataclass(frozen=True)
class LayoutVerdict:
    """Result of :func:`check_moe_layout`; falsy when any rule fails (``reasons`` says which)."""

    reasons: tuple[str, ...]
    routed_n: Optional[int]  # per-GPU expert intermediate (None when it does not divide)
    shared_n: Optional[int]
    shared_failed: bool = False
    routed_failed: bool = False
    other_failed: bool = False

    @property
    def ok(self) -> bool:
        return not self.reasons

    def __bool__(self) -> bool:
        return self.ok


def _split(width: int, parts: int, q: QuantSpec, what: str) -> tuple[Optional[int], list[str]]:
    """Per-GPU size of ``width`` split ``parts`` ways, and why that split cannot hold ``q``'s blocks."""
    if width % parts:
        return None, [f"{what} {width} is not divisible by {parts}"]
    n = width // parts
    m = q.split_multiple
    if parts > 1 and n % m:
        why = q.split_note or ("block size" if q.block else "group size")
        return n, [f"{q.name}: {what} {width}/{parts} = {n} per GPU is not a multiple of {m} ({why})"]
    return n, []


def check_moe_layout(
    backend: str,
    quant: Any,
    moe_intermediate_size: int,
    tp: int,
    ep: int,
    *,
    num_experts: Optional[int] = None,
    share_expert_dim: Optional[int] = None,
    a2a_backend: Any = None,
    dense_intermediate_size: Optional[int] = None,
    dense_tp: Optional[int] = None,
) -> LayoutVerdict:
    """Check every TP/EP split of the MoE block for ``backend`` and ``quant``; list all failures.
    The shared expert is placed by :func:`moe_block_layout` (replicated where TP would split its
    blocks, or under an all-to-all backend), so only a split that rule keeps is checked."""
    q = parse_quant(quant)
    block = moe_block_layout(a2a_backend=a2a_backend, quant=q, share_expert_dim=share_expert_dim, tp_size=tp)
    reasons: list[str] = []
    routed_failed = shared_failed = other_failed = False
    routed_n: Optional[int] = None
    if ep < 1 or tp < 1 or tp % ep:
        reasons.append(f"--ep {ep} must divide --tp {tp} (SGLang splits experts over moe_tp = tp // ep)")
        other_failed = True
    elif num_experts is not None and num_experts % ep:
        below, above = nearest_valid_ep_sizes(num_experts, ep)
        options = " or ".join(str(k) for k in (below, above) if k is not None)
        reasons.append(f"--ep {ep} does not divide {num_experts} experts (nearest valid EP sizes: {options})")
        other_failed = True
    else:
        routed_n, why_not = _split(moe_intermediate_size, tp // ep, q, "routed-expert intermediate")
        reasons += why_not
        routed_failed = bool(why_not)
        if routed_n is not None:
            tile, why = backend_multiple(backend, q, routed_n)
            if routed_n % tile:
                reasons.append(f"{backend}: routed-expert N = {routed_n} per GPU is not a multiple of {tile} ({why})")
                routed_failed = True
    shared_n: Optional[int] = None
    if share_expert_dim:
        what = "shared expert (a dense layer split by TP, not by EP; sglang #26107)"
        shared_n, why_not = _split(share_expert_dim, 1 if block.shared_expert_replicated else tp, q, what)
        reasons += why_not
        shared_failed = bool(why_not)
    if dense_intermediate_size:
        _, why_not = _split(dense_intermediate_size, dense_tp or tp, q, "dense MLP intermediate")
        reasons += why_not
        other_failed = other_failed or bool(why_not)
    return LayoutVerdict(
        reasons=tuple(reasons),
        routed_n=routed_n,
        shared_n=shared_n,
        shared_failed=shared_failed,
        routed_failed=routed_failed,
        other_failed=other_failed,
    )


def recommended_layout(
    hf_config: Any, tp: int, quant: Any, vendor: str, backend: str  # noqa: ARG001 (backend encodes the vendor)
) -> Optional[tuple[int, list[str]]]:
    """The EP size and flags that make ``tp`` GPUs valid, or None when no flag can. Never an
    all-to-all backend: the standard dispatcher serves every layout an a2a one would (the shared
    expert is replicated where TP would split its blocks) and keeps Step's clamp exact."""
    q = parse_quant(quant)
    E = int(cfg_get(hf_config, "moe_num_experts"))
    # EP = TP whenever the experts divide (whole experts per GPU, the seeds' layout); else pure TP.
    ep = tp if E % tp == 0 else 1
    verdict = check_moe_layout(
        backend,
        q,
        int(cfg_get(hf_config, "moe_intermediate_size")),
        tp,
        ep,
        num_experts=E,
        share_expert_dim=cfg_get(hf_config, "share_expert_dim"),
        dense_intermediate_size=cfg_get(hf_config, "intermediate_size"),
    )
    return (ep, [f"--tp {tp}", f"--ep {ep}"]) if verdict.ok else None

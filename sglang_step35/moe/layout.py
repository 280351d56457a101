"""May tensor parallelism split Step-3.5's experts?  The layout rule and the runtime guard.

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
  #38166), which we apply to int4.
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
  SwiGLU clamp (:func:`a2a_refusal`): every a2a backend on Step-3.5-Flash, whose layers 43-44 clamp.

Guard choice (:func:`guard_moe_layout`): when only the routed experts' TP split is bad and
``EP = TP`` fixes it, we **switch to EP = TP** and log one line. That change keeps the GPU count,
the math and the memory (each GPU still holds 1/T of the experts, now as whole experts) — it is the
layout every seed deployment uses, so refusing would only make the user retype a flag we already
know. Everything else (the shared expert or dense MLP split badly, experts that do not divide
evenly, a bad TP size) we **refuse**, with the exact flags to use: fixing those changes the
communication backend or the GPU count, which a server must not decide silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from ..config import Step35ConfigError, moe_layer_ids
from .placement import nearest_valid_ep_sizes

@dataclass(frozen=True)
class QuantSpec:
    """How one quantized linear weight is stored (what the layout rule and the memory plan need)."""

    name: str  # "bf16" | "fp8" | "int4"
    weight_bits: int
    block: Optional[tuple[int, int]] = None  # FP8 (block_n, block_k), fp32 inverse scale per block
    group_size: Optional[int] = None  # INT4: one bf16 scale per group along the input dim

    @property
    def split_multiple(self) -> int:
        """A TP partition of an expert/MLP intermediate must be a multiple of this."""
        if self.block:
            return max(self.block)  # N is the out dim of gate/up and the in dim of down
        if self.group_size:
            return self.group_size
        return 1

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes for one [out, in] weight of this quantization, scales included."""
        if self.block:
            bn, bk = self.block
            return out_features * in_features + math.ceil(out_features / bn) * math.ceil(in_features / bk) * 4
        if self.group_size:
            return out_features * in_features // 2 + out_features * math.ceil(in_features / self.group_size) * 2
        return out_features * in_features * self.weight_bits // 8


BF16 = QuantSpec("bf16", 16)
FP8_BLOCK128 = QuantSpec("fp8", 8, block=(128, 128))
INT4_G128 = QuantSpec("int4", 4, group_size=128)
QUANTS = {"bf16": BF16, "fp8": FP8_BLOCK128, "int4": INT4_G128}


def parse_quant(value: Any) -> QuantSpec:
    """A QuantSpec from a CLI name, SGLang's ``--quantization`` value or a ``quantization_config``."""
    if value is None or value in ("", "bf16", "bfloat16", "unquant", "none"):
        return BF16
    if isinstance(value, QuantSpec):
        return value
    if isinstance(value, str):
        if value in ("fp8", "w8a8_fp8", "modelopt_fp8"):
            return FP8_BLOCK128
        if value in ("int4", "awq", "awq_marlin", "gptq", "gptq_marlin", "moe_wna16"):
            return INT4_G128
        raise Step35ConfigError(f"unsupported quantization {value!r}; use bf16, fp8 or int4")
    if isinstance(value, Mapping):
        method = str(value.get("quant_method", "")).lower()
        if method == "fp8":
            block = value.get("weight_block_size")
            return QuantSpec("fp8", 8, block=tuple(block)) if block else QuantSpec("fp8", 8)
        if int(value.get("bits", value.get("w_bit", 0)) or 0) == 4:
            group = int(value.get("group_size", value.get("q_group_size", 128)) or 128)
            return QuantSpec("int4", 4, group_size=group)
        raise Step35ConfigError(f"unsupported quantization_config {dict(value)!r}; use bf16, fp8 or int4")
    raise Step35ConfigError(f"cannot read a quantization from {value!r}")


def launch_quant(flag: Any, checkpoint_config: Any) -> QuantSpec:
    """What SGLang will build for ``--quantization flag`` on a checkpoint with ``checkpoint_config``:
    the checkpoint's own quantization_config when it has one (SGLang reads it; the flag only has to
    agree), else the flag as SGLang's *online* quantization of BF16 weights — for ``fp8`` that is
    Fp8Config without ``weight_block_size``, i.e. per-tensor FP8, not the 128x128 blocks of an FP8
    checkpoint (reading the flag as block FP8 let an unverified per-tensor MoE through the guard)."""
    if checkpoint_config:
        return parse_quant(checkpoint_config)
    if flag in ("fp8", "w8a8_fp8"):
        return QuantSpec("fp8", 8)
    return parse_quant(flag)


def quant_spec_of(quant_config: Any) -> QuantSpec:
    """The QuantSpec of an SGLang ``QuantizationConfig`` (None = unquantized) as the model holds it."""
    if quant_config is None:
        return BF16
    name = str(quant_config.get_name()).lower()
    if name == "fp8":
        block = getattr(quant_config, "weight_block_size", None)
        return QuantSpec("fp8", 8, block=tuple(block)) if block else QuantSpec("fp8", 8)
    return parse_quant(name)


def _a2a_name(a2a_backend: Any) -> Optional[str]:
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
    a2a = _a2a_name(a2a_backend)
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


def a2a_refusal(a2a_backend: Any, *, vendor: str, quant: Any, clamped_layers: tuple[int, ...] = ()) -> Optional[str]:
    """Why ``a2a_backend`` cannot serve this model on ``vendor``, or None: the ``--moe-a2a-backend``
    rows of the allow-list (:mod:`sglang_step35.served`, where the SGLang 0.5.23 facts behind each
    row are written)."""
    from sglang_step35 import served

    setting = served.Setting(vendor, moe_a2a_backend=_a2a_name(a2a_backend) or "none",
                             quant=served.quant_label(quant), clamped_layers=tuple(clamped_layers))
    return served.refusal(served.A2A, setting)


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
        unit = "block" if q.block else "group"
        return n, [f"{q.name}: {what} {width}/{parts} = {n} per GPU is not a multiple of {m} ({unit} size)"]
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


# ----------------------------------------------------------------------------------------------
# Runtime guard
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the plugin should do before SGLang builds the model.

    ``switch_to_ep``: set ``server_args.ep_size = ep_size`` and log ``message`` once.
    ``refuse``: raise with ``message`` (it contains the exact flags, also in ``flags``).
    """

    action: Literal["ok", "switch_to_ep", "refuse"]
    message: str
    ep_size: Optional[int] = None
    flags: tuple[str, ...] = field(default_factory=tuple)


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return default


def platform_vendor(platform: Any) -> str:
    """'amd', 'nvidia' or 'cpu' from a string ("rocm", "hip", "cuda", "mi300x", ...) or a platform object."""
    if isinstance(platform, str):
        p = platform.lower()
        if p in ("rocm", "hip", "amd") or p.startswith("mi3"):
            return "amd"
        if p == "cpu":
            return "cpu"
        return "nvidia"
    for attr, vendor in (("is_hip", "amd"), ("is_rocm", "amd"), ("is_cuda", "nvidia"), ("is_cpu", "cpu")):
        probe = getattr(platform, attr, None)
        if probe is not None and (probe() if callable(probe) else probe):
            return vendor
    raise ValueError(f"cannot tell the platform vendor from {platform!r}")


def effective_moe_backend(requested: Optional[str], vendor: str) -> str:
    """The MoE kernel family whose rule applies. ``auto`` on ROCm is judged as AITER — the backend
    the AMD seed deployments run and the stricter of the two ROCm choices."""
    backend = (requested or "auto").lower()
    if backend == "auto":
        return "aiter" if vendor == "amd" else "auto"
    return backend


def clamped_moe_layers(hf_config: Any) -> tuple[int, ...]:
    """MoE layers whose routed experts carry a SwiGLU clamp (Step-3.5-Flash: 43, 44)."""
    limits = _get(hf_config, "swiglu_limits") or []
    return tuple(i for i in sorted(moe_layer_ids(hf_config)) if i < len(limits) and float(limits[i] or 0) > 0)


def clamp_runner_refusal(
    *, vendor: str, quant: Any, aiter: bool, runner_backend: Optional[str], clamped_layers: tuple[int, ...]
) -> Optional[str]:
    """Why the MoE runner these settings select is not served (it would drop Step's router or clamp,
    or is unverified), or None: the ``--moe-runner-backend`` and quantization rows of the allow-list
    (:mod:`sglang_step35.served`)."""
    from sglang_step35 import served

    setting = served.Setting(vendor, moe_runner_backend=str(runner_backend or "auto").lower(),
                             quant=served.quant_label(quant), aiter=bool(aiter), clamped_layers=tuple(clamped_layers))
    found = served.refusals(setting, (served.RUNNER, served.QUANT))
    return "; ".join(found) or None


def recommended_layout(
    hf_config: Any, tp: int, quant: Any, vendor: str, backend: str  # noqa: ARG001 (backend encodes the vendor)
) -> Optional[tuple[int, list[str]]]:
    """The EP size and flags that make ``tp`` GPUs valid, or None when no flag can. Never an
    all-to-all backend: the standard dispatcher serves every layout an a2a one would (the shared
    expert is replicated where TP would split its blocks) and keeps Step's clamp exact."""
    q = parse_quant(quant)
    E = int(_get(hf_config, "moe_num_experts"))
    # EP = TP whenever the experts divide (whole experts per GPU, the seeds' layout); else pure TP.
    ep = tp if E % tp == 0 else 1
    verdict = check_moe_layout(
        backend,
        q,
        int(_get(hf_config, "moe_intermediate_size")),
        tp,
        ep,
        num_experts=E,
        share_expert_dim=_get(hf_config, "share_expert_dim"),
        dense_intermediate_size=_get(hf_config, "intermediate_size"),
    )
    return (ep, [f"--tp {tp}", f"--ep {ep}"]) if verdict.ok else None


def _aiter_switch(vendor: str) -> bool:
    import os

    return vendor == "amd" and os.environ.get("SGLANG_USE_AITER", "0").lower() in ("1", "true", "yes")


def guard_moe_layout(server_args_like: Any, hf_config: Any, platform: Any, *, aiter: Optional[bool] = None) -> Decision:
    """Decide, before the model is built, whether the server args give Step-3.5 a MoE it serves.

    ``server_args_like``: anything with ``tp_size``, ``ep_size`` (or ``moe_ep_size``),
    ``moe_runner_backend``, ``moe_a2a_backend``, ``quantization``, ``moe_dense_tp_size``,
    ``enable_dp_attention`` (attributes or mapping keys; missing ones take SGLang's defaults).
    ``hf_config``: the Step config (object or dict); its ``quantization_config`` is used when
    ``quantization`` is unset. ``platform``: "cuda" / "rocm" / "cpu" or an object with ``is_hip()``
    / ``is_cuda()``. ``aiter``: SGLang's AITER switch (default: ``SGLANG_USE_AITER`` on AMD).
    Changes nothing; reads nothing else.
    """
    if not moe_layer_ids(hf_config) or not _get(hf_config, "moe_num_experts"):
        return Decision("ok", "step35: no MoE layers; nothing to check")
    vendor = platform_vendor(platform)
    aiter = _aiter_switch(vendor) if aiter is None else bool(aiter)
    tp = int(_get(server_args_like, "tp_size", default=1))
    ep = int(_get(server_args_like, "ep_size", "moe_ep_size", default=1))
    runner = _get(server_args_like, "moe_runner_backend")
    backend = effective_moe_backend(runner, vendor)
    a2a = _a2a_name(_get(server_args_like, "moe_a2a_backend"))
    quant = launch_quant(_get(server_args_like, "quantization"), _get(hf_config, "quantization_config"))
    E = int(_get(hf_config, "moe_num_experts"))
    inter = int(_get(hf_config, "moe_intermediate_size"))
    clamped = clamped_moe_layers(hf_config)
    base = recommended_layout(hf_config, tp, quant, vendor, effective_moe_backend(None, vendor))
    use_instead = " ".join(base[1]) if base else f"`step35 plan` for a command on {tp} GPUs"

    refusals = []
    if _get(server_args_like, "enable_dp_attention", default=False):
        refusals.append(
            "--enable-dp-attention: sglang-step35's attention, embeddings and MoE block split over the whole TP "
            "group (there is no attention-DP layout), so DP ranks would compute wrong shards"
        )
    # Every MoE setting is judged by the one allow-list (sglang_step35.served), as model construction is.
    from sglang_step35 import served

    setting = served.Setting(
        vendor, moe_runner_backend=str(runner or "auto").lower(), moe_a2a_backend=a2a or "none",
        quant=served.quant_label(quant), aiter=aiter, clamped_layers=clamped,
        ep_num_redundant_experts=int(_get(server_args_like, "ep_num_redundant_experts", default=0)),
        enable_eplb=bool(_get(server_args_like, "enable_eplb", default=False)),
        init_expert_location=str(_get(server_args_like, "init_expert_location", default="trivial")),
    )
    refusals += served.refusals(setting)
    if refusals:
        flags = ("--enable-dp-attention", *(f for f in served.FLAGS if f.startswith("--")))
        drop = [f for f in flags if any(r.startswith(f) for r in refusals)]
        fix = f"relaunch without {', '.join(drop)}: {use_instead}" if drop else f"use instead: {use_instead}"
        if any("SGLANG_USE_AITER" in r for r in refusals):
            fix += " (with the block-FP8 or BF16 checkpoint, or SGLANG_USE_AITER=0)"
        return Decision(
            "refuse",
            f"step35: refusing --tp {tp} --ep {ep} ({quant.name}): {'; '.join(refusals)}. {fix}",
            flags=tuple(base[1]) if base else (),
        )

    kwargs = dict(
        num_experts=E,
        share_expert_dim=_get(hf_config, "share_expert_dim"),
        a2a_backend=a2a,
        dense_intermediate_size=_get(hf_config, "intermediate_size"),
        dense_tp=_get(server_args_like, "moe_dense_tp_size"),
    )
    verdict = check_moe_layout(backend, quant, inter, tp, ep, **kwargs)
    if verdict.ok:
        where = f"{E // ep} whole experts per GPU" if ep == tp else f"N={verdict.routed_n} per GPU"
        block = moe_block_layout(a2a_backend=a2a, quant=quant, share_expert_dim=kwargs["share_expert_dim"], tp_size=tp)
        shared = "replicated" if block.shared_expert_replicated else "TP-split"
        return Decision(
            "ok", f"step35: MoE layout --tp {tp} --ep {ep} ({quant.name}, {backend}): {where}; shared expert {shared}"
        )
    if verdict.routed_failed and not (verdict.shared_failed or verdict.other_failed) and ep != tp and E % tp == 0:
        fixed = check_moe_layout(backend, quant, inter, tp, tp, **kwargs)
        if fixed.ok:
            return Decision(
                "switch_to_ep",
                f"step35: --tp {tp} --ep {ep} would split each expert to N={verdict.routed_n} per GPU, which "
                f"{backend}/{quant.name} cannot run ({verdict.reasons[0]}); using --ep {tp} instead "
                f"({E // tp} whole experts per GPU, N={inter}).",
                ep_size=tp,
                flags=(f"--tp {tp}", f"--ep {tp}"),
            )
    rec = recommended_layout(hf_config, tp, quant, vendor, backend)
    problems = "; ".join(verdict.reasons)
    if rec is not None:
        flags = tuple(rec[1])
        fix = "relaunch with: " + " ".join(flags)
    else:
        flags = ()
        good = [t for t in (1, 2, 4, 8, 16) if t != tp and recommended_layout(hf_config, t, quant, vendor, backend)]
        fix = (
            f"no EP setting makes --tp {tp} valid for {quant.name}; TP sizes that work: "
            f"{', '.join(map(str, good)) or 'none'} (run `step35 plan` for a full command)"
        )
    return Decision("refuse", f"step35: refusing --tp {tp} --ep {ep} ({quant.name}, {backend}): {problems}. {fix}", flags=flags)

"""Which runner computes a Step-3.5 MoE layer's routed experts, and which MoE settings are refused:
the one home of that policy (the model, the launch guard, the planner, docs/correctness.md and the
tests all read it). The SGLang method subclasses that pin a clamped layer's runner are in
:mod:`.runner`; the TP/EP split rule in :mod:`.layout`; every refusal is a row of the allow-list
:mod:`sglang_step35.served`.

The facts it encodes (SGLang 0.5.23, read in site-packages):
- SGLang's Triton MoE runner computes Step's clamp exactly, ``min(silu(gate), L) * clamp(up, -L, L)``
  (``_swiglu_silu_clamp_mul`` in ``moe_runner/triton_utils/fused_moe.py``), when ``FusedMoE`` gets
  ``gemm1_clamp_limit=L``; unquantized and block-FP8 experts alike (the FP8 path keeps its block
  scales). So on GPUs every layer runs on FusedMoE, clamped ones included, and CUDA graphs capture it.
- AITER's CK fused MoE has no clamped SwiGLU (vllm #36193, #39436). SGLang itself sends layers with
  ``gemm1_clamp_limit`` to Triton only on gfx95x (``_aiter_ck_moe_unsupported_reason``); on MI300X
  (gfx942) it would run AITER and drop the clamp. Clamped layers therefore get
  :class:`ClampHonouringMoEMethod` (BF16) or :class:`ClampHonouringFp8MoEMethod` (block FP8): no
  AITER runner and no AITER weight shuffle for that layer, the other layers stay on AITER (the
  per-layer fallback of vllm #39436). SGLang's ``Fp8MoEMethod`` would hand every layer to AITER,
  whose FP8 MoE passes ``swiglu_limit`` but not ``gemm1_clamp_limit`` (``maybe_get_hip_aiter_quant_info``).
- SGLang's CPU MoE (``moe_forward_native``) ignores ``gemm1_clamp_limit`` and indexes with the -1 ids
  of non-local experts under EP: only there do the clamped layers (and every layer under EP) run our
  own expert loop (``models/expert_compute.py``). CPU is never captured in a CUDA graph.

Guard choice (:func:`guard_moe_layout`): when only the routed experts' TP split is bad and
``EP = TP`` fixes it, we **switch to EP = TP** and log one line. That change keeps the GPU count,
the math and the memory (each GPU still holds 1/T of the experts, now as whole experts) — it is the
layout every seed deployment uses, so refusing would only make the user retype a flag we already
know. Everything else (the shared expert or dense MLP split badly, experts that do not divide
evenly, a bad TP size) we **refuse**, with the exact flags to use: fixing those changes the
communication backend or the GPU count, which a server must not decide silently.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from ..config import cfg_get, moe_layer_ids
from .layout import a2a_name, check_moe_layout, moe_block_layout, recommended_layout
from .quant import launch_quant, parse_quant


class RoutedRunner(str, enum.Enum):
    FUSED = "fused"  # SGLang's FusedMoE with the platform's runner (Triton/AITER/...), clamp passed in
    FUSED_TRITON = "fused-triton"  # FusedMoE pinned to SGLang's Triton runner (clamped layers under AITER)
    EXPERT_LOOP = "expert-loop"  # our loop on FusedMoE's weights (CPU only)


@dataclass(frozen=True)
class RoutedPlan:
    runner: RoutedRunner
    clamp_by: Optional[str]  # who computes the clamp; None on unclamped layers

    @property
    def uses_fused_moe(self) -> bool:
        return self.runner is not RoutedRunner.EXPERT_LOOP


def routed_plan(
    swiglu_limit: float,
    *,
    device: str,
    ep_size: int,
    aiter: bool,
    quantized: bool = False,
    quant: Any = None,
    a2a_backend: Optional[str] = None,
    runner_backend: Optional[str] = None,
    layer_id: Optional[int] = None,
    ep_num_redundant_experts: int = 0,
    enable_eplb: bool = False,
    init_expert_location: str = "trivial",
    quant_method: Optional[str] = None,
) -> RoutedPlan:
    """The runner of one MoE layer.

    ``device``: "cuda", "rocm" or "cpu" (``Platform.device`` of :func:`sglang_step35.platform.current_platform`); ``aiter``: SGLang's AITER MoE
    is active (``SGLANG_USE_AITER=1`` on ROCm); ``quant``: the experts' quantization (anything
    ``moe.quant.parse_quant`` reads; default: block FP8 if ``quantized`` else BF16);
    ``a2a_backend`` / ``runner_backend`` / ``ep_num_redundant_experts`` / ``enable_eplb`` /
    ``init_expert_location``: SGLang's values of those flags; ``quant_method``: the name of SGLang's
    quantization method for the layer (``quant_config.get_name()``, e.g. ``moe_wna16``; default:
    ``quant`` when it is such a name). A combination outside the allow-list
    (:mod:`sglang_step35.served`, which the launch guard asks too) raises
    :class:`~sglang_step35.served.NotServedError` naming it.
    """
    from sglang_step35 import served

    if swiglu_limit < 0:
        raise ValueError(f"swiglu_limit must be >= 0, got {swiglu_limit}")
    clamped = swiglu_limit > 0
    if device not in ("cuda", "rocm", "cpu"):
        raise ValueError(f"unknown device {device!r}; expected 'cuda', 'rocm' or 'cpu'")
    vendor = {"cuda": "nvidia", "rocm": "amd", "cpu": "cpu"}[device]
    layers = ((layer_id if layer_id is not None else "of this layer"),) if clamped else ()
    served.check(served.Setting(
        vendor, moe_runner_backend=str(runner_backend or "auto").lower(), moe_a2a_backend=a2a_name(a2a_backend) or "none",
        quant=served.quant_label(quant if quant is not None else ("fp8" if quantized else None)), aiter=aiter,
        clamped_layers=layers, ep_num_redundant_experts=ep_num_redundant_experts, enable_eplb=enable_eplb,
        init_expert_location=init_expert_location,
        quant_method=str(quant_method or (quant if isinstance(quant, str) else "") or "").lower(),
    ))
    if device == "cpu":
        if clamped or ep_size > 1:
            return RoutedPlan(RoutedRunner.EXPERT_LOOP, "sglang-step35 expert loop" if clamped else None)
        return RoutedPlan(RoutedRunner.FUSED, None)
    if not clamped:
        return RoutedPlan(RoutedRunner.FUSED, None)
    if device == "rocm" and aiter:
        return RoutedPlan(RoutedRunner.FUSED_TRITON, "SGLang Triton runner (gemm1_clamp_limit)")
    return RoutedPlan(RoutedRunner.FUSED, "SGLang Triton runner (gemm1_clamp_limit)")


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




# Expert formats whose SGLang 0.5.23 MoE method has no AITER path: create_moe_runner builds
# MoeRunner(TRITON) whatever SGLANG_USE_AITER says (MoeWNA16Method for AWQ/GPTQ under moe_wna16;
# CompressedTensorsWNA16TritonMoE, which get_moe_scheme picks on ROCm for every W4A16 checkpoint;
# W8A8Int8MoEMethod), so AITER's CK tile rules do not apply to their experts.
TRITON_ONLY_EXPERTS = ("int4", "w4a16", "w8a8-int8")


def effective_moe_backend(requested: Optional[str], vendor: str, quant: Any = None) -> str:
    """The MoE kernel family whose rule applies. ``auto`` on ROCm is judged as AITER — the backend
    the AMD seed deployments run and the stricter of the two ROCm choices — except for ``quant``
    formats whose experts SGLang always runs on Triton (:data:`TRITON_ONLY_EXPERTS`)."""
    backend = (requested or "auto").lower()
    if backend == "auto":
        if vendor == "amd" and quant is not None and parse_quant(quant).name in TRITON_ONLY_EXPERTS:
            return "triton"
        return "aiter" if vendor == "amd" else "auto"
    return backend


def clamped_moe_layers(hf_config: Any) -> tuple[int, ...]:
    """MoE layers whose routed experts carry a SwiGLU clamp (Step-3.5-Flash: 43, 44)."""
    limits = cfg_get(hf_config, "swiglu_limits") or []
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


def a2a_refusal(a2a_backend: Any, *, vendor: str, quant: Any, clamped_layers: tuple[int, ...] = ()) -> Optional[str]:
    """Why ``a2a_backend`` cannot serve this model on ``vendor``, or None: the ``--moe-a2a-backend``
    rows of the allow-list (:mod:`sglang_step35.served`, where the SGLang 0.5.23 facts behind each
    row are written)."""
    from sglang_step35 import served

    setting = served.Setting(vendor, moe_a2a_backend=a2a_name(a2a_backend) or "none",
                             quant=served.quant_label(quant), clamped_layers=tuple(clamped_layers))
    return served.refusal(served.A2A, setting)


def guard_moe_layout(server_args_like: Any, hf_config: Any, platform: Any, *, aiter: Optional[bool] = None) -> Decision:
    """Decide, before the model is built, whether the server args give Step-3.5 a MoE it serves.

    ``server_args_like``: anything with ``tp_size``, ``ep_size`` (or ``moe_ep_size``),
    ``moe_runner_backend``, ``moe_a2a_backend``, ``quantization``, ``moe_dense_tp_size``,
    ``enable_dp_attention`` (attributes or mapping keys; missing ones take SGLang's defaults).
    ``hf_config``: the Step config (object or dict); its ``quantization_config`` is used when
    ``quantization`` is unset. ``platform``: a :class:`~sglang_step35.platform.Platform`, its kind,
    "cuda" / "rocm" or an object with ``is_hip()`` / ``is_cuda()`` (:func:`sglang_step35.platform.kind_of`).
    ``aiter``: SGLang's AITER switch (default: ``SGLANG_USE_AITER`` on AMD, read as SGLang reads it).
    Changes nothing; reads nothing else.
    """
    if not moe_layer_ids(hf_config) or not cfg_get(hf_config, "moe_num_experts"):
        return Decision("ok", "step35: no MoE layers; nothing to check")
    from sglang_step35.platform import kind_of
    from sglang_step35.platform.rocm import aiter_switch

    vendor = kind_of(platform)
    aiter = aiter_switch(vendor) if aiter is None else bool(aiter)
    tp = int(cfg_get(server_args_like, "tp_size", 1))
    ep = int(cfg_get(server_args_like, "ep_size", cfg_get(server_args_like, "moe_ep_size", 1)))
    runner = cfg_get(server_args_like, "moe_runner_backend")
    a2a = a2a_name(cfg_get(server_args_like, "moe_a2a_backend"))
    quant = launch_quant(cfg_get(server_args_like, "quantization"), cfg_get(hf_config, "quantization_config"))
    backend = effective_moe_backend(runner, vendor, quant)
    E = int(cfg_get(hf_config, "moe_num_experts"))
    inter = int(cfg_get(hf_config, "moe_intermediate_size"))
    clamped = clamped_moe_layers(hf_config)
    base = recommended_layout(hf_config, tp, quant, vendor, effective_moe_backend(None, vendor, quant))
    use_instead = " ".join(base[1]) if base else f"`step35 plan` for a command on {tp} GPUs"

    refusals = []
    if cfg_get(server_args_like, "enable_dp_attention", False):
        refusals.append(
            "--enable-dp-attention: sglang-step35's attention, embeddings and MoE block split over the whole TP "
            "group (there is no attention-DP layout), so DP ranks would compute wrong shards"
        )
    # Every MoE setting is judged by the one allow-list (sglang_step35.served), as model construction is.
    from sglang_step35 import served

    setting = served.Setting(
        vendor, moe_runner_backend=str(runner or "auto").lower(), moe_a2a_backend=a2a or "none",
        quant=served.quant_label(quant), aiter=aiter, clamped_layers=clamped,
        ep_num_redundant_experts=int(cfg_get(server_args_like, "ep_num_redundant_experts", 0)),
        enable_eplb=bool(cfg_get(server_args_like, "enable_eplb", False)),
        init_expert_location=str(cfg_get(server_args_like, "init_expert_location", "trivial")),
        quant_method=str(cfg_get(server_args_like, "quantization") or "").lower(),
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
        share_expert_dim=cfg_get(hf_config, "share_expert_dim"),
        a2a_backend=a2a,
        dense_intermediate_size=cfg_get(hf_config, "intermediate_size"),
        dense_tp=cfg_get(server_args_like, "moe_dense_tp_size"),
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

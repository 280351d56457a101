"""The launch policy as an explicit, ordered list of named steps (:data:`STEPS`).

SGLang runs :func:`apply_server_policy` before it resolves the server arguments, in the launcher
process, so a refusal stops the launch with one named error instead of a scheduler traceback. Each
step reads and changes one :class:`Launch` (the server arguments, the checkpoint's config.json and
the :func:`~sglang_step35.platform.current_platform`); explicit user flags win unless they would
silently give wrong results. The order matters where one step fills a field a later one reads:
the MTP step picks ``intel_amx`` on CPU before the CPU defaults would pick ``torch_native``, and
every step after ``read_config`` runs for Step-3.5 checkpoints only (another model on a GPU-less
host gets SGLang's own defaults; ``register()``'s process-level CPU support is all it needs).
The outcome is recorded for the processes SGLang spawns (:mod:`.marker`): our model classes build
only in a launch the policy applied to.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from sglang_step35.platform import Platform, current_platform

logger = logging.getLogger("sglang_step35")


@dataclass
class Launch:
    """One launch being decided: ``cfg`` is the checkpoint's config.json (None until read, and for
    a model that is not Step-3.5, which ends the policy)."""

    server_args: Any
    platform: Platform = field(default_factory=current_platform)
    cfg: Optional[dict] = None

    def arg(self, name: str, default: Any = None) -> Any:
        value = getattr(self.server_args, name, None)
        return default if value is None else value

    @property
    def has_sliding_layers(self) -> bool:
        from sglang_step35.config import SLIDING

        return SLIDING in ((self.cfg or {}).get("layer_types") or [])


def read_config(launch: Launch) -> None:
    """The checkpoint's config.json (a hub repo id's fetched as SGLang fetches it moments later:
    same revision, hub and cache rules); a malformed Step-3.5 config fails here with one named error."""
    from sglang_step35.config import validate
    from sglang_step35.hub import ConfigUnread, launch_config
    from sglang_step35.launch import marker

    model_path = launch.arg("model_path")
    launch.cfg = None
    try:
        cfg = launch_config(model_path, launch.arg("revision"), launch.arg("download_dir")) if model_path else None
    except ConfigUnread as e:  # left to SGLang; a Step-3.5 model built in this launch refuses (marker)
        marker.record(marker.UNREAD, model_path, str(e))
        return
    if cfg is None or cfg.get("model_type") != "step3p5":
        marker.record(marker.NOT_STEP, model_path)
        return
    validate(cfg, tp_size=int(launch.arg("tp_size", 1) or 1))
    launch.cfg = cfg


def pipeline_parallel(launch: Launch) -> None:
    """Refuse a --pp-size layout Step-3.5 cannot be served with (:mod:`.parallel_guard`)."""
    from sglang_step35.launch.parallel_guard import guard_pipeline_parallel

    guard_pipeline_parallel(launch.server_args, launch.cfg)


def mtp(launch: Launch) -> None:
    """A speculative launch: the checkpoint must carry the MTP layers asked for (fail in the launcher,
    not in a scheduler subprocess); on CPU the draft needs SGLang's intel_amx attention (its EAGLE
    draft refuses torch_native; our sgl_kernel stand-in serves intel_amx's ops)."""
    if not launch.arg("speculative_algorithm"):
        return
    from sglang_step35.mtp_check import check_mtp_request

    check_mtp_request(launch.cfg, launch.arg("speculative_num_steps"), launch.arg("model_path"))
    if not launch.platform.has_accelerator and launch.arg("attention_backend") is None:
        launch.server_args.attention_backend = "intel_amx"  # kept by platform.cpu.keep_cpu_spec_attention


def platform_defaults(launch: Launch) -> None:
    """What the user left unset, filled for this platform (GPU-less hosts: platform.cpu); on AMD, an
    SGLANG_USE_AITER value SGLang reads two ways is refused (platform.rocm)."""
    if not launch.platform.has_accelerator:
        from sglang_step35.platform.cpu import cpu_server_defaults

        cpu_server_defaults(launch.server_args, launch.cfg)
    from sglang_step35.platform.rocm import aiter_env_refusal

    why = aiter_env_refusal(launch.platform.kind)
    if why:
        raise ValueError(why)


def attention(launch: Launch) -> None:
    """An attention backend that honours Step-3.5's sliding windows (chosen on a GPU when unset, an
    explicit one checked), and one window convention for prefill, decode and draft alike."""
    from sglang_step35.attention import choose_attention_backend, guard_window_conventions

    if launch.platform.has_accelerator:
        choice = choose_attention_backend(launch.platform, launch.arg("attention_backend"), launch.has_sliding_layers)
        for k, v in choice.env.items():
            os.environ.setdefault(k, v)
        if launch.arg("attention_backend") is None:
            launch.server_args.attention_backend = choice.backend
        logger.info("attention backend %s: %s", choice.backend, choice.reason)
    guard_window_conventions(
        launch.arg("attention_backend"),
        launch.arg("prefill_attention_backend"),
        launch.arg("decode_attention_backend"),
        has_sliding_layers=launch.has_sliding_layers,
        speculative_eagle_topk=launch.arg("speculative_eagle_topk"),
    )


def served_combinations(launch: Launch) -> None:
    """The allow-list (:mod:`sglang_step35.served`) for the MTP draft's own attention backend, and a
    quantized checkpoint under the quantization method SGLang will pick for it (:func:`quant_method_problems`);
    its MoE rows are asked by the MoE step, which needs the layout they are judged with."""
    from sglang_step35 import served

    served.check_draft_attention(launch.server_args, launch.cfg, launch.platform)
    problems = quant_method_problems(launch)
    if problems:
        raise ValueError(problems)


def quant_method_problems(launch: Launch) -> Optional[str]:
    """Why the checkpoint's registered format (:mod:`sglang_step35.quant`) cannot run under the
    quantization method SGLang will build it with, or None. Asked at launch with the method SGLang
    picks (``--quantization``, else the checkpoint's ``quant_method``, named as SGLang's
    ``get_name()``; a method SGLang swaps at load, e.g. awq -> awq_marlin on CUDA, is seen here by the
    checkpoint's name); the model asks the same format function at construction
    (``models/quant_build.refuse_unservable_quant``). Not on a CPU: there our class builds unquantized and
    dequantizes at load, whatever the method (``quant_build.cpu_dequant_fallback``). E.g. compressed-tensors
    W8A8-INT8 without ``--quantization w8a8_int8``: SGLang's compressed-tensors INT8 MoE is NPU-only."""
    if not launch.platform.has_accelerator:
        return None
    from sglang_step35 import quant

    qc = quant.checkpoint_quantization_config(launch.cfg or {})
    method = str(launch.arg("quantization") or (qc or {}).get("quant_method") or "").lower()
    method = {"compressed-tensors": "compressed_tensors"}.get(method, method)  # CompressedTensorsConfig.get_name()
    found = [why for why in (quant.method_refusal(qc, method, launch.platform.kind),
                             quant.single_expert_ignores(qc, launch.cfg)) if why]
    return "; ".join(found) or None


def moe_layout(launch: Launch) -> None:
    """No expert split a MoE backend cannot run, and nothing the allow-list refuses: an expert TP
    split the kernel cannot run becomes EP = TP (logged), anything else unservable is refused."""
    from sglang_step35.moe import guard_moe_layout

    decision = guard_moe_layout(launch.server_args, launch.cfg, launch.platform.kind)
    if decision.action == "switch_to_ep":
        launch.server_args.ep_size = decision.ep_size
        logger.warning("%s", decision.message)
    elif decision.action == "refuse":
        raise ValueError(decision.message)


def swa_ratio(launch: Launch) -> None:
    """SGLang's hybrid SWA pool: the planned --swa-full-tokens-ratio, or HiCache's cost named."""
    from sglang_step35.swa_ratio import apply_swa_ratio_policy

    apply_swa_ratio_policy(launch.server_args, launch.cfg)


Step = Callable[[Launch], None]
STEPS: tuple[Step, ...] = (
    read_config, pipeline_parallel, mtp, platform_defaults, attention, served_combinations, moe_layout, swa_ratio,
)


# Model paths SGLang uses for "no model" (sglang/srt/server_args.py skips them the same way).
SGLANG_PLACEHOLDER_PATHS = ("none", "dummy")


def apply_server_policy(server_args, *args, **kwargs):
    """SGLang's BEFORE hook of ``ServerArgs.resolve_once``: run :data:`STEPS` in order on
    ``server_args`` (a Step-3.5 checkpoint only). Returns None (SGLang's hook protocol: go on)."""
    if getattr(server_args, "_resolution_finished", False):
        return None
    from sglang_step35.swa_ratio import resolving_placeholder

    if resolving_placeholder():  # SGLang's placeholder ServerArgs our ratio policy has it resolve
        return None
    if str(getattr(server_args, "model_path", "")).lower() in SGLANG_PLACEHOLDER_PATHS:
        # SGLang's absent-model sentinel (server_args.py treats "none" / "dummy" so), e.g. the
        # ServerArgs(model_path="dummy") every runtime_context.override_server_args resolves: no launch,
        # so no decision either — recording its failed hub lookup would make the marker refuse the
        # next Step-3.5 model built in this process (launch/marker.py).
        return None
    run_steps(server_args)
    return None


def run_steps(server_args, after_step: Optional[Callable[[str, Launch], None]] = None) -> Launch:
    """Run :data:`STEPS` in order on ``server_args``, calling ``after_step(name, launch)`` after each
    (``step35 doctor`` attributes each change to its step); a refusal propagates from its step."""
    from sglang_step35.launch import marker

    launch = Launch(server_args)
    for step in STEPS:
        step(launch)
        if after_step is not None:
            after_step(step.__name__, launch)
        if launch.cfg is None:  # not a Step-3.5 checkpoint (or unread): SGLang's own defaults
            break
    else:  # every step accepted the launch: a Step-3.5 model built in it may start (launch/marker.py)
        marker.record(marker.APPLIED, launch.arg("model_path"))
    return launch

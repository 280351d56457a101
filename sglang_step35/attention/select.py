"""Attention-backend selection for Step-3.5 (pure policy over :class:`sglang_step35.platform.Platform`).

Step-3.5 mixes full-attention layers with sliding-window layers (window 512, 3 sliding : 1 full).
A backend that ignores the window does not crash: it silently attends to the whole context and the
text degrades after a few hundred tokens (SGLang on B200 with ``trtllm_mha``, sglang #18970). So the
selection below only ever returns, or accepts from the user, backends whose SGLang 0.5.23
implementation applies the window. The capability table was read from the 0.5.23 sources
(``sglang/srt/layers/attention/*``, ``arg_groups/model_override_base.py``, ``arg_groups/overrides.py``);
each entry says where.

``choose_attention_backend`` is pure: it takes a :class:`~sglang_step35.platform.Platform` (the
launch policy passes ``current_platform()``, the planner ``platform.for_arch``) and returns a
:class:`Choice`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from sglang_step35.platform import Platform

# --- What SGLang 0.5.23 does with sliding windows, per MHA attention backend -----------------------
# Backends that apply ``layer.sliding_window_size`` on every prefill/decode path:
WINDOW_CAPABLE: dict[str, str] = {
    "torch_native": "torch_native_backend.py builds a (k <= q) & (k >= q - window) mask",
    "triton": "triton_backend.py passes sliding_window_size to its extend/decode kernels (the one "
    "path that cannot, dense one-shot prefill, is MLA-only and raises instead of ignoring it)",
    "flashinfer": "flashinfer_backend.py passes window_left=layer.sliding_window_size and uses a "
    "separate wrapper for sliding layers",
    "fa3": "flashattention_backend.py passes window_size=(sliding_window_size, 0)",
    "fa4": "same FlashAttentionBackend as fa3 (fa_impl_ver=4, sm100 and a dedicated sm120 module)",
    # sglang #18970: trtllm_mha once dropped the window on B200. In 0.5.23 every call into
    # trtllm_batch_{decode,context}_with_kv_cache / fmha_v2 passes window_left=layer.sliding_window_size
    # and the module docstring states sliding-window support, so an explicit choice is honoured;
    # the default on Blackwell is still fa4 (see choose_attention_backend).
    "trtllm_mha": "trtllm_mha_backend.py passes window_left=layer.sliding_window_size on every "
    "prefill/decode call (the bug of sglang #18970 is fixed in 0.5.23)",
    "aiter": "aiter_backend.py applies the window in its unified-attention path, which it forces on "
    "when the hybrid SWA KV pool is in use; its paged-decode path raises for sliding layers, so "
    "SGLANG_USE_AITER_UNIFIED_ATTN=1 is required whenever hybrid SWA memory is disabled",
    "intel_amx": "intel_amx_backend.py passes sliding_window_size + 1 to its CPU kernels",
    "intel_xpu": "xpu_backend.py passes window_size=(sliding_window_size, 0)",
    "ascend": "npu ascend_backend.py handles is_hybrid_swa layers",
}
# Backends that cannot serve sliding-window MHA layers (ignore the window or reject it):
NO_WINDOW: dict[str, str] = {
    "flex_attention": "torch_flex_backend.py has no sliding-window handling (would attend to everything)",
    "wave": "wave_backend.py has no sliding-window handling",
    "hpc_ops": "hpc_ops_backend.py raises 'does not support sliding window'",
    "minicpm_flashattn": "MiniCPM backend raises on sliding-window attention",
    "minicpm_flashinfer": "MiniCPM backend raises on sliding-window attention",
    # MLA / sparse-attention / model-specific backends: Step-3.5 is GQA, and none of these applies
    # an MHA sliding window.
    "dsa": "DeepSeek sparse-attention (MLA) backend",
    "nsa": "alias of dsa",
    "qsa": "Qwen sparse-attention backend",
    "dsv4": "DeepSeek-V4 backend",
    "compressed": "alias of dsv4",
    "flashmla": "MLA-only backend",
    "trtllm_mla": "MLA-only backend",
    "cutedsl_mla": "MLA-only backend",
    "tokenspeed_mla": "alias of cutedsl_mla (MLA-only)",
    "llada2_cfg_flashinfer": "LLaDA2 diffusion-model backend",
}

_AITER_UNIFIED_ENV = {"SGLANG_USE_AITER_UNIFIED_ATTN": "1"}


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str
    # Environment variables the backend needs to honour sliding windows (set before SGLang starts).
    env: Mapping[str, str] = field(default_factory=dict)


def window_capable_backends(platform: Platform) -> list[str]:
    """Sliding-window-honouring backends that run on ``platform``, best first."""
    if platform.kind == "cpu":
        return ["torch_native", "intel_amx"]
    if platform.kind == "amd":
        return ["aiter", "triton"] if platform.aiter_available else ["triton", "aiter"]
    if platform.is_blackwell:
        return ["fa4", "trtllm_mha", "flashinfer", "triton"]
    if platform.is_hopper:
        return ["fa3", "flashinfer", "trtllm_mha", "triton"]
    # Pre-Hopper: flashinfer (sm75+) when installed, else triton - the same order as the default.
    names = ["flashinfer", "triton"] if platform.flashinfer_available else ["triton", "flashinfer"]
    if platform.sm < 75:
        names.remove("flashinfer")
    if platform.sm // 10 == 8:
        # fa3's factory in 0.5.23 accepts sm8x for non-MLA models, but flashinfer/triton are the
        # upstream defaults there and the better-tested paths.
        names.append("fa3")
    return names


def choose_attention_backend(platform: Platform, user_choice: str | None, has_sliding_layers: bool) -> Choice:
    """Pick the attention backend for a Step-3.5 model.

    An explicit ``user_choice`` wins, except when the model has sliding-window layers and the
    backend cannot apply the window: then a ValueError names the flag, the backend and the
    alternatives (serving would otherwise produce silently wrong text past the window).
    """
    if user_choice:
        return _check_user_choice(platform, user_choice, has_sliding_layers)

    if platform.kind == "cpu":
        return Choice("torch_native", "CPU: torch_native (SDPA with an explicit sliding-window mask)")
    if platform.kind == "amd":
        if platform.aiter_available:
            arch = platform.gcn_arch or "unknown gfx"
            if has_sliding_layers:
                return Choice(
                    "aiter",
                    f"AMD {arch} with AITER importable: aiter; its sliding-window support lives in the "
                    "unified-attention path, so SGLANG_USE_AITER_UNIFIED_ATTN=1 is set (it is forced on "
                    "with the hybrid SWA pool anyway, and required when hybrid SWA memory is disabled)",
                    dict(_AITER_UNIFIED_ENV),
                )
            return Choice("aiter", f"AMD {arch} with AITER importable: aiter")
        return Choice("triton", "AMD without an importable AITER: triton (portable, honours sliding windows)")

    # NVIDIA
    if platform.is_hopper:
        return Choice("fa3", f"Hopper sm{platform.sm}: fa3 (SGLang's MHA default on Hopper; honours windows)")
    if platform.is_blackwell:
        # SGLang 0.5.23's own Step3p5 override (_step3p_overrides) picks fa4 on every Blackwell,
        # and fa4 applies the window on both sm100 and sm120 (dedicated sm120 module). trtllm_mha,
        # SGLang's generic sm100 default, is window-correct again in 0.5.23 (sglang #18970 fixed)
        # and is accepted when asked for, but is not our default: it is the backend that shipped
        # the window bug, and upstream does not route Step through it.
        return Choice(
            "fa4",
            f"Blackwell sm{platform.sm}: fa4 (honours sliding windows on sm100 and sm120; upstream's "
            "Step-3.5 default; trtllm_mha is window-correct in 0.5.23 but not preferred, sglang #18970)",
        )
    if platform.flashinfer_available and platform.sm >= 75:
        return Choice("flashinfer", f"NVIDIA sm{platform.sm}: flashinfer (installed; honours windows)")
    return Choice("triton", f"NVIDIA sm{platform.sm}: triton (flashinfer not installed or unsupported)")


def _check_user_choice(platform: Platform, backend: str, has_sliding_layers: bool) -> Choice:
    if not has_sliding_layers:
        return Choice(backend, "explicit --attention-backend (model has no sliding-window layers)")
    if backend in WINDOW_CAPABLE:
        env = dict(_AITER_UNIFIED_ENV) if backend == "aiter" else {}
        return Choice(backend, f"explicit --attention-backend; honours sliding windows: {WINDOW_CAPABLE[backend]}", env)
    why = NO_WINDOW.get(backend, "not known to apply sliding windows in SGLang 0.5.23")
    alternatives = ", ".join(window_capable_backends(platform))
    raise ValueError(
        f"--attention-backend {backend} cannot serve Step-3.5's sliding-window layers ({why}); "
        f"it would attend past the window and silently corrupt output. "
        f"Use one of: {alternatives} (or drop the flag to auto-select)."
    )


# --- one sliding-window value for every backend a layer can run under -----------------------------
def guard_window_conventions(
    attention_backend: str | None,
    prefill_backend: str | None = None,
    decode_backend: str | None = None,
    *,
    has_sliding_layers: bool = True,
    speculative_eagle_topk: int | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Refuse backend combinations under which Step-3.5's sliding layers would not see exactly
    ``sliding_window`` keys (see :mod:`sglang_step35.attention.window`).

    A RadixAttention layer carries one ``sliding_window_size`` and the runner one
    ``sliding_window_size``, fixed at model construction, while SGLang 0.5.23 runs prefill and decode
    through different backends when ``--prefill-attention-backend`` / ``--decode-attention-backend``
    differ (HybridAttnBackend; each falls back to ``--attention-backend``). When the two backends read
    the window differently (aiter: S keys, every other: S+1; triton needs R = W, flashinfer R = W-1)
    no single pair of values is right for both: refuse, naming the flags.

    AITER reads the window as S keys only on its unified-attention paths; refused are the settings
    that leave them: the vectorized_5d KV layout (CK prefill takes window (S, -1), i.e. S+1 keys,
    while target verify stays unified: S keys), and target verify off the unified path
    (SGLANG_AITER_UNIFIED_VERIFY=0 or EAGLE topk > 1), whose extend_attention_fwd call passes no
    window at all (aiter_backend.py forward_extend, is_target_verify branch).
    """
    from sglang_step35.attention.window import radix_sliding_window_size, same_window_convention

    if not has_sliding_layers:
        return
    env = os.environ if env is None else env
    prefill = prefill_backend or attention_backend
    decode = decode_backend or attention_backend
    for name in {b for b in (prefill, decode) if b}:
        radix_sliding_window_size(name, 2)  # raises ValueError for a backend with no known convention
    if prefill and decode and prefill != decode and not same_window_convention(prefill, decode):
        raise ValueError(
            f"--prefill-attention-backend {prefill} and --decode-attention-backend {decode} read "
            "Step-3.5's sliding window differently, and a layer has one window value for both: one of "
            "the two phases would attend to one key too many or too few. Use the same backend for "
            f"both (e.g. --attention-backend {decode}) or two backends of one convention."
        )
    if "aiter" in (prefill, decode):
        layout = str(env.get("SGLANG_AITER_KV_CACHE_LAYOUT", "nhd")).strip().lower()
        if layout == "vectorized_5d":
            raise ValueError(
                "SGLANG_AITER_KV_CACHE_LAYOUT=vectorized_5d with the aiter backend: its CK prefill reads "
                "Step-3.5's sliding window as S+1 keys while its unified kernels read S; unset it (nhd)."
            )
        verify = str(env.get("SGLANG_AITER_UNIFIED_VERIFY", "1")).strip().lower()
        if verify in ("0", "false", "no", "off"):
            raise ValueError(
                "SGLANG_AITER_UNIFIED_VERIFY=0 with the aiter backend: target verify then runs "
                "extend_attention_fwd without any sliding window (full attention on sliding layers); unset it."
            )
        if speculative_eagle_topk is not None and int(speculative_eagle_topk) > 1:
            raise ValueError(
                f"--speculative-eagle-topk {speculative_eagle_topk} with the aiter backend: target verify "
                "leaves the unified kernel for extend_attention_fwd, which applies no sliding window; use "
                "--speculative-eagle-topk 1 or --attention-backend triton."
            )

"""Per-GPU memory arithmetic of a Step-3.5 deployment: weights by component, SGLang's fixed buffers,
and the KV pools (full, sliding-window, MTP draft), from the config alone.

Split out of :mod:`sglang_step35.plan`, which turns these numbers into a plan and a command;
tests/test_plan_constructs.py checks them against the bytes of our model class built per rank.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .config import layer_spec, moe_layer_ids
from .moe.quant import BF16, QUANTS, QuantSpec

# (draft steps, draft tokens) per MTP depth, top-k 1: a chain of `steps` MTP layers proposes
# `steps` tokens and the target verifies steps + 1 positions.
MTP_SPEC = {1: (1, 2), 3: (3, 4)}
CHUNKED_PREFILL = 8192  # emitted explicitly so the activation margin and SWA pool match the server
KV_DTYPE_BYTES = 2  # bf16 KV cache (--kv-cache-dtype auto on a bf16 model)
VOCAB_PADDING = 64  # SGLang pads the vocabulary to a multiple of 64 before splitting it by TP
# SGLang builds each rotary cos/sin cache in fp32 and keeps it fp32 on CUDA and HIP
# (layers/rotary_embedding/base.py: "cache needs to be in FP32").
ROPE_CACHE_DTYPE_BYTES = 4



def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

# What stays bf16 whatever the checkpoint's quantization (what Step's FP8 checkpoint and the
# community quantizations keep in higher precision): embeddings, LM heads, router (+ fp32 bias),
# norms, the head-wise attention gate g_proj, and the MTP layers (counted bf16 as an upper bound:
# re-quantized checkpoints differ). Quantized: attention q/k/v/o, dense MLPs, routed and shared
# experts.


def _attention_bytes(cfg: Mapping, index: int, tp: int, q: QuantSpec) -> int:
    s = layer_spec(cfg, index)
    h = int(cfg["hidden_size"])
    q_out = s.num_heads // tp * s.head_dim
    kv_out = max(1, s.num_kv_heads // tp) * s.head_dim  # KV heads replicated when kv_heads < tp
    # One linear_bytes per checkpoint tensor (SGLang keeps per-shard scales of fused q/k/v).
    qkv = q.linear_bytes(q_out, h) + 2 * q.linear_bytes(kv_out, h)
    o = q.linear_bytes(h, q_out)
    g_proj = BF16.linear_bytes(s.num_heads // tp, h)
    qk_norm = 2 * s.head_dim * 2
    # SGLang's Fp8Config gives each RadixAttention fp32 k_scale and v_scale scalars.
    kv_scales = 2 * 4 if q.name == "fp8" else 0
    return qkv + o + g_proj + qk_norm + kv_scales


def _mlp_bytes(hidden: int, inter_local: int, q: QuantSpec) -> int:
    # gate, up and down as the checkpoint stores them (per-shard scales of the fused gate_up).
    return 2 * q.linear_bytes(inter_local, hidden) + q.linear_bytes(hidden, inter_local)


def weight_breakdown(
    cfg: Mapping, quant: QuantSpec | str, tp: int, ep: int, mtp: int = 0, *, shared_expert_replicated: bool = False,
    layer_ids=None, first_stage: bool = True, last_stage: bool = True,
) -> dict[str, int]:
    """Bytes of weights per GPU by component (see the module notes for what stays bf16).

    Pipeline stages: ``layer_ids`` are the main layers the stage holds (all by default); the
    embedding lives on the first stage, the final norm and LM head on the last (the other stages
    hold PPMissingLayer stand-ins)."""
    q = QUANTS[quant] if isinstance(quant, str) else quant
    h, v = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    n_layers = int(cfg["num_hidden_layers"])
    moe = moe_layer_ids(cfg)
    E, inter = int(cfg["moe_num_experts"]), int(cfg["moe_intermediate_size"])
    S, D = int(cfg["share_expert_dim"]), int(cfg["intermediate_size"])
    vocab_local = pad_to(v, VOCAB_PADDING) // tp
    out = dict.fromkeys(
        ("embedding", "lm_head", "attention", "dense_mlp", "routed_experts", "shared_experts", "router", "norms", "mtp"), 0
    )
    out["embedding"] = vocab_local * h * 2 if first_stage else 0
    out["lm_head"] = 0 if cfg.get("tie_word_embeddings") or not last_stage else vocab_local * h * 2
    out["norms"] = h * 2 if last_stage else 0  # final norm
    moe_tp = tp // ep
    for i in range(n_layers) if layer_ids is None else layer_ids:
        out["attention"] += _attention_bytes(cfg, i, tp, q)
        out["norms"] += 2 * h * 2  # input + post-attention RMSNorm
        if i in moe:
            per_expert = _mlp_bytes(h, inter // moe_tp, q)
            out["routed_experts"] += (E // ep) * per_expert
            out["shared_experts"] += _mlp_bytes(h, S if shared_expert_replicated else S // tp, q)
            # The gate weight is fp32 under need_fp32_gate (our model builds it so), plus the fp32 bias.
            out["router"] += E * h * (4 if cfg.get("need_fp32_gate", True) else 2) + E * 4
        else:
            out["dense_mlp"] += _mlp_bytes(h, D // tp, q)
    for k in range(mtp):
        # SGLang 0.5.23 builds each MTP layer as its own draft model with its own embedding and
        # head (step3p5_mtp.py; set_embed_and_head does not share them), plus enorm/hnorm,
        # eh_proj (an unsplit nn.Linear 2H -> H), one decoder layer with a dense MLP, head norm.
        idx = n_layers + k
        out["mtp"] += (
            2 * vocab_local * h * 2
            + BF16.linear_bytes(h, 2 * h)
            + _attention_bytes(cfg, idx, tp, BF16)
            + _mlp_bytes(h, D // tp, BF16)
            + 5 * h * 2  # enorm, hnorm, two layer norms, shared_head.norm
        )
    return out


# ----------------------------------------------------------------------------------------------
# Buffers (allocated with the model, inside the static pool like the weights)
# ----------------------------------------------------------------------------------------------


def rope_cache_keys(cfg: Mapping, layer_ids) -> set[tuple]:
    """The distinct rotary embeddings ``layer_ids`` build. SGLang's get_rope caches by (head size,
    rotary dim, max position, theta, neox, scaling, dtype), so layers that agree share one
    cos_sin_cache; on Step-3.5-Flash the full layers (theta 5e6, llama3, partial rotary 0.5 -> 64 dims)
    and the sliding layers + MTP layers (theta 1e4, 128 dims) give two."""
    out = set()
    for i in layer_ids:
        s = layer_spec(cfg, i)
        out.add((s.head_dim, s.rotary_dim, s.rope_theta, s.use_rope_scaling))
    return out


def buffer_breakdown(cfg: Mapping, mtp: int = 0, layer_ids=None, last_stage: bool = True) -> dict[str, int]:
    """Bytes of non-parameter buffers per GPU (none is split by TP/EP): one fp32 cos_sin_cache of
    max_position_embeddings x rotary_dim per distinct rotary embedding (:func:`rope_cache_keys`;
    the MTP draft models run in the target's process and share its cache entries), and the
    precomputed weight + 1 copy (``gemma_weight``, bf16) SGLang's GemmaRMSNorm keeps of every norm.
    ``layer_ids``: the main layers this GPU holds (all by default)."""
    n = int(cfg["num_hidden_layers"])
    h = int(cfg["hidden_size"])
    layer_ids = range(n) if layer_ids is None else list(layer_ids)
    max_pos = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len"))
    with_mtp = list(layer_ids) + [n + k for k in range(mtp)]
    rope = sum(max_pos * rotary_dim * ROPE_CACHE_DTYPE_BYTES for _, rotary_dim, _, _ in rope_cache_keys(cfg, with_mtp))
    norms = 0
    for i in with_mtp:
        s = layer_spec(cfg, i)
        norms += 2 * h * 2 + 2 * s.head_dim * 2  # input/post-attention norms + q/k head norms
    norms += h * 2 if last_stage else 0  # final norm
    norms += mtp * 3 * h * 2  # each MTP layer's enorm, hnorm, shared_head norm
    return {"rope_cos_sin_cache": rope, "norm_weight_copies": norms}


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


def kv_bytes_per_token(
    cfg: Mapping, tp: int = 1, which: str = "full", dtype_bytes: int = KV_DTYPE_BYTES, layer_ids=None
) -> int:
    """K+V bytes one token occupies per GPU summed over main layers of one kind ("full",
    "sliding" or "all"); KV heads are split by TP and replicated when kv_heads < tp. ``layer_ids``:
    the layers of one pipeline stage (SGLang sizes each stage's pool by its own layers)."""
    total = 0
    for i in range(int(cfg["num_hidden_layers"])) if layer_ids is None else layer_ids:
        s = layer_spec(cfg, i)
        if which == "all" or (which == "sliding") == s.sliding:
            total += 2 * max(1, s.num_kv_heads // tp) * s.head_dim * dtype_bytes
    return total


def kv_cache_bytes(cfg: Mapping, tp: int, context: int, concurrency: int, *, hybrid_swa: bool = True) -> int:
    """KV for ``concurrency`` sequences of ``context`` tokens: full layers keep every token, sliding
    layers only the window (``hybrid_swa``); without the hybrid pool every layer keeps every token."""
    if not hybrid_swa:
        return kv_bytes_per_token(cfg, tp, "all") * context * concurrency
    window = int(cfg.get("sliding_window") or context)
    return (
        kv_bytes_per_token(cfg, tp, "full") * context * concurrency
        + kv_bytes_per_token(cfg, tp, "sliding") * min(context, window) * concurrency
    )


def mtp_kv_bytes_per_token(cfg: Mapping, tp: int, mtp: int) -> int:
    n = int(cfg["num_hidden_layers"])
    total = 0
    for k in range(mtp):
        s = layer_spec(cfg, n + k)
        total += 2 * max(1, s.num_kv_heads // tp) * s.head_dim * KV_DTYPE_BYTES
    return total


def planned_swa_ratio(cfg: Mapping, mtp: int, context: int, concurrency: int) -> float:
    """The ``--swa-full-tokens-ratio`` a plan emits: the launch policy's rule
    (:func:`sglang_step35.swa_ratio.plan_swa_ratio`, SGLang's compute_swa_request_cap plus a cached
    window per request) for ``concurrency`` requests of ``context`` tokens, the plan's chunk size
    and its MTP drafts."""
    from .swa_ratio import plan_swa_ratio

    steps, drafts = MTP_SPEC[mtp] if mtp else (None, None)
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=steps, speculative_eagle_topk=1,
                speculative_num_draft_tokens=drafts) if mtp else None  # fmt: skip
    window = int(cfg.get("sliding_window") or context)
    return plan_swa_ratio(window=window, context_len=context, full_tokens=context * concurrency,
                          max_running_requests=concurrency, chunked_prefill=CHUNKED_PREFILL, speculative=spec).ratio


def kv_memory(cfg: Mapping, tp: int, mtp: int, context: int, concurrency: int, layer_ids=None) -> dict[str, Any]:
    """The KV pool SGLang allocates for the plan: the full pool holds every token of every request;
    the sliding pool is sized as swa_full_tokens_ratio x the full pool (SGLang's rule), with the
    ratio planned by the launch policy's rule (:func:`planned_swa_ratio`); the MTP draft pool
    matches the full pool (a smaller draft pool overflowed in sglang #17630)."""
    full_tokens = context * concurrency
    ratio = planned_swa_ratio(cfg, mtp, context, concurrency)
    kv_full = kv_bytes_per_token(cfg, tp, "full", layer_ids=layer_ids) * full_tokens
    kv_swa = kv_bytes_per_token(cfg, tp, "sliding", layer_ids=layer_ids) * math.ceil(ratio * full_tokens)
    kv_mtp = mtp_kv_bytes_per_token(cfg, tp, mtp) * full_tokens
    return {
        "swa_full_tokens_ratio": ratio,
        "kv_full_layers": kv_full,
        "kv_sliding_layers": kv_swa,
        "kv_mtp_draft": kv_mtp,
        "kv_total": kv_full + kv_swa + kv_mtp,
    }


REQUEST_TOKENS = 262144  # "256K-token requests": Step-3.5-Flash's max_position_embeddings


def kv_pool_summary(cfg: Mapping, available_bytes: int, planned_ratio: float, tp: int, mtp: int) -> dict[str, Any]:
    """Full- and SWA-pool tokens SGLang's pool configurator makes of ``available_bytes`` of KV
    memory per GPU, at SGLang's default ratio and at the planned one, with the number of
    REQUEST_TOKENS-token requests the full pool holds (:func:`sglang_step35.swa_ratio.pool_tokens`)."""
    from .swa_ratio import SGLANG_DEFAULT_RATIO, pool_tokens

    out: dict[str, Any] = {"available_bytes": int(available_bytes), "request_tokens": REQUEST_TOKENS}
    for name, ratio in (("sglang_default", SGLANG_DEFAULT_RATIO), ("planned", planned_ratio)):
        full, swa = pool_tokens(cfg, available_bytes, ratio, tp=tp, mtp_layers=mtp)
        out[name] = {"swa_full_tokens_ratio": ratio, "full_tokens": full, "swa_tokens": swa,
                     "requests": full // REQUEST_TOKENS}  # fmt: skip
    return out


def format_kv_pool(k: Mapping[str, Any]) -> list[str]:
    """``step35 plan`` lines for :func:`kv_pool_summary` (none when empty: pipeline plans)."""
    if not k:
        return []
    lines = ["", f"KV pool per GPU (SGLang's HybridSWAPoolConfigurator on the {k['available_bytes'] / 2**30:.2f} GiB "
                 "left for KV):"]  # fmt: skip
    for name, label in (("sglang_default", "SGLang's default"), ("planned", "planned")):
        r = k[name]
        lines.append(f"  --swa-full-tokens-ratio {r['swa_full_tokens_ratio']:.3f} ({label}): "
                     f"{r['full_tokens']:,} full-pool tokens, {r['swa_tokens']:,} SWA tokens = "
                     f"{r['requests']} requests of {k['request_tokens'] // 1024}K tokens")  # fmt: skip
    return lines

"""A planned ``--swa-full-tokens-ratio`` for Step-3.5's hybrid SWA KV pool.

SGLang 0.5.23 sizes the sliding layers' pool as ``swa_full_tokens_ratio`` x the full pool, default
0.8 (``arg_groups/fields/schedule.py``), and sets a smaller value only for DeepSeek-V4 and Inkling.
On Step-3.5-Flash (12 full, 33 sliding layers, window 512) 0.8 keeps 0.8 x 33 sliding layers' KV
per full token: one full-pool token costs 153.6 KiB (bf16) against 180 KiB with a single pool, so
the hybrid pool buys only 1.17x the context. The SWA pool really needs what SGLang's own
``compute_swa_request_cap`` (``model_executor/pool_configurator.py``) counts -- per running request
window + eviction interval x draft tokens + page + decode allocation, plus the prefill chunks in
flight -- and room for the windows of cached prefixes (parked agent sessions); at a ratio near
0.05-0.1 the same memory holds ~3x the tokens.

:func:`plan_swa_ratio` turns that into a ratio; :func:`apply_swa_ratio_policy` (called by the
plugin's launch policy for Step-3.5 checkpoints) sets it when the user left the flag unset, with one
log line; an explicit ``--swa-full-tokens-ratio`` always wins. ``--enable-hierarchical-cache``
makes SGLang turn the hybrid pool off for Step (``arg_groups/overrides.py``, ``_step3p_overrides``):
accepted, with a warning that names what it costs. :func:`pool_tokens` runs SGLang's
``HybridSWAPoolConfigurator`` on the real config for ``step35 plan``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Mapping, Optional

logger = logging.getLogger("sglang_step35")

SGLANG_DEFAULT_RATIO = 0.8  # SGLang's fallback when the flag is unset (schedule.py)
# --chunked-prefill-size when the user gives none: SGLang picks 2,048-16,384 from the device's
# memory later in its resolution (arg_groups/memory_hook.py); the policy assumes the largest, so
# the SWA pool never falls short of SGLang's choice.
ASSUMED_CHUNKED_PREFILL = 16384


@dataclass(frozen=True)
class SwaRatioPlan:
    """What the planned ratio covers. ``full_tokens``: the full-pool size planned against (the
    user's --max-total-tokens, else one request at full context: the SWA pool then scales with
    whatever full pool SGLang sizes, and every full-context request brings its own share)."""

    ratio: float
    swa_tokens_needed: int
    full_tokens: int
    requests: int
    request_cap: int  # SGLang's compute_swa_request_cap for `requests`
    cached_windows: int  # room for this many cached prefixes' windows (window + page each)
    chunked_prefill: int

    def capacity_gain(self, full_bytes: int, sliding_bytes: int) -> float:
        """Full-pool tokens the same memory holds at this ratio / at SGLang's default ratio, for KV
        bytes per token summed over the full layers and over the sliding layers."""
        return (full_bytes + SGLANG_DEFAULT_RATIO * sliding_bytes) / (full_bytes + self.ratio * sliding_bytes)


# SGLang's override_server_args resolves a placeholder ServerArgs(model_path="dummy"), which runs
# the plugin's launch policy on it (a hub lookup of "dummy", CPU defaults); the policy skips it.
_placeholder_resolution: contextvars.ContextVar[bool] = contextvars.ContextVar("step35_placeholder", default=False)


def resolving_placeholder() -> bool:
    """True while this module has SGLang resolve a placeholder ServerArgs (not a launch)."""
    return _placeholder_resolution.get()


@contextlib.contextmanager
def _published(**fields):
    """SGLang's runtime context publishing ``fields`` (``override_server_args``), marked as a
    placeholder resolution for the plugin's launch policy."""
    from sglang.srt.runtime_context import get_context

    token = _placeholder_resolution.set(True)
    try:
        override = get_context().override_server_args(device="cpu", **fields)
        override.install()
    finally:
        _placeholder_resolution.reset(token)
    try:
        yield
    finally:
        override.restore()


def _spec_fields(speculative: Optional[Mapping[str, Any]]) -> dict:
    keys = ("speculative_algorithm", "speculative_num_steps", "speculative_eagle_topk", "speculative_num_draft_tokens")
    return {k: speculative[k] for k in keys if speculative and speculative.get(k) is not None}


def swa_request_cap(*, window: int, page_size: int, requests: int, chunked_prefill: int, attn_dp_size: int = 1,
                    disable_overlap_schedule: bool = False,
                    speculative: Optional[Mapping[str, Any]] = None) -> int:  # fmt: skip
    """SGLang's ``compute_swa_request_cap``: the SWA slots ``requests`` running requests hold at
    worst, plus the prefill chunks in flight. It reads the speculative and schedule settings from
    SGLang's runtime context, so they are published for the call (``override_server_args``)."""
    return _request_cap(window, page_size, requests, chunked_prefill, attn_dp_size, disable_overlap_schedule,
                        tuple(sorted(_spec_fields(speculative).items())))  # fmt: skip


@functools.lru_cache(maxsize=4096)  # the planner's search asks for the same settings many times
def _request_cap(window, page_size, requests, chunked_prefill, attn_dp_size, disable_overlap_schedule, spec) -> int:
    _sglang_ready()
    from sglang.srt.model_executor.pool_configurator import compute_swa_request_cap

    with _published(page_size=page_size, chunked_prefill_size=chunked_prefill, max_running_requests=requests,
                    disable_overlap_schedule=disable_overlap_schedule, **dict(spec)):  # fmt: skip
        return int(compute_swa_request_cap(page_size=page_size, window=window, attn_dp_size=attn_dp_size))


# Room for this many cached prefix tails (window + page each) per running request: SGLang's own default
# where it sizes an SWA pool from the request cap (pool_configurator._resolve_swa_prefix_tails, 4 x
# max_running_requests, DeepSeek-V4). One tail per request lost parked agent sessions' own history
# (sglang #35515) on `make bench-agent`'s parked scenario; four kept every turn (bench/RESULTS.md).
PREFIX_TAILS_PER_REQUEST = 4


def plan_swa_ratio(*, window: int, context_len: int, page_size: int = 1, full_tokens: Optional[int] = None,
                   max_running_requests: Optional[int] = None, chunked_prefill: Optional[int] = None,
                   attn_dp_size: int = 1, disable_overlap_schedule: bool = False,
                   speculative: Optional[Mapping[str, Any]] = None) -> SwaRatioPlan:  # fmt: skip
    """The smallest ratio (rounded up to 1/1000) whose SWA pool holds what SGLang's scheduler needs.

    With ``full_tokens`` known (--max-total-tokens): ``max_running_requests`` (else as many
    full-context requests as the pool holds) each with SGLang's per-request cap, the chunks in
    flight, and PREFIX_TAILS_PER_REQUEST cached windows per running request. Unknown (SGLang sizes the
    pool from memory later): one full-context request and its share; the ratio then gives every ``context_len``
    full-pool tokens that much SWA room, whatever the pool's size. Never below SGLang's own floor
    (``validate_swa_pool_size``: more than window + page SWA tokens) and never above 1."""
    if chunked_prefill is None:
        chunked_prefill = ASSUMED_CHUNKED_PREFILL
    elif chunked_prefill <= 0:  # chunked prefill off: a whole prompt is one forward
        chunked_prefill = context_len
    if full_tokens:
        requests = max_running_requests or max(1, full_tokens // context_len)
    else:
        full_tokens, requests = context_len, 1
    cap = swa_request_cap(window=window, page_size=page_size, requests=requests, chunked_prefill=chunked_prefill,
                          attn_dp_size=attn_dp_size, disable_overlap_schedule=disable_overlap_schedule,
                          speculative=speculative)  # fmt: skip
    cached = PREFIX_TAILS_PER_REQUEST * max(1, requests // max(1, attn_dp_size))
    need = cap + cached * (window + page_size)
    # SGLang floors the SWA pool to whole pages and refuses one of window + page tokens or fewer.
    floor = window + 2 * page_size
    ratio = min(1.0, math.ceil(max(need, floor) / full_tokens * 1000) / 1000)
    return SwaRatioPlan(ratio, need, full_tokens, requests, cap, cached, chunked_prefill)


def _kv_bytes(cfg: Mapping, tp: int) -> tuple[int, int]:
    from sglang_step35.plan_memory import kv_bytes_per_token

    return kv_bytes_per_token(cfg, tp, "full"), kv_bytes_per_token(cfg, tp, "sliding")


def _server_spec(server_args, cfg: Mapping) -> Optional[dict]:
    spec = {k: getattr(server_args, k, None) for k in ("speculative_algorithm", "speculative_num_steps",
                                                          "speculative_eagle_topk", "speculative_num_draft_tokens")}
    if not spec["speculative_algorithm"]:
        return None
    if spec["speculative_algorithm"] == "EAGLE":
        # Flags left unset are resolved by SGLang later; for Step's MTP they are the chain of the
        # checkpoint's MTP layers (steps = layers, top-k 1, steps + 1 draft tokens).
        steps = spec["speculative_num_steps"] or int(cfg.get("num_nextn_predict_layers") or 1)
        spec["speculative_num_steps"] = steps
        spec["speculative_eagle_topk"] = spec["speculative_eagle_topk"] or 1
        spec["speculative_num_draft_tokens"] = spec["speculative_num_draft_tokens"] or steps + 1
    return spec


def _server_plan(server_args, cfg: Mapping) -> SwaRatioPlan:
    dp = int(getattr(server_args, "dp_size", 1) or 1) if getattr(server_args, "enable_dp_attention", False) else 1
    return plan_swa_ratio(
        window=int(cfg["sliding_window"]),
        context_len=int(getattr(server_args, "context_length", None) or cfg.get("max_position_embeddings")),
        page_size=int(getattr(server_args, "page_size", None) or 1),
        full_tokens=getattr(server_args, "max_total_tokens", None),
        max_running_requests=getattr(server_args, "max_running_requests", None),
        chunked_prefill=getattr(server_args, "chunked_prefill_size", None),
        attn_dp_size=dp,
        disable_overlap_schedule=bool(getattr(server_args, "disable_overlap_schedule", False)),
        speculative=_server_spec(server_args, cfg),
    )


def _planned(server_args, cfg: Mapping) -> Optional[SwaRatioPlan]:
    try:
        return _server_plan(server_args, cfg)
    except (TypeError, ValueError) as e:  # settings SGLang's request cap cannot size before resolution
        logger.warning("--swa-full-tokens-ratio not planned: SGLang's compute_swa_request_cap cannot size the SWA "
                       "pool for these flags before SGLang resolves them (%s: %s); SGLang's default %.1f stays. "
                       "Give --swa-full-tokens-ratio, or the speculative flags in full.",
                       type(e).__name__, e, SGLANG_DEFAULT_RATIO)  # fmt: skip
        return None


def apply_swa_ratio_policy(server_args, cfg: Mapping) -> Optional[SwaRatioPlan]:
    """Launch policy for a Step-3.5 checkpoint with sliding layers: set ``swa_full_tokens_ratio``
    when the user left it unset (one log line: ratio, what it covers, capacity gain), or warn what
    ``--enable-hierarchical-cache`` costs. Returns the plan applied, else None."""
    if not cfg.get("sliding_window") or "sliding_attention" not in (cfg.get("layer_types") or []):
        return None
    tp = int(getattr(server_args, "tp_size", 1) or 1)
    full_b, swa_b = _kv_bytes(cfg, tp)
    if getattr(server_args, "enable_hierarchical_cache", False):
        # SGLang 0.5.23 resets the ratio to 1.0 and turns the hybrid pool off for Step under HiCache
        # (_step3p_overrides); HiCache's host tier is worth it for some agent workloads, so the
        # launch goes on, but the user learns the price in numbers.
        plan = _planned(server_args, cfg)
        if plan is None:
            return None
        logger.warning(
            "--enable-hierarchical-cache on Step-3.5: SGLang 0.5.23 turns the hybrid SWA KV pool off for "
            "this model, so all %d sliding layers keep every token: %.1f KiB of GPU KV per token instead of "
            "%.1f KiB with the hybrid pool at the planned --swa-full-tokens-ratio %.3f, i.e. %.2fx fewer tokens "
            "(context x requests) in the same memory. Drop --enable-hierarchical-cache to keep the saving.",
            sum(1 for t in cfg["layer_types"][: int(cfg["num_hidden_layers"])] if t == "sliding_attention"),
            (full_b + swa_b) / 1024, (full_b + plan.ratio * swa_b) / 1024, plan.ratio,
            (full_b + swa_b) / (full_b + plan.ratio * swa_b),
        )  # fmt: skip
        return None
    if getattr(server_args, "disable_hybrid_swa_memory", False):
        return None
    if getattr(server_args, "swa_full_tokens_ratio", None) is not None:
        return None  # the user's value wins
    plan = _planned(server_args, cfg)
    if plan is None:
        return None
    server_args.swa_full_tokens_ratio = plan.ratio
    logger.info(
        "Step-3.5 hybrid SWA KV pool: --swa-full-tokens-ratio %.3f planned (SWA slots needed: %d = SGLang's "
        "request cap %d for %d running request(s), chunked prefill %d, plus %d cached window(s), per %d "
        "full-pool tokens): %.2fx the KV tokens of SGLang's default %.1f in the same memory",
        plan.ratio, plan.swa_tokens_needed, plan.request_cap, plan.requests, plan.chunked_prefill,
        plan.cached_windows, plan.full_tokens, plan.capacity_gain(full_b, swa_b), SGLANG_DEFAULT_RATIO,
    )  # fmt: skip
    return plan


def _sglang_ready() -> None:
    """SGLang as in every process it starts: our plugin registered (on a GPU-less machine SGLang's
    pool code imports sgl_kernel, which only our stand-in provides; `step3p5` configs are read with
    our config class). A no-op in the launcher, where SGLang registered it already."""
    from sglang_step35.plugin import register

    register()


@functools.lru_cache(maxsize=8)
def _sglang_model_config(cfg_json: str):
    import json
    import tempfile
    from pathlib import Path

    _sglang_ready()
    from sglang.srt.configs.model_config import ModelConfig

    d = Path(tempfile.mkdtemp(prefix="step35-plan-config-"))
    (d / "config.json").write_text(cfg_json)
    json.loads(cfg_json)  # a bad config fails here, not inside SGLang
    return ModelConfig(str(d), dtype="bfloat16")


def pool_tokens(cfg: Mapping, available_bytes: int, ratio: float, *, tp: int = 1, page_size: int = 1,
                mtp_layers: int = 0) -> tuple[int, int]:  # fmt: skip
    """(full-pool tokens, SWA-pool tokens) that SGLang's ``HybridSWAPoolConfigurator`` makes of
    ``available_bytes`` of KV memory per GPU at ``ratio``, bf16 KV, for the checkpoint config ``cfg``
    (read by SGLang's ModelConfig). On a GPU SGLang's model runner hands the configurator its
    KV-cache configurator; here the attributes it reads are filled the way SGLang fills them for a
    Step-3.5 launch: layer ids and window from the ModelConfig, and for MTP a path-less EAGLE draft
    of ``num_nextn_predict_layers`` layers counted as sliding ones (spec_aux_hidden_state.py)."""
    import json

    import torch

    _sglang_ready()
    from sglang.srt.model_executor.pool_configurator import HybridSWAPoolConfigurator
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    mc = _sglang_model_config(json.dumps(dict(cfg), sort_keys=True))
    kvc = SimpleNamespace(
        kv_cache_dtype_str="auto",
        kv_cache_dtype=torch.bfloat16,
        model_config=mc,
        layer_info=SimpleNamespace(full_attention_layer_ids=mc.full_attention_layer_ids,
                                   swa_attention_layer_ids=mc.swa_attention_layer_ids),
        sliding_window_size=int(cfg["sliding_window"]),
        page_size=page_size,
        spec_algorithm=SpeculativeAlgorithm.from_string("EAGLE" if mtp_layers else None),
        spec_aux_config=SimpleNamespace(eagle_draft_num_layers=mtp_layers or None,
                                        eagle_draft_swa_num_layers=len(mc.swa_attention_layer_ids) if mtp_layers else None),
        is_draft_worker=False,
        fused_entry_bytes=lambda _kind: None,
    )  # fmt: skip
    # The configurator splits KV heads by get_parallel().attn_tp_size, which SGLang derives from the
    # built groups: one group stand-in of `tp` ranks (also where a process built a 1-rank group).
    group = SimpleNamespace(world_size=tp, rank_in_group=0, ranks=list(range(tp)), unique_name="tp",
                            cpu_group=None, device_group=None)  # fmt: skip
    # The widths too, not only the groups: a process that already published a topology (SGLang's
    # world-of-one set-up stamps tp = attn_tp = moe_tp = 1) would otherwise fail SGLang's topology
    # check (tp_size == attn_tp_size * ..., group width == configured width).
    widths = dict(tp_size=tp, attn_tp_size=tp, attn_dp_size=1, attn_cp_size=1, moe_tp_size=tp, moe_ep_size=1,
                  moe_dp_size=1)
    with _published(swa_full_tokens_ratio=ratio, tp_size=tp), \
            get_parallel().override(tp_group=group, attn_tp_group=group, **widths):  # fmt: skip
        sizes = HybridSWAPoolConfigurator(kvc).calculate_pool_sizes(int(available_bytes), page_size)
    return int(sizes.full_max_total_num_tokens), int(sizes.swa_max_total_num_tokens)

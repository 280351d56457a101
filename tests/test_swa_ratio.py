"""The planned --swa-full-tokens-ratio (sglang_step35/swa_ratio.py): never below what SGLang's
scheduler needs, the user's value wins, --enable-hierarchical-cache warned with its cost, and the
planner's pool numbers come from SGLang's own pool configurator."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest

from sglang_step35 import launch, platform, plugin, swa_ratio
from sglang_step35.config import read_config
from sglang_step35.plan import make_plan
from sglang_step35.plan_render import format_plan
from sglang_step35.plan_memory import REQUEST_TOKENS, kv_bytes_per_token

FLASH = read_config()
plugin.register()  # SGLang's pool code imports sgl_kernel: our stand-in on a GPU-less machine
HOPPER = platform.Platform("nvidia", compute_capability=(9, 0))  # the launches below name fa3 on cuda
MTP3 = dict(speculative_algorithm="EAGLE", speculative_num_steps=3, speculative_eagle_topk=1,
            speculative_num_draft_tokens=4)  # fmt: skip


@pytest.fixture
def step_log():
    """Lines the plugin's logger writes (it does not propagate to the root logger)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("sglang_step35")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def _sglang_need(window, page, requests, chunk, spec=None):
    """SGLang's compute_swa_request_cap, called here directly with its context published."""
    from sglang.srt.model_executor.pool_configurator import compute_swa_request_cap
    from sglang.srt.runtime_context import get_context

    with get_context().override_server_args(device="cpu", page_size=page, chunked_prefill_size=chunk,
                                            max_running_requests=requests, **(spec or {})):  # fmt: skip
        return compute_swa_request_cap(page_size=page, window=window, attn_dp_size=1)


@pytest.mark.parametrize("window,context,full,requests,chunk,page,spec", [
    (512, 262144, None, None, None, 1, None),  # GPU launch: the pool is sized later from memory
    (512, 262144, None, None, 8192, 1, MTP3),
    (512, 65536, 65536 * 16, 16, 8192, 1, MTP3),  # a planned deployment
    (512, 262144, 4_000_000, 64, 8192, 64, None),  # paged backend
    (16, 4096, 16384, None, 4096, 1, None),  # the CPU default budget of a tiny checkpoint
    (16, 4096, 2048, 8, 4096, 1, None),  # more need than pool: ratio 1
])  # fmt: skip
def test_planned_ratio_never_below_sglangs_need_nor_its_floor(window, context, full, requests, chunk, page, spec):
    from sglang.srt.model_executor.pool_configurator import MemoryPoolConfigurator

    plan = swa_ratio.plan_swa_ratio(window=window, context_len=context, page_size=page, full_tokens=full,
                                    max_running_requests=requests, chunked_prefill=chunk, speculative=spec)  # fmt: skip
    n = plan.requests
    # plus room for 4 cached prefix tails per running request: SGLang's --swa-prefix-tails default
    # (pool_configurator._resolve_swa_prefix_tails); one per request lost parked agent sessions' history.
    need = _sglang_need(window, page, n, plan.chunked_prefill, spec) + 4 * n * (window + page)
    assert plan.swa_tokens_needed == need
    swa_tokens = int(plan.full_tokens * plan.ratio) // page * page  # SGLang's own rounding
    MemoryPoolConfigurator.validate_swa_pool_size(swa_tokens, window, page)  # raises when too small
    if plan.ratio < 1.0:
        assert plan.ratio * plan.full_tokens >= need
        assert (plan.ratio - 0.001) * plan.full_tokens < max(need, window + 2 * page)  # the smallest such ratio
    else:
        assert need > plan.full_tokens * 0.999


def test_flash_at_full_context_holds_over_twice_the_tokens_of_sglangs_default():
    plan = swa_ratio.plan_swa_ratio(window=512, context_len=262144, chunked_prefill=8192)
    full_b, swa_b = kv_bytes_per_token(FLASH, 1, "full"), kv_bytes_per_token(FLASH, 1, "sliding")
    assert (full_b, swa_b) == (12 * 4096, 33 * 4096)  # 4 KiB per layer per token, bf16
    assert 0.05 <= plan.ratio <= 0.1
    assert plan.capacity_gain(full_b, swa_b) > 2.5


def _server_args(tmp_path, **kw):
    import json

    (tmp_path / "config.json").write_text(json.dumps(FLASH))
    base = dict(model_path=str(tmp_path), device="cuda", attention_backend="fa3", tp_size=4, ep_size=4, pp_size=1,
                moe_runner_backend=None, moe_a2a_backend=None, quantization=None, max_total_tokens=None,
                swa_full_tokens_ratio=None, enable_hierarchical_cache=False, disable_hybrid_swa_memory=False)  # fmt: skip
    base.update(kw)
    return SimpleNamespace(**base)


def test_launch_policy_sets_the_ratio_with_one_log_line(tmp_path, monkeypatch, step_log):
    monkeypatch.setattr(platform, "forced", HOPPER)
    args = _server_args(tmp_path, chunked_prefill_size=8192)
    launch.apply_server_policy(args)
    expected = swa_ratio.plan_swa_ratio(window=512, context_len=262144, chunked_prefill=8192)
    assert args.swa_full_tokens_ratio == expected.ratio < 0.8
    lines = [m for m in step_log if "--swa-full-tokens-ratio" in m]
    assert len(lines) == 1
    assert f"--swa-full-tokens-ratio {expected.ratio:.3f} planned" in lines[0]
    gain = expected.capacity_gain(12 * 4096 // 4, 33 * 4096 // 4)
    assert f"{gain:.2f}x the KV tokens of SGLang's default 0.8" in lines[0]


def test_the_users_ratio_wins(tmp_path, monkeypatch, step_log):
    monkeypatch.setattr(platform, "forced", HOPPER)
    args = _server_args(tmp_path, swa_full_tokens_ratio=0.5)
    launch.apply_server_policy(args)
    assert args.swa_full_tokens_ratio == 0.5
    assert not [m for m in step_log if "--swa-full-tokens-ratio" in m]


def test_hierarchical_cache_is_accepted_with_its_cost_named(tmp_path, monkeypatch, step_log):
    monkeypatch.setattr(platform, "forced", HOPPER)
    args = _server_args(tmp_path, enable_hierarchical_cache=True, chunked_prefill_size=8192)
    launch.apply_server_policy(args)
    assert args.swa_full_tokens_ratio is None  # SGLang's Step override sets 1.0 and drops the hybrid pool
    warned = [m for m in step_log if "--enable-hierarchical-cache" in m]
    assert len(warned) == 1
    planned = swa_ratio.plan_swa_ratio(window=512, context_len=262144, chunked_prefill=8192).ratio
    full_b, swa_b = 12 * 1024, 33 * 1024  # per GPU at TP 4
    assert "all 33 sliding layers keep every token" in warned[0]
    assert f"{(full_b + swa_b) / 1024:.1f} KiB of GPU KV per token instead of {(full_b + planned * swa_b) / 1024:.1f}" in warned[0]
    assert f"{(full_b + swa_b) / (full_b + planned * swa_b):.2f}x fewer tokens" in warned[0]


def test_sglang_turns_the_hybrid_pool_off_for_step_under_hierarchical_cache():
    """What the warning above describes: SGLang's own Step-3.5 override (arg_groups/overrides.py)."""
    from sglang.srt.arg_groups.overrides import _step3p_overrides

    out = _step3p_overrides(SimpleNamespace(enable_hierarchical_cache=True, speculative_algorithm=None,
                                            attention_backend="fa3"), None)  # fmt: skip
    assert out["swa_full_tokens_ratio"] == 1.0 and out["disable_hybrid_swa_memory"] is True


# ---------------------------------------------------------------- step35 plan


@pytest.mark.parametrize("gpu,n,quant,mtp", [("h200", 4, "fp8", 3), ("h100", 8, "bf16", 0)])
def test_plan_prints_sglangs_pool_tokens_at_default_and_planned_ratio(gpu, n, quant, mtp):
    p = make_plan(gpu, n, quant, mtp=mtp)
    assert p.feasible
    k = p.kv_pool
    assert k["available_bytes"] == p.memory["static_pool"] - p.memory["weights_total"] - p.memory["buffers_total"]
    d, pl = k["sglang_default"], k["planned"]
    assert (d["swa_full_tokens_ratio"], pl["swa_full_tokens_ratio"]) == (0.8, p.swa_full_tokens_ratio)
    # SGLang's configurator against the config's own bytes per token: the full pool is the most
    # tokens whose full + ratio x sliding (+ MTP draft layers, sized as sliding ones) KV fits.
    full_b, swa_b = kv_bytes_per_token(FLASH, p.tp, "full"), kv_bytes_per_token(FLASH, p.tp, "sliding")
    draft_b = mtp * swa_b // 33
    for r in (d, pl):
        cell = full_b + r["swa_full_tokens_ratio"] * (swa_b + draft_b)
        assert r["full_tokens"] == int(k["available_bytes"] // cell)
        assert r["swa_tokens"] == int(r["full_tokens"] * r["swa_full_tokens_ratio"])
        assert r["requests"] == r["full_tokens"] // REQUEST_TOKENS
    assert pl["full_tokens"] > 2.5 * d["full_tokens"]
    assert pl["requests"] >= p.concurrency  # the planned command's requests fit SGLang's pool
    text = format_plan(p)
    for r, label in ((d, "SGLang's default"), (pl, "planned")):
        assert (f"--swa-full-tokens-ratio {r['swa_full_tokens_ratio']:.3f} ({label}): {r['full_tokens']:,} full-pool "
                f"tokens, {r['swa_tokens']:,} SWA tokens = {r['requests']} requests of 256K tokens") in text
    assert f"--swa-full-tokens-ratio {p.swa_full_tokens_ratio:.3f}" in " ".join(p.command)


def test_planned_command_ratio_covers_sglangs_need_for_its_requests():
    p = make_plan("h200", 8, "fp8", mtp=3, context=65536, concurrency=16)
    need = _sglang_need(512, 1, 16, 8192, MTP3) + 4 * 16 * (512 + 1)  # 4 prefix tails per request
    assert p.swa_full_tokens_ratio * 65536 * 16 >= need
    assert math.isclose(p.swa_full_tokens_ratio, math.ceil(need / (65536 * 16) * 1000) / 1000)


def test_mtp_flags_left_to_sglang_are_planned_as_the_checkpoints_mtp_chain(tmp_path, monkeypatch, step_log):
    monkeypatch.setattr(platform, "forced", HOPPER)
    args = _server_args(tmp_path, chunked_prefill_size=8192, speculative_algorithm="EAGLE", speculative_num_steps=None,
                        speculative_eagle_topk=None, speculative_num_draft_tokens=None)  # fmt: skip
    monkeypatch.setattr("sglang_step35.mtp_check.check_mtp_request", lambda *a, **k: None)  # no weights here
    launch.apply_server_policy(args)
    expected = swa_ratio.plan_swa_ratio(window=512, context_len=262144, chunked_prefill=8192, speculative=MTP3)
    assert args.swa_full_tokens_ratio == expected.ratio


def test_flags_sglang_cannot_size_leave_its_default_with_a_warning(tmp_path, monkeypatch, step_log):
    monkeypatch.setattr(platform, "forced", HOPPER)
    args = _server_args(tmp_path, chunked_prefill_size=8192, speculative_algorithm="NGRAM", speculative_num_steps=None,
                        speculative_eagle_topk=None, speculative_num_draft_tokens=None)  # fmt: skip
    monkeypatch.setattr("sglang_step35.mtp_check.check_mtp_request", lambda *a, **k: None)
    launch.apply_server_policy(args)
    assert args.swa_full_tokens_ratio is None
    warned = [m for m in step_log if "--swa-full-tokens-ratio not planned" in m]
    assert len(warned) == 1 and "SGLang's default 0.8 stays" in warned[0]

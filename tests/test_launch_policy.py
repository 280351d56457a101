"""The launch policy (sglang_step35.launch): the ordered step list SGLang runs before resolving its
server arguments, each step's decision on its own, and the whole list on faked platforms (one
`platform.forced` assignment fakes the platform for every step)."""

import os
from types import SimpleNamespace

import pytest

from sglang_step35 import launch, platform
from sglang_step35.launch import policy
from sglang_step35.launch.policy import Launch, apply_server_policy
from sglang_step35.platform import Platform
from sglang_step35.platform.cpu import cpu_server_defaults

CPU = Platform("cpu")
H100 = Platform("nvidia", compute_capability=(9, 0))
MI300X = Platform("amd", gcn_arch="gfx942", aiter_available=True)


def test_cpu_defaults_fill_only_what_the_user_left_unset():
    args = SimpleNamespace(device=None, attention_backend=None, max_total_tokens=None, sleep_on_idle=False)
    cpu_server_defaults(args)
    assert (args.device, args.attention_backend, args.max_total_tokens) == ("cpu", "torch_native", 16384)
    assert args.sleep_on_idle
    user = SimpleNamespace(device="cpu", attention_backend="triton", max_total_tokens=4096)
    cpu_server_defaults(user)
    assert (user.attention_backend, user.max_total_tokens) == ("triton", 4096)


def _step_args(tmp_path, **kw):
    import json as _json

    from sglang_step35.config import read_config

    cfg = read_config()  # Step-3.5-Flash
    (tmp_path / "config.json").write_text(_json.dumps(cfg))
    base = dict(model_path=str(tmp_path), device=None, attention_backend=None, max_total_tokens=None,
                tp_size=4, ep_size=1, moe_runner_backend=None, moe_a2a_backend=None, quantization=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cpu_defaults_reach_step_models_only(tmp_path, monkeypatch):
    """On a GPU-less host another model keeps SGLang's own defaults (the CPU engine register()
    installs is all it needs); a Step-3.5 launch gets ours."""
    monkeypatch.setattr(platform, "forced", CPU)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "unset-by-test")  # restored (removed) afterwards
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    unset = dict(device=None, attention_backend=None, max_total_tokens=None, sleep_on_idle=False, tp_size=2, pp_size=1)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    other = SimpleNamespace(model_path=str(llama), **unset)
    apply_server_policy(other)
    assert vars(other) == dict(model_path=str(llama), **unset)
    assert "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ
    (tmp_path / "step").mkdir()
    step = _step_args(tmp_path / "step", **unset)
    apply_server_policy(step)
    assert (step.device, step.attention_backend, step.max_total_tokens, step.sleep_on_idle) == (
        "cpu", "torch_native", 16384, True)
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"


def test_server_policy_on_amd_picks_aiter_and_switches_tp4_to_ep4(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "forced", MI300X)
    monkeypatch.setenv("SGLANG_USE_AITER_UNIFIED_ATTN", "unset-by-test")  # restored (removed) afterwards
    monkeypatch.delenv("SGLANG_USE_AITER_UNIFIED_ATTN")
    args = _step_args(tmp_path)
    apply_server_policy(args)
    assert args.attention_backend == "aiter"
    assert os.environ.get("SGLANG_USE_AITER_UNIFIED_ATTN") == "1"
    assert args.ep_size == 4  # N=320 per GPU is not runnable by AITER; whole experts per GPU are


def test_server_policy_refuses_a_backend_that_ignores_sliding_windows(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(platform, "forced", H100)
    with pytest.raises(ValueError, match="flex_attention"):
        apply_server_policy(_step_args(tmp_path, attention_backend="flex_attention", ep_size=4))
    args = _step_args(tmp_path, ep_size=4)
    apply_server_policy(args)
    assert args.attention_backend == "fa3" and args.ep_size == 4


def test_server_policy_leaves_other_models_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "forced", H100)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    args = SimpleNamespace(model_path=str(tmp_path), attention_backend=None, tp_size=4, ep_size=1)
    apply_server_policy(args)
    assert args.attention_backend is None and args.ep_size == 1


def test_server_policy_refuses_prefill_and_decode_backends_of_different_window_conventions(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(platform, "forced", MI300X)
    mixed = _step_args(tmp_path, ep_size=4, prefill_attention_backend="aiter", decode_attention_backend="triton")
    with pytest.raises(ValueError, match="--prefill-attention-backend aiter and --decode-attention-backend triton"):
        apply_server_policy(mixed)
    same = _step_args(tmp_path, ep_size=4, prefill_attention_backend="triton", decode_attention_backend="triton")
    apply_server_policy(same)


def test_server_policy_refuses_pipeline_parallel_with_mtp_and_binds_cores_per_stage(tmp_path, monkeypatch):
    import pytest

    monkeypatch.setattr(platform, "forced", CPU)
    # setenv first so that the value the policy writes is removed again afterwards (delenv of an
    # absent variable records nothing to restore): later servers in this process must not inherit it.
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "unset-by-test")
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    bad = _step_args(tmp_path, tp_size=1, pp_size=2, speculative_algorithm="EAGLE", speculative_num_steps=3)
    with pytest.raises(ValueError, match="--pp-size 2 with --speculative-algorithm EAGLE"):
        apply_server_policy(bad)
    ok = _step_args(tmp_path, tp_size=1, pp_size=2)
    apply_server_policy(ok)
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"  # one share per pipeline stage


# --- the step list ----------------------------------------------------------------------------------
def test_steps_run_in_the_documented_order():
    assert [s.__name__ for s in policy.STEPS] == [
        "read_config", "pipeline_parallel", "mtp", "platform_defaults", "attention", "served_combinations",
        "moe_layout", "swa_ratio"]
    assert launch.STEPS is policy.STEPS


def test_mtp_before_platform_defaults_keeps_intel_amx_for_mtp_on_cpu(tmp_path, monkeypatch):
    """The order decides a field: the MTP step picks intel_amx (SGLang's EAGLE draft refuses torch_native),
    the CPU defaults after it fill only what is still unset."""
    monkeypatch.setattr(platform, "forced", CPU)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0")  # keep the binding out of this test
    monkeypatch.setattr("sglang_step35.mtp_check.check_mtp_request", lambda *a, **k: None)  # no weights here
    args = _step_args(tmp_path, tp_size=1, ep_size=1, speculative_algorithm="EAGLE", speculative_num_steps=3)
    apply_server_policy(args)
    assert (args.attention_backend, args.device, args.max_total_tokens) == ("intel_amx", "cpu", 16384)


def test_every_step_after_read_config_is_for_step_checkpoints_only(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(policy, "STEPS", (policy.read_config, lambda launch: ran.append(launch)))
    (tmp_path / "config.json").write_text('{"model_type": "qwen3"}')
    apply_server_policy(SimpleNamespace(model_path=str(tmp_path), tp_size=1))
    assert ran == []
    step = tmp_path / "step"
    step.mkdir()
    apply_server_policy(_step_args(step))
    assert len(ran) == 1 and ran[0].cfg["model_type"] == "step3p5"


def test_resolved_server_args_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(platform, "forced", H100)
    args = _step_args(tmp_path, attention_backend="flex_attention", _resolution_finished=True)
    apply_server_policy(args)  # SGLang resolves once; a second pass must not re-decide (nor refuse)
    assert args.attention_backend == "flex_attention"


# --- each step on its own ---------------------------------------------------------------------------
def _launch(tmp_path, platform_=H100, **kw):
    launch_ = Launch(_step_args(tmp_path, **kw), platform=platform_)
    policy.read_config(launch_)
    return launch_


def test_read_config_refuses_a_malformed_step_config_by_key(tmp_path):
    import json

    from sglang_step35.config import read_config

    cfg = read_config()
    cfg["layer_types"] = cfg["layer_types"][:3]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config key 'layer_types' has 3 entries but num_hidden_layers is 45"):
        policy.read_config(Launch(SimpleNamespace(model_path=str(tmp_path), tp_size=1), platform=H100))


def test_pipeline_parallel_step_refuses_a_partition_that_counts_the_mtp_layers(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", "24,24")  # 45 main + 3 MTP layers
    with pytest.raises(ValueError, match="do not count them.*SGLANG_PP_LAYER_PARTITION=22,23"):
        policy.pipeline_parallel(_launch(tmp_path, tp_size=1, pp_size=2))
    monkeypatch.setenv("SGLANG_PP_LAYER_PARTITION", "22,23")
    policy.pipeline_parallel(_launch(tmp_path, tp_size=1, pp_size=2))


def test_mtp_step_refuses_more_steps_than_mtp_layers(tmp_path):
    with pytest.raises(ValueError, match="--speculative-num-steps 5 needs 5 MTP layers, but the checkpoint has 3"):
        policy.mtp(_launch(tmp_path, speculative_algorithm="EAGLE", speculative_num_steps=5))


def test_mtp_step_picks_intel_amx_on_cpu_only(tmp_path, monkeypatch):
    monkeypatch.setattr("sglang_step35.mtp_check.check_mtp_request", lambda *a, **k: None)
    on_cpu = _launch(tmp_path, CPU, speculative_algorithm="EAGLE", speculative_num_steps=3)
    policy.mtp(on_cpu)
    on_gpu = _launch(tmp_path, H100, speculative_algorithm="EAGLE", speculative_num_steps=3)
    policy.mtp(on_gpu)
    assert (on_cpu.server_args.attention_backend, on_gpu.server_args.attention_backend) == ("intel_amx", None)


def test_platform_defaults_step_fills_cpu_defaults_on_cpu_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0")
    on_gpu = _launch(tmp_path, H100)
    policy.platform_defaults(on_gpu)
    assert (on_gpu.server_args.device, on_gpu.server_args.max_total_tokens) == (None, None)
    on_cpu = _launch(tmp_path, CPU, sleep_on_idle=False)
    policy.platform_defaults(on_cpu)
    assert (on_cpu.server_args.device, on_cpu.server_args.attention_backend, on_cpu.server_args.sleep_on_idle) == (
        "cpu", "torch_native", True)


def test_attention_step_picks_per_platform_and_refuses_window_ignoring_backends_on_cpu_too(tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_USE_AITER_UNIFIED_ATTN", "unset-by-test")
    monkeypatch.delenv("SGLANG_USE_AITER_UNIFIED_ATTN")
    hopper, amd = _launch(tmp_path, H100), _launch(tmp_path, MI300X)
    policy.attention(hopper)
    policy.attention(amd)
    assert (hopper.server_args.attention_backend, amd.server_args.attention_backend) == ("fa3", "aiter")
    assert os.environ["SGLANG_USE_AITER_UNIFIED_ATTN"] == "1"
    with pytest.raises(ValueError, match="attention backend 'flex_attention': no known sliding-window convention"):
        policy.attention(_launch(tmp_path, CPU, attention_backend="flex_attention"))


def test_served_combinations_step_refuses_a_draft_backend_that_ignores_the_window(tmp_path):
    launch_ = _launch(tmp_path, MI300X, speculative_algorithm="EAGLE", speculative_draft_attention_backend="wave")
    with pytest.raises(ValueError, match="--speculative-draft-attention-backend wave cannot serve .* aiter, triton"):
        policy.served_combinations(launch_)


def test_moe_layout_step_switches_to_ep_or_refuses(tmp_path):
    amd = _launch(tmp_path, MI300X, tp_size=4, ep_size=1)
    policy.moe_layout(amd)
    assert amd.server_args.ep_size == 4  # N=320 per GPU is not runnable by AITER; whole experts are
    with pytest.raises(ValueError, match="--enable-dp-attention"):
        policy.moe_layout(_launch(tmp_path, H100, tp_size=4, ep_size=4, enable_dp_attention=True))


def test_swa_ratio_step_plans_the_ratio_the_user_left_unset(tmp_path):
    from sglang_step35 import swa_ratio

    launch_ = _launch(tmp_path, H100, ep_size=4, pp_size=1, device="cuda", attention_backend="fa3",
                      swa_full_tokens_ratio=None, chunked_prefill_size=8192, enable_hierarchical_cache=False,
                      disable_hybrid_swa_memory=False)
    policy.swa_ratio(launch_)
    expected = swa_ratio.plan_swa_ratio(window=512, context_len=262144, chunked_prefill=8192)
    assert launch_.server_args.swa_full_tokens_ratio == expected.ratio < 0.8


@pytest.mark.parametrize("value", ["yes", "Y"])
def test_platform_defaults_step_refuses_an_aiter_value_sglang_reads_two_ways(tmp_path, monkeypatch, value):
    """SGLang's fp8.py reads SGLANG_USE_AITER=yes as on (EnvBool), unquant.py and the model as off: FP8
    experts would go to AITER and lose the clamp. Refused on AMD, by name; 1 / 0 and other hosts pass."""
    from sglang.srt.environ import envs
    from sglang.srt.utils.common import get_bool_env_var

    monkeypatch.setenv("SGLANG_USE_AITER", value)
    assert envs.SGLANG_USE_AITER.get() and not get_bool_env_var("SGLANG_USE_AITER")  # SGLang's two readings
    with pytest.raises(ValueError, match=rf"SGLANG_USE_AITER={value}: SGLang 0.5.23 reads this value as on .* "
                                         r"Use SGLANG_USE_AITER=1 \(AITER\) or SGLANG_USE_AITER=0"):
        policy.platform_defaults(_launch(tmp_path, MI300X))
    policy.platform_defaults(_launch(tmp_path, H100))  # not read off ROCm
    for ok in ("1", "0", "true"):
        monkeypatch.setenv("SGLANG_USE_AITER", ok)
        policy.platform_defaults(_launch(tmp_path, MI300X))

"""The MoE part of the allow-list (`sglang_step35.served`) against what SGLang 0.5.23 accepts.

For every `--moe-runner-backend` value SGLang accepts (its CLI choices and its MoeRunnerBackend enum,
read from SGLang, so a value it adds fails here until a row judges it), and for EPLB's flags: either
the Step model is built as on a GPU and routes with Step's sigmoid + bias router and SwiGLU clamp
through the runner's contract (SGLang's Triton fused MoE under TRITON_INTERPRET=1, as
tests/test_moe_gpu_contract.py runs it, against the plain-PyTorch reference), or the launch policy
(`launch.apply_server_policy` on a real `ServerArgs`, platform faked) and the model construction (SGLang's
published runtime values) both refuse it by name.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpu_contract
from reference import Step35Reference
from sglang_step35 import served
from sglang_step35.tiny import TinySpec, write_tiny_checkpoint
from sglang_step35.config import read_config

TOL = dict(atol=2e-3, rtol=2e-3)  # as tests/test_moe_gpu_contract.py (Triton's accumulation order)
FLASH = read_config()  # Step-3.5-Flash
RUNNERS = served.sglang_moe_runner_backends()
PLATFORM_OF = {"nvidia": "cuda", "amd": "rocm", "cpu": "cpu"}


def _runner_row(value: str, platform: str, aiter: bool = False):
    return served.match(served.RUNNER, served.Setting(platform, value, aiter=aiter, clamped_layers=(43, 44)))


SERVED_ON_GPUS = [(v, p) for v in RUNNERS for p in served.GPUS if (row := _runner_row(v, p)) is not None and row.served]
REFUSED = [v for v in RUNNERS if not any(_runner_row(v, p) and _runner_row(v, p).served for p in served.PLATFORMS)]


def test_every_value_sglang_accepts_has_a_row_on_every_platform():
    """The table judges each value explicitly (served or refused with a reason), on every platform;
    the enumeration really is SGLang's (the values the issue names are among them)."""
    assert {"auto", "triton", "triton_kernel", "deep_gemm", "aiter", "flashinfer_trtllm", "flashinfer_cutlass",
            "cutlass", "marlin"} <= set(RUNNERS)
    for value in RUNNERS:
        for platform in served.PLATFORMS:
            assert _runner_row(value, platform) is not None, f"--moe-runner-backend {value} on {platform}: no row"
    assert set(REFUSED) == set(RUNNERS) - {"auto", "triton"}


def test_every_row_names_a_test_that_exists():
    """A served cell names the test that verifies it; that test (file, and function where named) exists."""
    root = Path(__file__).parent.parent
    for row in served.ROWS:
        for ref in re.findall(r"tests/[\w/]+\.py(?:::\w+)?", row.test):
            path, _, name = ref.partition("::")
            assert (root / path).is_file(), f"{row.flag} {row.values}: {path} missing"
            if name:
                assert f"def {name}(" in (root / path).read_text(), f"{row.flag} {row.values}: {ref} missing"
        assert row.served or row.instead, f"{row.flag} {row.values}: a refusal must say what to use instead"


# ------------------------------------------------------------------------------------------ launch


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("served-moe"), seed=3)


@pytest.fixture(scope="module")
def launch_ckpts(ckpt, aiter_ckpt):
    # AMD: AITER's CK MoE tiles the expert width; the tiny default (32) is refused there by the layout rule.
    return {"nvidia": ckpt, "amd": aiter_ckpt}


def _launch(ckpts, monkeypatch, platform: str, **flags):
    """`launch.apply_server_policy` (the hook SGLang runs before resolving its arguments) on a real
    ServerArgs, on a faked `platform` ("nvidia"/"amd"; AITER importable on AMD)."""
    from sglang.srt.server_args import ServerArgs

    import sglang_step35.platform as platform_mod
    from sglang_step35 import launch
    from sglang_step35.platform import Platform

    info = {"nvidia": Platform("nvidia", compute_capability=(9, 0)),
            "amd": Platform("amd", gcn_arch="gfx942", aiter_available=True)}[platform]
    monkeypatch.setattr(platform_mod, "forced", info)
    for k in ("SGLANG_USE_AITER_UNIFIED_ATTN",):
        monkeypatch.setenv(k, "1")
    args = ServerArgs(model_path=str(ckpts[platform]), **flags)
    launch.apply_server_policy(args)
    return args


@pytest.mark.parametrize("value", REFUSED)
def test_refused_runner_backend_is_refused_at_launch_and_construction(value, launch_ckpts, monkeypatch, built_with):
    """Launch: the policy stops `sglang serve` with the flag, the value and the command to use.
    Construction (Engine(...) skips the CLI): building the model under SGLang's resolved runner
    fails with the same refusal; a value SGLang itself cannot resolve never reaches a model."""
    for platform in served.GPUS:
        with pytest.raises(ValueError, match=rf"--moe-runner-backend {value}\b.*relaunch without --moe-runner-backend"):
            _launch(launch_ckpts, monkeypatch, platform, moe_runner_backend=value)
    from sglang.srt.layers.moe.utils import MoeRunnerBackend

    if value not in {b.value for b in MoeRunnerBackend}:
        from sglang.srt.layers.moe.utils import resolve_moe_runner_backend

        with pytest.raises(ValueError, match="neither built in nor registered"):
            resolve_moe_runner_backend(value)
        return
    for device in ("cuda", "rocm", "cpu"):
        with pytest.raises(served.NotServedError, match=rf"--moe-runner-backend {value}\b.*\(use "):
            built_with(device, moe_runner_backend=value)


def test_served_runner_backends_pass_the_launch_policy(launch_ckpts, monkeypatch):
    for value, platform in SERVED_ON_GPUS:
        _launch(launch_ckpts, monkeypatch, platform, moe_runner_backend=value)


@pytest.mark.parametrize(
    "flags,needle",
    [
        ({"ep_num_redundant_experts": 2}, r"--ep-num-redundant-experts 2 .*moe_num_experts \+ N physical slots"),
        ({"enable_eplb": True}, r"--enable-eplb on .*routed_experts_weights_of_layer"),
        ({"init_expert_location": "/tmp/experts.json"}, r"--init-expert-location /tmp/experts.json .*physical slots"),
    ],
    ids=["redundant-experts", "enable-eplb", "init-expert-location"],
)
def test_eplb_is_refused_at_launch_and_construction(flags, needle, launch_ckpts, monkeypatch, built_with):
    flag = "--" + next(iter(flags)).replace("_", "-")
    for platform in served.GPUS:
        with pytest.raises(ValueError, match=needle + rf".*relaunch without {flag}"):
            _launch(launch_ckpts, monkeypatch, platform, tp_size=1, **flags)
    for device in ("cuda", "cpu"):
        with pytest.raises(served.NotServedError, match=needle):
            built_with(device, **flags)


def test_unverified_quantizations_are_refused_at_launch_and_construction(launch_ckpts, monkeypatch, tmp_path):
    """Online `--quantization fp8` of BF16 weights is SGLang's per-tensor FP8 (Fp8Config without
    weight_block_size): no test verifies Step's router and clamp through it, so it is refused by name
    at launch and when the model is built (Engine(...)), while the block-FP8 checkpoint (its own
    quantization_config) stays served. AWQ/GPTQ int4 is served only on SGLang's MoeWNA16 (Triton)
    method (tests/test_quant_w4a16_load.py): without --quantization moe_wna16 it is refused."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from sglang_step35.moe.policy import routed_plan
    from sglang_step35.moe.quant import quant_spec_of

    for platform in served.GPUS:
        with pytest.raises(ValueError, match=r"fp8-per-tensor experts no test verifies .*without --quantization"):
            _launch(launch_ckpts, monkeypatch, platform, tp_size=1, quantization="fp8")
    int4 = tmp_path / "int4"
    shutil.copytree(launch_ckpts["nvidia"], int4)
    cfg = json.loads((int4 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    (int4 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"int4 experts without --quantization moe_wna16 .*Marlin"):
        _launch({"nvidia": int4}, monkeypatch, "nvidia", tp_size=1)
    block = Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=[128, 128])
    online = Fp8Config(is_checkpoint_fp8_serialized=False)
    for device in ("cuda", "rocm"):
        assert routed_plan(7.0, device=device, ep_size=1, aiter=False, quant=quant_spec_of(block), layer_id=44)
        with pytest.raises(served.NotServedError, match=r"fp8-per-tensor experts no test verifies"):
            routed_plan(7.0, device=device, ep_size=1, aiter=False, quant=quant_spec_of(online), layer_id=44)
    # SGLang's MoeWNA16Config needs a CUDA capability to be built; its name is what quant_spec_of reads.
    # (On ROCm SGLang refuses moe_wna16 itself: tests/test_quant_w4a16_load.py.)
    assert routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant="moe_wna16", layer_id=44)
    with pytest.raises(served.NotServedError, match=r"int4 experts without --quantization moe_wna16"):
        routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant="gptq_marlin", layer_id=44)


def test_a2a_rows():
    """The all-to-all rows that moved here from moe.policy.a2a_refusal, on the vendor that lacks each."""
    amd = served.refusal(served.A2A, served.Setting("amd", moe_a2a_backend="deepep"))
    assert amd.startswith("--moe-a2a-backend deepep does not run on amd GPUs (use mori)")
    assert served.refusal(served.A2A, served.Setting("amd", moe_a2a_backend="mori")) is None
    why = served.refusal(served.A2A, served.Setting("nvidia", moe_a2a_backend="pplx"))
    assert "pplx is not supported by sglang-step35 on nvidia (served there: none, deepep)" in why


# ------------------------------------------------------------------------------------ construction


@pytest.fixture(scope="module")
def sglang_gpu_path():
    with gpu_contract.sglang_gpu_moe_path() as mp:
        yield mp


@pytest.fixture()
def built_with(sglang_gpu_path, ckpt, monkeypatch):
    """build(device, **server_args): our Step3p5ForCausalLM built as on `device`, fp32, checkpoint
    loaded, with SGLang's runtime holding `server_args` (published as a server publishes them, and
    the MoE runner flags as SGLang's initialize_moe_config sets them)."""

    def build(device: str, ckpt_dir=None, aiter: bool = False, **server_args):
        from sglang.srt.layers.moe.utils import get_flags, initialize_moe_config
        from sglang.srt.runtime_context import get_context

        import sglang_step35.models.step3p5 as model_mod
        from sglang_step35.config import Step35Config

        ckpt_dir = ckpt_dir or ckpt
        gpu_contract.fake_platform_probe(monkeypatch, device, aiter)
        flags = get_flags().moe
        for name in ("runner_backend", "a2a_backend", "speculative_runner_backend", "speculative_a2a_backend"):
            monkeypatch.setattr(flags, name, getattr(flags, name))  # restored after the test
        cfg = Step35Config(**json.loads((ckpt_dir / "config.json").read_text()))
        with contextlib.ExitStack() as stack:
            override = get_context().override_server_args(device="cpu", **server_args)
            override.install()
            stack.callback(override.restore)
            initialize_moe_config()
            old = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
            stack.callback(torch.set_default_dtype, old)
            model = model_mod.Step3p5ForCausalLM(cfg)
        raw = load_file(str(ckpt_dir / "model.safetensors"))
        model.load_weights((k, v.float() if v.dtype == torch.bfloat16 else v) for k, v in raw.items())
        return model, cfg

    return build


def _moe_layers(model):
    return [(i, layer.moe) for i, layer in enumerate(model.model.layers) if layer.is_moe]


@pytest.fixture(scope="module")
def aiter_ckpt(tmp_path_factory):
    # 128-aligned experts: AITER's CK MoE would take them under `auto` (SGLang skips it otherwise).
    return write_tiny_checkpoint(tmp_path_factory.mktemp("served-moe-aiter"), seed=4,
                                 spec=TinySpec(moe_intermediate_size=128))


@pytest.mark.parametrize("value,platform", SERVED_ON_GPUS, ids=[f"{v}-{p}" for v, p in SERVED_ON_GPUS])
def test_served_runner_backend_routes_with_step_router_and_clamp(value, platform, built_with, ckpt, aiter_ckpt,
                                                                 monkeypatch):
    """Built under SGLang's runner `value` (on AMD with SGLANG_USE_AITER=1, AITER's layout and runner
    faked as in test_moe_gpu_contract): every MoE layer's TopK calls our router with the STANDARD
    output, clamped layers carry the clamp into FusedMoE, and through SGLang's CUDA dispatch and
    Triton kernels every layer equals the reference; on the clamped layer the unclamped reference is
    far off, so the clamp is computed."""
    from sglang.srt.layers.moe.topk import TopKOutputFormat
    from sglang.srt.layers.quantization import unquant

    aiter = platform == "amd"
    ckpt_dir = aiter_ckpt if aiter else ckpt
    if aiter:
        monkeypatch.setattr(unquant, "_use_aiter", True)
        monkeypatch.setattr(unquant, "shuffle_weight", gpu_contract.aiter_shuffle_weight, raising=False)
        monkeypatch.setattr(unquant, "is_gfx95_supported", lambda: False)
        monkeypatch.setattr(unquant, "tgemm", gpu_contract.AiterDenseGemm(), raising=False)
    model, cfg = built_with(PLATFORM_OF[platform], ckpt_dir=ckpt_dir, aiter=aiter, moe_runner_backend=value)
    ref, unclamped_ref = Step35Reference(ckpt_dir), Step35Reference(ckpt_dir, routed_clamp=False)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(7))
    clamped_seen = False
    for i, moe in _moe_layers(model):
        assert moe.topk.topk_config.output_format is TopKOutputFormat.STANDARD, f"layer {i}"
        assert moe.topk.topk_config.custom_routing_function == moe._route, f"layer {i}: not Step's router"
        limit = cfg.swiglu_limits[i]
        assert moe.experts.moe_runner_config.gemm1_clamp_limit == (limit if limit > 0 else None)
        qm = moe.experts.quant_method
        before = moe.experts.w13_weight.detach().clone()
        qm.process_weights_after_loading(moe.experts)  # what SGLang's loader runs after loading
        on_aiter = getattr(qm, "_aiter_runner", None) is not None
        # Under explicit triton, or on a clamped layer, no AITER: Triton's layout and runner.
        assert on_aiter is (aiter and value == "auto" and limit == 0), f"layer {i}"
        assert torch.equal(moe.experts.w13_weight, before) is not on_aiter
        if on_aiter:
            continue  # AITER's own kernel: not runnable here (its routing input is checked above)
        assert qm.runner.runner_backend.is_triton(), f"layer {i}: {qm.runner.runner_backend}"
        moe.topk._forward_method = moe.topk.forward_cuda
        qm._forward_method = qm.forward_cuda
        out = moe(x.clone())
        torch.testing.assert_close(out, ref.moe(i, x.clone()), **TOL, msg=lambda m: f"layer {i}: {m}")
        if limit > 0:  # inputs large enough that the clamp bites
            clamped_seen = True
            out = moe(4.0 * x)
            torch.testing.assert_close(out, ref.moe(i, 4.0 * x), **TOL)
            assert (unclamped_ref.moe(i, 4.0 * x) - out).abs().max() > 50 * TOL["atol"]
    assert clamped_seen


def test_correctness_doc_renders_the_allow_list():
    """docs/correctness.md's "Served combinations" section is exactly what scripts/gen_served_docs.py
    renders from the allow-list (and the attention / PP rules it reads): the doc cannot drift."""
    import importlib.util

    root = Path(__file__).parent.parent
    spec = importlib.util.spec_from_file_location("gen_served_docs", root / "scripts" / "gen_served_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    doc = (root / "docs" / "correctness.md").read_text()
    assert gen.BEGIN in doc and gen.END in doc, "run scripts/gen_served_docs.py"
    assert doc == gen.render(doc), "docs/correctness.md is stale: run scripts/gen_served_docs.py"
    section = gen.render_section()
    for value in served.sglang_moe_runner_backends():
        assert f"`{value}`" in section.split("#### `--moe-a2a-backend`")[0], value

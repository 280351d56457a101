"""The Step-3.5 MoE layer on SGLang 0.5.23's *GPU* code path, checked on CPU through that path's contract.

SGLang's CPU engine takes other branches than a GPU (TopK.forward_native, moe_forward_native), which
is how a TopK never bound to its runner, an in-place fused MoE overwriting the shared expert's
input and a host-syncing expert loop all stayed invisible. Here the model is built as on a GPU
(platform faked for our runner policy: `sglang_step35.moe.policy`), its MoE layers dispatch like
CUDA (`forward_cuda` of SGLang's TopK and MoE method) and SGLang's own Triton fused-MoE kernels run
on CPU tensors under TRITON_INTERPRET=1 (tests/gpu_contract.py supplies the CUDA-only helpers).

Oracle: the plain-PyTorch reference (tests/reference), fp32 weights and activations. Tolerance for
the Triton path: 2e-3 absolute + relative (measured ~5e-4 on |out| <= 1.7: the kernel's block-wise
fp32 accumulation order differs from the reference's matmuls).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from reference import Step35Reference
from sglang_step35.tiny import TinySpec, write_tiny_checkpoint

import gpu_contract

TOL = dict(atol=2e-3, rtol=2e-3)


@pytest.fixture(scope="module")
def sglang_gpu_path():
    """World-size-1 SGLang process state plus what SGLang's GPU MoE path needs on CPU tensors."""
    with gpu_contract.sglang_gpu_moe_path(
        extra_kernels=[("kernels_cuda.swiglu_clamp", "_swiglu_clamp_kernel")]
    ):
        yield


def _build(ckpt, mp: pytest.MonkeyPatch, device: str, aiter: bool = False):
    """Step3p5ForCausalLM built as on `device` ("cuda"/"rocm"/"cpu"), fp32, checkpoint loaded."""
    import sglang_step35.models.step3p5 as model_mod
    from sglang_step35.config import Step35Config

    gpu_contract.fake_platform_probe(mp, device, aiter)
    cfg = Step35Config(**json.loads((ckpt / "config.json").read_text()))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = model_mod.Step3p5ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    raw = load_file(str(ckpt / "model.safetensors"))
    model.load_weights((k, v.float() if v.dtype == torch.bfloat16 else v) for k, v in raw.items())
    return model, cfg


def _moe_layers(model):
    return [(i, layer.moe) for i, layer in enumerate(model.model.layers) if layer.is_moe]


def _dispatch_like_cuda(moe):
    """What SGLang's BaseFusedOp resolves on a CUDA (or ROCm) machine."""
    moe.topk._forward_method = moe.topk.forward_cuda
    qm = moe.experts.quant_method
    qm._forward_method = qm.forward_cuda


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpu-contract"), seed=3)


@pytest.fixture(scope="module")
def ref(ckpt):
    return Step35Reference(ckpt)


@pytest.fixture()
def cuda_model(sglang_gpu_path, ckpt, monkeypatch):
    model, cfg = _build(ckpt, monkeypatch, "cuda")
    for _, moe in _moe_layers(model):
        _dispatch_like_cuda(moe)
    return model, cfg


def _tokens(cfg, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, cfg.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_every_moe_layer_is_ready_for_the_gpu_dispatch(cuda_model):
    """TopK has an output format (SGLang's forward_cuda raises without one); clamped layers carry the
    config's limit into FusedMoE, unclamped ones none; no layer is left to our loop on a GPU."""
    model, cfg = cuda_model
    layers = _moe_layers(model)
    assert [i for i, _ in layers] == [2, 3, 4]
    for i, moe in layers:
        assert moe.topk.topk_config.output_format is not None, f"layer {i}: TopK unbound"
        limit = cfg.swiglu_limits[i]
        assert moe.experts.moe_runner_config.gemm1_clamp_limit == (limit if limit > 0 else None)
        assert moe.plan.uses_fused_moe
    assert cfg.swiglu_limits[4] > 0 and cfg.swiglu_limits[2] == cfg.swiglu_limits[3] == 0


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_sglang_triton_fused_moe_matches_reference(cuda_model, ref, num_tokens):
    """Every MoE layer through SGLang's Triton kernels (clamp in SGLang's runner on layer 4) equals
    the reference, at decode (1 token) and prefill-like (5 tokens) batch sizes."""
    model, cfg = cuda_model
    x = _tokens(cfg, num_tokens)
    for i, moe in _moe_layers(model):
        out = moe(x.clone())
        torch.testing.assert_close(out, ref.moe(i, x.clone()), **TOL, msg=lambda m: f"layer {i}: {m}")


def test_clamp_is_computed_by_the_fused_kernel(cuda_model, ref, ckpt):
    """On the clamped layer the unclamped reference is far outside the tolerance, so matching the
    clamped one means SGLang's kernel path really applies Step's clamp."""
    model, cfg = cuda_model
    x = _tokens(cfg, 6, seed=1) * 4.0  # large enough that the clamp (0.5) bites
    out = model.model.layers[4].moe(x.clone())
    clamped, unclamped = ref.moe(4, x.clone()), Step35Reference(ckpt, routed_clamp=False).moe(4, x.clone())
    torch.testing.assert_close(out, clamped, **TOL)
    assert (unclamped - clamped).abs().max() > 50 * TOL["atol"]


def test_shared_expert_reads_the_layer_input_when_experts_work_in_place(cuda_model, ref, monkeypatch):
    """FusedMoE(inplace=True) writes the routed output into its input tensor; with the experts
    replaced by a fake that does exactly that, the layer still equals the reference."""
    model, cfg = cuda_model
    x = _tokens(cfg, 4, seed=2)
    for i, moe in _moe_layers(model):
        real = moe.experts.forward

        def in_place(hidden_states, topk_output, _real=real, **kw):
            out = _real(hidden_states.clone(), topk_output, **kw)
            hidden_states.copy_(out)
            return hidden_states

        monkeypatch.setattr(moe.experts, "forward", in_place)
        torch.testing.assert_close(moe(x.clone()), ref.moe(i, x.clone()), **TOL, msg=lambda m: f"layer {i}: {m}")


def test_gpu_moe_path_has_no_host_sync(cuda_model):
    """Decode-sized batches through every MoE layer's GPU path: no op makes the host wait (what
    CUDA-graph capture of decode and of MTP's target verify requires). The detector itself is shown
    to catch the CPU-only expert loop."""
    model, cfg = cuda_model
    x = _tokens(cfg, 4, seed=3)
    for i, moe in _moe_layers(model):
        det = gpu_contract.HostSyncDetector()
        with gpu_contract.opaque_triton_launches(det), det:
            moe(x.clone())
        assert det.syncs == [], f"layer {i}: host syncs {sorted(set(det.syncs))}"

    from sglang_step35.models.expert_compute import experts_forward_loop

    moe = model.model.layers[4].moe
    topk_output = moe.topk(x, torch.nn.functional.linear(x, moe.gate.weight))
    det = gpu_contract.HostSyncDetector()
    with det:
        experts_forward_loop(moe.experts, x, topk_output, moe.swiglu_limit)
    assert det.syncs, "the detector must flag the loop's unique().tolist() / nonzero"


@pytest.fixture(scope="module")
def aiter_ckpt(tmp_path_factory):
    # AITER's CK MoE needs 128-aligned expert widths (SGLang skips it otherwise): a wider tiny.
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gpu-contract-aiter"), seed=4,
                                 spec=TinySpec(moe_intermediate_size=128))


def test_aiter_keeps_clamped_layers_on_triton_in_triton_layout(sglang_gpu_path, aiter_ckpt, monkeypatch):
    """ROCm with SGLANG_USE_AITER=1 on MI300X (gfx942, where SGLang itself would hand a clamped layer
    to AITER): SGLang's real post-load step shuffles the unclamped layers into AITER's layout, while
    the clamped layer keeps Triton's layout and runner and still equals the reference. The fp32
    router never goes through AITER's dense GEMM (the shared expert's bf16/fp32 linears do)."""
    from sglang.srt.layers.quantization import unquant

    monkeypatch.setattr(unquant, "_use_aiter", True)
    monkeypatch.setattr(unquant, "shuffle_weight", gpu_contract.aiter_shuffle_weight, raising=False)
    monkeypatch.setattr(unquant, "is_gfx95_supported", lambda: False)
    gemm = gpu_contract.AiterDenseGemm()
    monkeypatch.setattr(unquant, "tgemm", gemm, raising=False)
    model, cfg = _build(aiter_ckpt, monkeypatch, "rocm", aiter=True)
    ref = Step35Reference(aiter_ckpt)
    raw = load_file(str(aiter_ckpt / "model.safetensors"))
    x = _tokens(cfg, 5, seed=5)
    for i, moe in _moe_layers(model):
        before = moe.experts.w13_weight.detach().clone()
        moe.experts.quant_method.process_weights_after_loading(moe.experts)  # what SGLang's loader runs
        shuffled = not torch.equal(moe.experts.w13_weight, before)
        clamped = cfg.swiglu_limits[i] > 0
        assert shuffled is not clamped, f"layer {i}: AITER layout {'on' if shuffled else 'off'}"
        assert (moe.experts.quant_method._aiter_runner is None) is clamped
        if clamped:
            gate = raw[f"model.layers.{i}.moe.gate_proj.weight"].float()
            torch.testing.assert_close(moe.experts.w13_weight[:, : gate.shape[1]], gate)
            _dispatch_like_cuda(moe)
            torch.testing.assert_close(moe(x.clone()), ref.moe(i, x.clone()), **TOL)
    assert gemm.input_dtypes, "the shared expert's linears run on AITER's GEMM under SGLANG_USE_AITER"
    assert len(gemm.input_dtypes) == 2, "gate_up + down of the shared expert only, not the router gate"


def test_expert_location_config_for_eplb(sglang_gpu_path, ckpt):
    """--enable-eplb and expert-distribution recording ask the registered model class
    (ModelConfigForExpertLocation.from_model_config); without the hook they are unsupported."""
    from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
    from sglang.srt.models.registry import ModelRegistry

    import sglang_step35.models.step3p5 as model_mod
    from sglang_step35.config import Step35Config

    cls, _ = ModelRegistry.resolve_model_cls(["Step3p5ForCausalLM"])
    assert cls is model_mod.Step3p5ForCausalLM
    cfg = Step35Config(**json.loads((ckpt / "config.json").read_text()))
    got = cls.get_model_config_for_expert_location(cfg)
    assert isinstance(got, ModelConfigForExpertLocation)
    assert (got.num_layers, got.num_logical_experts) == (cfg.num_hidden_layers, cfg.moe_num_experts)

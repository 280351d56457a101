"""W4A16 checkpoints load as on an H100: SGLang's own quantization methods build each module.

The tiny checkpoints of `step35 tiny --quant awq|gptq|w4a16` (sglang_step35/quant/w4a16.py) are built
the way SGLang's loader builds a model (`_get_quantization_config` + `_initialize_model` from a
ModelConfig of the directory; the MTP draft with `is_draft_model` and each `draft_model_idx`), with
the flags under which the experts run on SGLang's Triton int4 MoE: AWQ / GPTQ with `--quantization
moe_wna16` (MoeWNA16Config: MoeWNA16Method experts; AWQ / GPTQ-Marlin dense linears), compressed-tensors
with `--moe-runner-backend triton` (CompressedTensorsWNA16TritonMoE experts; CompressedTensorsWNA16
linears). SGLang's CUDA capability probes answer as an H100's (sm_90) during construction only; our
platform probe answers "cuda" (no CPU dequant fallback). We stop before `process_weights_after_loading`.

Checks are bit-exact: every parameter holds exactly its checkpoint tensors, in SGLang's layout for
the method (fused q/k/v and gate/up in shard order; MoeWNA16's uint8 [N, K/2] codes, low nibble
first, from AWQ's interleaved / GPTQ's K-packed int32, AWQ zero points paired the same way along N;
compressed-tensors' experts transposed), scales equal in value (fp16 checkpoint scales hold bf16
values). g_proj, the router and the three MTP steps are BF16, as the exports keep them. Outside the
Triton path the same checkpoints are refused by name, at launch and at construction.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import gpu_contract
from gpu_contract import main_name, mtp_name
from sglang_step35 import served
from sglang_step35.quant import w4a16
from sglang_step35.tiny import write_tiny_checkpoint

# name -> (--quantization, --moe-runner-backend) under which SGLang runs the experts on Triton.
TRITON_FLAGS = {"awq": ("moe_wna16", None), "gptq": ("moe_wna16", None), "w4a16": (None, "triton"),
                "w4a16-g32": (None, "triton")}
FUSED = gpu_contract.FUSED_CHECKPOINT_MODULES


@pytest.fixture(scope="module")
def gpu_like_build():
    """World-size-1 SGLang state; our platform probe answers "cuda" (SGLang's stays CPU)."""
    with gpu_contract.gpu_like_build_state("cuda"):
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("w4a16-load")
    return {n: write_tiny_checkpoint(root / n, seed=4, quant=n) for n in w4a16.NAMES}


def build(ckpt, flag=None, runner=None, draft_idx=None):
    """Our model (or MTP step `draft_idx`) as SGLang's loader builds it with `--quantization flag`
    and `--moe-runner-backend runner`, CUDA capability answered as an H100's meanwhile."""
    from sglang.srt.layers.moe.utils import MoeRunnerBackend
    from sglang.srt.layers.quantization import marlin_utils, moe_wna16
    from sglang.srt.runtime_context import get_flags

    with pytest.MonkeyPatch.context() as mp:
        for mod in (moe_wna16, marlin_utils):
            mp.setattr(mod, "get_device_capability", lambda *a, **k: (9, 0))
        mp.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        mp.setattr(get_flags().moe, "runner_backend", MoeRunnerBackend(runner or "auto"))
        return gpu_contract.build_like_sglang(ckpt, draft_idx=draft_idx, quantization=flag)


def _pairs(codes: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 codes -> two per byte along `dim`, the even index in the low nibble (MoeWNA16's layout)."""
    c = codes.to(torch.uint8).movedim(dim, 0)
    return (c[0::2] | (c[1::2] << 4)).movedim(0, dim).contiguous()


def _moe_wna16(name: str, w: dict, base: str, leaf: str) -> torch.Tensor | None:
    """One expert's MoeWNA16 parameter `leaf` (qweight / qzeros / scales) from `base`'s checkpoint tensors."""
    if leaf == "scales":
        return w[f"{base}.scales"].T
    n = w[f"{base}.scales"].shape[1]
    if leaf == "qweight":
        q = w[f"{base}.qweight"]
        codes = (w4a16.unpack_int32(q, 1, n, w4a16.AWQ_ORDER) if name == "awq"
                 else w4a16.unpack_int32(q, 0, q.shape[0] * 8)).T  # [N, K]
        return _pairs(codes, 1)
    if leaf == "qzeros" and name == "awq":
        return _pairs(w4a16.unpack_int32(w[f"{base}.qzeros"], 1, n, w4a16.AWQ_ORDER).T, 0)  # [N/2, G]
    return None


def expected(name: str, w: dict, prefix: str, suffix: str) -> torch.Tensor | list | None:
    """What our parameter `prefix + suffix` must hold, from checkpoint tensors `w` (a list: any of them)."""
    m = re.match(r"^moe\.experts\.w(13|2)_(\w+)$", suffix)
    if m:
        projs = ["gate_proj", "up_proj"] if m.group(1) == "13" else ["down_proj"]
        leaf = m.group(2)
        per_expert = []
        for e in range(len({k.split(".")[5] for k in w if k.startswith(prefix + "moe.experts.")})):
            bases = [f"{prefix}moe.experts.{e}.{p}" for p in projs]
            if name.startswith("w4a16"):
                parts = [w[f"{b}.{leaf}"] for b in bases]
                if leaf == "weight_shape":
                    per_expert.append(parts[-1])  # metadata: SGLang keeps the last shard's
                    continue
                per_expert.append(torch.cat([p.T for p in parts], dim=1))  # is_transposed
            else:
                parts = [_moe_wna16(name, w, b, leaf) for b in bases]
                if any(p is None for p in parts):
                    return None
                per_expert.append(torch.cat(parts, dim=0))
        return torch.stack(per_expert)
    module, _, leaf = suffix.rpartition(".")
    shards = FUSED.get(module, [module])
    parts = [w.get(f"{prefix}{s}.{leaf}") for s in shards]
    if any(p is None for p in parts):
        return None
    if leaf in ("g_idx", "weight_shape"):
        return parts  # one per shard: GPTQ's g_idx is the same for each; weight_shape is metadata
    dim = 1 if leaf in ("qweight", "qzeros", "scales") else 0  # AWQ/GPTQ: N is the last dim
    return torch.cat(parts, dim=dim)


def _same(param: torch.Tensor, want: torch.Tensor) -> bool:
    if want.dtype.is_floating_point and param.dtype != want.dtype:
        # fp16 checkpoint scales into bf16 parameters: the values must survive both ways.
        return torch.equal(param.to(want.dtype), want) and torch.equal(want.to(param.dtype), param)
    return param.dtype == want.dtype and torch.equal(param, want) or (
        param.dtype == torch.bfloat16 and torch.equal(param, want.to(param.dtype)))


def assert_every_param_written(name: str, model, w: dict, map_name) -> list[str]:
    """Every parameter equals its checkpoint tensors; returns the names of the 4-bit parameters."""
    quantized, wrong = [], []
    for pname, p in model.named_parameters():
        if p.numel() == 0 or pname.endswith("g_idx_sort_indices") or re.search(r"experts\.w(13|2)_weight_g_idx$", pname):
            continue  # placeholders SGLang's methods create and never load (see models/weights.py)
        prefix, suffix = map_name(pname)
        want = expected(name, w, prefix, suffix)
        assert want is not None, f"{pname}: no checkpoint tensor ({prefix}{suffix})"
        ok = any(_same(p.data, x) for x in want) if isinstance(want, list) else _same(p.data, want)
        if not ok:
            wrong.append(pname)
        if p.dtype in (torch.int32, torch.uint8) and not pname.endswith(("g_idx", "weight_shape")):
            quantized.append(pname)
    assert not wrong, f"parameters not equal to the checkpoint: {wrong}"
    return quantized


@pytest.mark.parametrize("name", w4a16.NAMES)
def test_w4a16_tinies_load_bit_exact_on_the_triton_path_main_and_mtp(gpu_like_build, ckpts, name):
    flag, runner = TRITON_FLAGS[name]
    ckpt = ckpts[name]
    w = load_file(str(ckpt / "model.safetensors"))
    model, qc = build(ckpt, flag, runner)
    assert model.cpu_dequant is None  # SGLang's methods, not the CPU fallback
    model.load_weights(w.items())
    quantized = assert_every_param_written(name, model, w, main_name)
    experts = model.model.layers[4].moe.experts
    if name.startswith("w4a16"):
        from sglang.srt.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16TritonMoE

        assert type(qc).__name__ == "CompressedTensorsConfig" and isinstance(experts.scheme, CompressedTensorsWNA16TritonMoE)
        assert experts.scheme.group_size == (32 if name == "w4a16-g32" else 128)
        assert "model.layers.4.moe.experts.w13_weight_packed" in quantized
        assert "model.layers.0.self_attn.qkv_proj.weight_packed" in quantized
    else:
        from sglang.srt.layers.quantization.moe_wna16 import MoeWNA16Config, MoeWNA16Method

        assert isinstance(qc, MoeWNA16Config) and isinstance(experts.quant_method, MoeWNA16Method)
        assert {"model.layers.4.moe.experts.w13_qweight", "model.layers.0.self_attn.qkv_proj.qweight",
                "model.layers.3.moe.share_expert.gate_up_proj.qweight"} <= set(quantized)
    # Step's clamp reaches the Triton runner on the clamped layer only.
    assert experts.moe_runner_config.gemm1_clamp_limit == model.config.swiglu_limits[4] > 0
    assert model.model.layers[3].moe.experts.moe_runner_config.gemm1_clamp_limit is None
    # Kept BF16 as the export keeps them: g_proj and the fp32 router.
    for i in (0, 2, 4):
        assert model.model.layers[i].self_attn.g_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[4].moe.gate.weight.dtype == torch.float32
    n = model.config.num_hidden_layers
    for step in range(3):
        mtp, _ = build(ckpt, flag, runner, draft_idx=step)
        mtp.load_weights(w.items())
        assert not assert_every_param_written(name, mtp, w, mtp_name(n + step))  # all BF16


def test_int4_off_the_triton_path_is_refused_at_launch_and_construction(gpu_like_build, ckpts):
    """AWQ/GPTQ without --quantization moe_wna16 would run SGLang's Marlin MoE (CUDA default), whose
    clamp is GPT-OSS's silu(min(gate, L)), or no int4 MoE at all; compressed-tensors W4A16 under the
    auto runner is Marlin too. Each is refused by name with the flag that serves it, at launch
    (the guard SGLang's launch calls) and when the model is built; with that flag it is served."""
    import json

    from sglang_step35.moe.policy import guard_moe_layout, routed_plan

    def launch(name, platform="cuda", **flags):
        cfg = json.loads((ckpts[name] / "config.json").read_text())
        return guard_moe_layout(dict(tp_size=1, ep_size=1, **flags), cfg, platform, aiter=False)

    for name in ("awq", "gptq"):
        refused = launch(name)
        assert refused.action == "refuse" and "experts without --quantization moe_wna16 would run on SGLang's " \
            "Marlin MoE, which drops Step's clamp" in refused.message, refused.message
        assert "add --quantization moe_wna16" in refused.message
        assert launch(name, quantization="moe_wna16").action != "refuse"
        assert launch(name, "cpu").action != "refuse"  # dequantized at load
        # ROCm: SGLang refuses moe_wna16 there (test_w4a16_variants_and_rocm_are_refused_by_name).
        assert "refuses --quantization moe_wna16 there" in launch(name, "rocm", quantization="moe_wna16").message
    for name in ("w4a16", "w4a16-g32"):
        refused = launch(name)
        assert refused.action == "refuse" and f"{name} experts with SGLang's auto runner would run on SGLang's " \
            "Marlin MoE" in refused.message and "add --moe-runner-backend triton" in refused.message
        assert launch(name, moe_runner_backend="triton").action != "refuse"
        assert "CompressedTensorsWNA16, which runs Marlin" in launch(name, "rocm", moe_runner_backend="triton").message
    # Construction: SGLang's method as the model sees it (what Engine(...) builds without the CLI).
    with pytest.raises(served.NotServedError, match=r"int4 experts without --quantization moe_wna16"):
        build(ckpts["gptq"])  # SGLang's CUDA default for it: gptq_marlin (GPTQMarlinMoEMethod)
    with pytest.raises(served.NotServedError, match=r"w4a16 experts with SGLang's auto runner"):
        build(ckpts["w4a16"])
    for method in ("awq_marlin", "gptq_marlin"):
        with pytest.raises(served.NotServedError, match="add --quantization moe_wna16"):
            routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant="int4", quant_method=method, layer_id=44)
    assert routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant="moe_wna16", layer_id=44).uses_fused_moe



def _ct_variant(group: int, **weights) -> dict:
    qc = w4a16.quantization_config("w4a16", group=group)
    qc["config_groups"]["group_0"]["weights"].update(weights)
    return qc


def test_w4a16_variants_and_rocm_are_refused_by_name(gpu_like_build, ckpts):
    """The W4A16 cells refused on GPUs, each with its SGLang 0.5.23 reason (served.py rows), at launch
    (the guard, reading the checkpoint's quantization_config) and at construction (routed_plan on
    quant_spec_of SGLang's config, what the model asks):
    - compressed-tensors with zero points or act-order on NVIDIA: SGLang's Triton W4A16 MoE cannot take
      them (tests/test_quant_w4a16_moe.py pins its ValueError and its ROCm choice), Marlin drops the clamp;
    - every compressed-tensors W4A16 checkpoint on ROCm: its dense linears are Marlin, which SGLang
      imports on CUDA only (absent here, as on ROCm);
    - AWQ / GPTQ on ROCm: SGLang's ModelConfig refuses --quantization moe_wna16 there (pinned here with
      its HIP check answered as ROCm's), the only method that runs their experts on Triton;
    - GPTQ with desc_act on NVIDIA: moe_wna16 does not take it (ModelConfig raises the mismatch)."""
    import json

    from sglang.srt.configs import model_config
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.quantization import marlin_utils, moe_wna16
    from sglang.srt.layers.quantization.compressed_tensors import compressed_tensors as ct
    from sglang.srt.layers.quantization.compressed_tensors.schemes import compressed_tensors_wNa16

    from sglang_step35.moe.policy import guard_moe_layout, routed_plan
    from sglang_step35.moe.quant import quant_spec_of

    cfg = json.loads((ckpts["w4a16"] / "config.json").read_text())

    def launch(qc, platform, **flags):
        return guard_moe_layout(dict(tp_size=1, ep_size=1, **flags), dict(cfg, quantization_config=qc), platform,
                                aiter=False)

    for group in (128, 32):
        for variant, label in (({"symmetric": False}, "asym"), ({"actorder": "group"}, "actorder"),
                               ({"symmetric": False, "actorder": "weight"}, "asym-actorder")):
            qc = _ct_variant(group, **variant)
            assert served.quant_label(qc) == f"w4a16-g{group}-{label}"
            d = launch(qc, "cuda", moe_runner_backend="triton")
            assert d.action == "refuse" and "have zero points or act-order, which SGLang's Triton W4A16 MoE " \
                "cannot take" in d.message, d.message
            assert "CompressedTensorsWNA16, which runs Marlin" in launch(qc, "rocm").message
            spec = quant_spec_of(ct.CompressedTensorsConfig.from_config(qc))
            with pytest.raises(served.NotServedError, match="have zero points or act-order"):
                routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant=spec, runner_backend="triton",
                            layer_id=44, quant_method="compressed_tensors")
        spec = quant_spec_of(ct.CompressedTensorsConfig.from_config(_ct_variant(group)))
        assert routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant=spec, runner_backend="triton",
                           layer_id=44, quant_method="compressed_tensors").uses_fused_moe
        with pytest.raises(served.NotServedError, match="CompressedTensorsWNA16, which runs Marlin"):
            routed_plan(7.0, device="rocm", ep_size=1, aiter=True, quant=spec, layer_id=44,
                        quant_method="compressed_tensors")
    # The CUDA-only Marlin imports the ROCm refusal rests on (neither module binds them off CUDA).
    assert not hasattr(marlin_utils, "gptq_marlin_gemm") and not hasattr(compressed_tensors_wNa16, "gptq_marlin_repack")

    for name in ("awq", "gptq"):
        with pytest.MonkeyPatch.context() as rocm:  # ModelConfig's HIP check and gfx942's capability
            rocm.setattr(model_config, "is_hip", lambda: True)
            rocm.setattr(moe_wna16, "get_device_capability", lambda *a, **k: (9, 4))
            with pytest.raises(ValueError, match="moe_wna16 quantization is currently not supported in ROCm"):
                ModelConfig(str(ckpts[name]), dtype="float16", quantization="moe_wna16")
        d = launch(json.loads((ckpts[name] / "config.json").read_text())["quantization_config"], "rocm",
                   quantization="moe_wna16")
        assert d.action == "refuse" and "SGLang 0.5.23 refuses --quantization moe_wna16 there" in d.message
    with pytest.raises(served.NotServedError, match="refuses --quantization moe_wna16 there"):
        routed_plan(7.0, device="rocm", ep_size=1, aiter=True, quant="moe_wna16", layer_id=44)
    gptq = json.loads((ckpts["gptq"] / "config.json").read_text())["quantization_config"]
    assert served.quant_label(dict(gptq, desc_act=True)) == "int4-actorder"
    d = launch(dict(gptq, desc_act=True), "cuda", quantization="moe_wna16")
    assert d.action == "refuse" and "GPTQ with desc_act" in d.message, d.message


@pytest.mark.parametrize("group", ["channel", "g64"])
def test_w4a16_channel_and_group_64_have_named_rows(gpu_like_build, ckpts, group):
    """compressed-tensors W4A16 with one scale per output row (strategy channel, group_size -1 or
    none) or groups of 64: SGLang 0.5.23's Triton W4A16 MoE takes symmetric groups of 32 / 128 only
    (pinned here through CompressedTensorsConfig's own check), so --moe-runner-backend triton makes
    get_moe_scheme raise and the auto runner is Marlin, which drops Step's clamp: each variant is
    refused by its own row on every platform (launch guard and construction), not by the generic
    allow-list message."""
    import json

    from sglang.srt.layers.quantization.compressed_tensors import compressed_tensors as ct

    from sglang_step35.moe.policy import guard_moe_layout, routed_plan
    from sglang_step35.moe.quant import quant_spec_of

    cfg = json.loads((ckpts["w4a16"] / "config.json").read_text())
    shape = {"strategy": "channel", "group_size": None} if group == "channel" else {"group_size": 64}
    for variant, suffix in (({}, ""), ({"symmetric": False}, "-asym"), ({"actorder": "weight"}, "-actorder")):
        qc = _ct_variant(128, **shape, **variant)
        label = f"w4a16-{group}{suffix}"
        assert served.quant_label(qc) == label and label in served.W4A16_OTHER_GROUPS
        config = ct.CompressedTensorsConfig.from_config(qc)
        weights = config.target_scheme_map["Linear"]["weights"]
        assert not config._is_wna16_triton_moe_supported(weights)  # SGLang's own rule
        for platform, runner, why in (
                ("cuda", "triton", "have one scale per output row (channel-wise) or groups of 64"),
                ("cuda", None, "_is_wna16_triton_moe_supported accepts symmetric groups of 32 or 128 only"),
                ("rocm", "triton", "CompressedTensorsWNA16, which runs Marlin"),
                ("cpu", None, "with zero points or act-order are not verified on a CPU")):
            if platform == "cpu" and not suffix:
                continue  # served there (tests/test_quant_w4a16.py::test_w4a16_channel_and_group_64_load_dequantized_on_a_cpu)
            d = guard_moe_layout(dict(tp_size=1, ep_size=1, moe_runner_backend=runner),
                                 dict(cfg, quantization_config=qc), platform, aiter=False)
            assert d.action == "refuse" and f"{label} experts" in d.message and why in d.message, d.message
            assert "is not supported by sglang-step35" not in d.message, d.message
        with pytest.raises(served.NotServedError, match="channel-wise\\) or groups of 64"):
            routed_plan(7.0, device="cuda", ep_size=1, aiter=False, quant=quant_spec_of(config),
                        runner_backend="triton", layer_id=44, quant_method="compressed_tensors")

"""AutoRound INT4 in AutoRound's own config (`quant_method: auto-round`) loads as SGLang's AutoRoundConfig lays it out.

The tiny of `step35 tiny --quant autoround` (sglang_step35/quant/autoround.py: GPTQ-packed tensors,
`packing_format: auto_round:auto_gptq`, unquantized modules in `extra_config`) is built as SGLang's
loader builds it (`_get_quantization_config` + `_initialize_model`; the draft with each
`draft_model_idx`) while SGLang's probes answer as an H100 during construction only (capability
(9, 0); auto_round's module constant `_is_cpu` off, or it would take its AMX CPU path). SGLang's
AutoRoundConfig then builds GPTQ-Marlin methods (GPTQMarlinMoEMethod experts, GPTQMarlinLinearMethod
linears) with extra_config's modules unquantized; every parameter holds the checkpoint's bytes (we stop
before `process_weights_after_loading`, Marlin's repack needs the GPU). The experts are refused on GPUs
by name — Marlin's MoE drops Step's clamp (it reads gemm1_clamp_limit only with GPT-OSS's
gemm1_alpha) — with the route that serves the same tensors:
AutoRound's GPTQ-packed tensors are GPTQ's, so its config rewritten as GPTQ's
(`autoround.gptq_config`) builds SGLang's Triton MoeWNA16 experts under `--quantization moe_wna16`,
a flag SGLang itself rejects for quant_method auto-round.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import gpu_contract
from gpu_contract import main_name, mtp_name
from sglang_step35 import quant, served
from sglang_step35.quant import autoround, w4a16
from sglang_step35.served import NotServedError
from sglang_step35.tiny import write_tiny_checkpoint

_FUSED = gpu_contract.FUSED_CHECKPOINT_MODULES


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("autoround")
    return {n: write_tiny_checkpoint(root / n, seed=4, quant=n) for n in ("autoround", "gptq", "autoround-awq", "awq")}


@pytest.fixture
def as_h100():
    with gpu_contract.gpu_like_build_state("cuda") as mp:
        yield mp


def build(ckpt, mp, draft_idx=None, record=None, quantization=None):
    """Our model as SGLang builds it on an H100 (`--quantization quantization`); refusals recorded
    into `record` (None: raised)."""
    from sglang.srt.layers.quantization import auto_round, marlin_utils, moe_wna16

    with mp.context() as m:
        m.setattr(auto_round, "_is_cpu", False)
        for mod in (moe_wna16, marlin_utils):
            m.setattr(mod, "get_device_capability", lambda *a, **k: (9, 0))
        m.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        if record is not None:
            m.setattr(served, "check", lambda setting, flags=served.FLAGS: record.extend(served.refusals(setting, flags)))
        return gpu_contract.build_like_sglang(ckpt, draft_idx=draft_idx, quantization=quantization)


def expected(w: dict, prefix: str, suffix: str):
    """What parameter `prefix + suffix` holds in GPTQ-Marlin's layout (before its repack), from the
    checkpoint tensors `w`; a list: any one of them (g_idx, the same for every shard)."""
    m = re.match(r"^moe\.experts\.w(13|2)_(\w+)$", suffix)
    if m:  # GPTQMarlinMoEScheme: [E, K/8, N], [E, G, N], ... ; gate and up concatenated along N
        projs = ["gate_proj", "up_proj"] if m.group(1) == "13" else ["down_proj"]
        n = len({k.split(".")[5] for k in w if k.startswith(prefix + "moe.experts.")})
        leaf = m.group(2)
        per = [[w[f"{prefix}moe.experts.{e}.{p}.{leaf}"] for p in projs] for e in range(n)]
        return torch.stack([parts[0] if leaf == "g_idx" else torch.cat(parts, dim=1) for parts in per])
    module, _, leaf = suffix.rpartition(".")
    parts = [w.get(f"{prefix}{s}.{leaf}") for s in _FUSED.get(module, [module])]
    if any(p is None for p in parts):
        return None
    return parts if leaf == "g_idx" else torch.cat(parts, dim=1 if leaf in ("qweight", "qzeros", "scales") else 0)


def _same(pname: str, p: torch.Tensor, want: torch.Tensor) -> bool:
    if pname.endswith("_qzeros") and p.dtype == torch.bfloat16:
        # GPTQMarlinMoEScheme makes the experts' qzeros in the activation dtype; symmetric GPTQ
        # (uint4b8) never reads them, so they hold the int32 words as SGLang's loader copies them.
        return torch.equal(p, want.to(p.dtype))
    if want.dtype.is_floating_point and p.dtype != want.dtype:  # fp16 checkpoint scales holding bf16 values
        return torch.equal(p.to(want.dtype), want) and torch.equal(want.to(p.dtype), p)
    return p.dtype == want.dtype and torch.equal(p, want)


def assert_every_param_written(model, w: dict, map_name) -> set[str]:
    """Every parameter holds its checkpoint tensors; returns the names of the packed int32 ones."""
    packed, wrong = set(), []
    for pname, p in model.named_parameters():
        if p.numel() == 0 or pname.endswith("g_idx_sort_indices"):
            continue  # computed after loading (models/weights.derived_after_loading)
        prefix, suffix = map_name(pname)
        want = expected(w, prefix, suffix)
        assert want is not None, f"{pname}: no checkpoint tensor ({prefix}{suffix})"
        if not isinstance(want, list) and want.dtype == torch.bfloat16 and p.dtype == torch.float32:
            want = want.float()  # the fp32 router
        ok = any(_same(pname, p.data, x) for x in want) if isinstance(want, list) else _same(pname, p.data, want)
        if not ok:
            wrong.append(pname)
        if p.dtype == torch.int32 and pname.endswith("qweight"):
            packed.add(pname)
    assert not wrong, f"parameters not equal to the checkpoint: {wrong}"
    return packed


def test_autoround_loads_bit_exact_under_sglangs_auto_round_method_main_and_mtp(as_h100, ckpts):
    from sglang.srt.layers.quantization.auto_round import AutoRoundConfig

    ckpt = ckpts["autoround"]
    w = load_file(str(ckpt / "model.safetensors"))
    refused: list[str] = []
    model, qc = build(ckpt, as_h100, record=refused)
    assert isinstance(qc, AutoRoundConfig) and model.cpu_dequant is None
    assert refused and all(r.startswith("autoround experts") for r in refused), refused
    model.load_weights(w.items())
    packed = assert_every_param_written(model, w, main_name)
    layers = model.model.layers
    method = lambda mod: type(mod.quant_method).__name__  # noqa: E731
    assert method(layers[3].moe.experts) == "GPTQMarlinMoEMethod"
    for mod in (layers[0].self_attn.qkv_proj, layers[1].mlp.gate_up_proj, layers[4].moe.share_expert.down_proj):
        assert method(mod) == "GPTQMarlinLinearMethod", mod
    assert {"model.layers.4.moe.experts.w13_qweight", "model.layers.0.self_attn.qkv_proj.qweight"} <= packed
    for i in (0, 2, 4):  # extra_config keeps g_proj BF16, as the export stores it
        assert layers[i].self_attn.g_proj.weight.dtype == torch.bfloat16
    assert layers[4].moe.gate.weight.dtype == torch.float32
    n = model.config.num_hidden_layers
    for step in range(3):  # the MTP layers: unquantized by extra_config's regular expression
        mtp, _ = build(ckpt, as_h100, draft_idx=step, record=[])
        mtp.load_weights(w.items())
        assert assert_every_param_written(mtp, w, mtp_name(n + step)) == set()
        assert method(mtp.layer.self_attn.qkv_proj) == "UnquantizedLinearMethod"


def test_autoround_is_refused_on_gpus_with_the_route_that_serves_its_tensors(as_h100, ckpts, tmp_path):
    ckpt = ckpts["autoround"]
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert served.quant_label(qc) == "autoround" and quant.format_for(qc) is autoround
    with pytest.raises(NotServedError, match="^autoround experts .*GPTQMarlinMoEMethod.*--quantization moe_wna16"):
        build(ckpt, as_h100)
    assert served.refusals(served.Setting("cpu", quant="autoround", clamped_layers=(43, 44))) == []
    (why,) = served.refusals(served.Setting("amd", quant="autoround"))
    assert why.startswith("autoround experts")
    # The config backend that keeps SGLang off Marlin (gptq / awq) is named, and is no route either.
    assert "(autoround-gptq-nomarlin)" in served.refusal(served.QUANT, served.Setting("nvidia", quant="autoround"))
    from sglang_step35.moe.policy import guard_moe_layout  # at launch, from the checkpoint's config

    cfg = json.loads((ckpt / "config.json").read_text())
    refused = guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cuda", aiter=False)
    assert refused.action == "refuse" and "autoround experts" in refused.message, refused.message
    assert guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cpu", aiter=False).action != "refuse"
    # SGLang rejects the Triton flag for quant_method auto-round ...
    with pytest.raises(ValueError, match=r"\(auto-round\) does not match .* \(moe_wna16\)"):
        build(ckpt, as_h100, quantization="moe_wna16")
    # ... while the tensors are GPTQ's byte for byte (the GPTQ tiny of the same weights) ...
    a, g = (load_file(str(c / "model.safetensors")) for c in (ckpt, ckpts["gptq"]))
    assert a.keys() == g.keys() and all(torch.equal(a[k], g[k]) for k in a)
    # ... so the config rewritten as GPTQ's builds SGLang's Triton int4 MoE with Step's clamp, and loads.
    moved = tmp_path / "as-gptq"
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["quantization_config"] = autoround.gptq_config(qc)
    (moved / "config.json").write_text(json.dumps(cfg))
    model, wna16 = build(moved, as_h100, quantization="moe_wna16")
    assert wna16.get_name() == "moe_wna16"
    experts = model.model.layers[4].moe.experts
    assert type(experts.quant_method).__name__ == "MoeWNA16Method"
    assert experts.moe_runner_config.gemm1_clamp_limit == model.config.swiglu_limits[4] > 0
    model.load_weights(a.items())  # raises on any missing, unexpected or mis-shaped tensor
    mtp, _ = build(moved, as_h100, draft_idx=0, quantization="moe_wna16")
    mtp.load_weights(a.items())
    assert type(mtp.layer.self_attn.qkv_proj.quant_method).__name__ == "UnquantizedLinearMethod"


def test_autoround_config_reading():
    qc = {"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True, "packing_format": "auto_round:auto_gptq",
          "extra_config": {"model.layers.0.self_attn.g_proj": {"bits": 16, "data_type": "float"},
                           r"model\.layers\.(5|6)\..*": {"bits": 16}}}
    assert quant.format_for(qc) is autoround
    assert quant.format_for({**qc, "packing_format": "auto_round:auto_awq"}) is autoround
    assert quant.format_for({**qc, "bits": 8}) is None and quant.format_for({**qc, "data_type": "fp"}) is None
    assert not w4a16.matches(qc)
    # The planner's bytes: GPTQ's (packed int4, fp16 scales and 4-bit qzeros per group of 128).
    from sglang_step35.moe.quant import parse_quant

    spec, gptq = parse_quant(qc), parse_quant(autoround.gptq_config(qc))
    assert spec.name == "autoround" and spec.linear_bytes(1280, 4096) == gptq.linear_bytes(1280, 4096) == (
        1280 * 4096 // 2 + 1280 * 32 * 2 + 1280 * 32 // 2)
    dyn = autoround.gptq_config(qc)["dynamic"]
    assert set(dyn) == {r"-:^model\.layers\.0\.self_attn\.g_proj$", r"-:^(?:model\.layers\.(5|6)\..*)$"}
    with pytest.raises(ValueError, match="quantized unlike the rest"):
        autoround.gptq_config({**qc, "extra_config": {"model.layers.1.mlp.down_proj": {"bits": 4, "group_size": 32}}})
    with pytest.raises(ValueError, match="auto_round:auto_gptq"):
        autoround.gptq_config({**qc, "packing_format": "auto_round:auto_awq"})
    # The CPU dequantizer is GPTQ's on the same tensors; a per-module group size turns off the global check.
    w = torch.randn(16, 256)
    parts = w4a16.gptq_tensors(w, 128)
    mine = autoround.Dequantizer(qc)
    got = [t for k, v in parts.items() for _, t in mine.feed(f"x.{k}", v)]
    assert len(got) == 1 and mine.problems() == [] and (got[0] - w).abs().max() <= w.abs().max() / 7
    assert autoround.Dequantizer({**qc, "extra_config": {"x": {"bits": 4, "group_size": 32}}}).group_size is None


@pytest.mark.sglang_pin
def test_sglangs_non_marlin_gptq_linear_kernel_is_gone():
    """Why AutoRound is refused on ROCm (served.py): where Marlin does not run, AutoRoundConfig builds
    the dense int4 layers with GPTQLinearMethod, whose scheme SGLang 0.5.23 no longer implements."""
    from sglang.srt.layers.quantization.gptq import GPTQConfig
    from sglang.srt.layers.quantization.gptq.schemes.gptq_linear import GPTQLinearScheme

    qc = GPTQConfig(weight_bits=4, group_size=128, desc_act=False, lm_head_quantized=False, dynamic={})
    with pytest.raises(RuntimeError, match="The non-Marlin GPTQ CUDA kernel has been removed"):
        GPTQLinearScheme(qc)


def _with_config(ckpt, tmp_path, name, **changes):
    """A copy of `ckpt` whose quantization_config has `changes`."""
    moved = tmp_path / name
    shutil.copytree(ckpt, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["quantization_config"].update(changes)
    (moved / "config.json").write_text(json.dumps(cfg))
    return moved, cfg


def test_autoround_gptq_off_marlin_is_refused_by_name_before_sglangs_dense_layers_fail(as_h100, ckpts, tmp_path):
    """A config backend that keeps SGLang's AutoRoundConfig off Marlin (`backend: gptq`, also `awq` on the
    GPTQ packing) gives the experts MoeWNA16's Triton MoE (Step's clamp) but the dense int4 layers
    GPTQLinearMethod, whose kernel SGLang 0.5.23 removed: SGLang's own construction raises in layer 0's
    attention (pinned with our refusal recorded instead of raised). Refused by name at launch and at
    construction, before that."""
    from sglang_step35.moe.policy import guard_moe_layout

    for backend in ("gptq", "awq"):
        moved, cfg = _with_config(ckpts["autoround"], tmp_path, f"gptq-{backend}", backend=backend)
        qc = cfg["quantization_config"]
        assert served.quant_label(qc) == autoround.sglang_route(qc) == "autoround-gptq-nomarlin"
        with pytest.raises(RuntimeError, match="The non-Marlin GPTQ CUDA kernel has been removed"):
            build(moved, as_h100, record=[])
        with pytest.raises(NotServedError, match="^autoround-gptq-nomarlin experts .*MoeWNA16's Triton MoE.*"
                                                 "GPTQLinearMethod.*gptq_config"):
            build(moved, as_h100)
        d = guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cuda", aiter=False)
        assert d.action == "refuse" and "autoround-gptq-nomarlin experts" in d.message, d.message
        assert guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cpu", aiter=False).action != "refuse"
    # Zero points on the GPTQ packing: no Marlin type for them either.
    assert autoround.sglang_route({"quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": False}) == \
        "autoround-gptq-nomarlin"


def test_autoround_awq_kernels_follow_sglangs_autoround_config(as_h100, ckpts, tmp_path):
    """AutoRound's AWQ packing (`step35 tiny --quant autoround-awq`: AutoAWQ's GEMM tensors with zero
    points under `packing_format: auto_round:auto_awq`), built as SGLang's loader builds it on an H100:
    - as exported (backend auto): AWQ-Marlin (AWQMoEMethod experts, Marlin dense linears), every parameter
      the checkpoint's bytes, main and MTP; refused by name (Marlin's MoE drops Step's clamp) with the
      config change that serves it;
    - with `backend: awq`: MoeWNA16's Triton int4 MoE (clamp from gemm1_clamp_limit on the clamped layer)
      and AWQ's dense method — the methods `--quantization moe_wna16` builds for the AWQ tiny of the same
      weights, whose tensors these are byte for byte; every parameter in MoeWNA16's / AWQ's layout
      (tests/test_quant_w4a16_load.py's oracle), main and MTP; served. The Triton MoE itself, clamp
      included, runs against the reference in tests/test_quant_w4a16_moe.py (format autoround-awq);
    - with a gptq backend: SGLang reads the AWQ tensors with GPTQ's methods; refused by name;
    - symmetric (no zero points): refused by name (unverified) everywhere."""
    import test_quant_w4a16_load as w4a16_load
    from sglang.srt.layers.quantization.auto_round import AutoRoundConfig

    from sglang_step35.moe.policy import guard_moe_layout

    ckpt = ckpts["autoround-awq"]
    w = load_file(str(ckpt / "model.safetensors"))
    a = load_file(str(ckpts["awq"] / "model.safetensors"))
    assert w.keys() == a.keys() and all(torch.equal(w[k], a[k]) for k in w)  # AWQ's tensors
    cfg = json.loads((ckpt / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["packing_format"] == "auto_round:auto_awq" and qc["sym"] is False and quant.format_for(qc) is autoround
    assert served.quant_label(qc) == "autoround-awq"
    method = lambda mod: type(mod.quant_method).__name__  # noqa: E731
    n = json.loads((ckpt / "config.json").read_text())["num_hidden_layers"]

    refused: list[str] = []
    model, sg = build(ckpt, as_h100, record=refused)
    assert isinstance(sg, AutoRoundConfig) and model.cpu_dequant is None
    assert refused and all(r.startswith("autoround-awq experts") and "AWQMoEMethod" in r for r in refused), refused
    layers = model.model.layers
    assert method(layers[4].moe.experts) == "AWQMoEMethod"
    assert type(layers[0].self_attn.qkv_proj.scheme).__name__ == "AWQMarlinLinearScheme"
    model.load_weights(w.items())
    assert {"model.layers.4.moe.experts.w13_qweight", "model.layers.0.self_attn.qkv_proj.qweight"} <= \
        assert_every_param_written(model, w, main_name)
    with pytest.raises(NotServedError, match='^autoround-awq experts .*AWQMoEMethod.*add "backend": "awq"'):
        build(ckpt, as_h100)
    assert guard_moe_layout(dict(tp_size=1, ep_size=1), cfg, "cuda", aiter=False).action == "refuse"

    served_ckpt, served_cfg = _with_config(ckpt, tmp_path, "backend-awq", backend="awq")
    assert served.quant_label(served_cfg["quantization_config"]) == "autoround-awq-nomarlin"
    model, _ = build(served_ckpt, as_h100)  # no refusal
    experts = model.model.layers[4].moe.experts
    assert method(experts) == "MoeWNA16Method" and experts.quant_method.quant_config.has_zp
    assert experts.moe_runner_config.gemm1_clamp_limit == model.config.swiglu_limits[4] > 0
    assert model.model.layers[3].moe.experts.moe_runner_config.gemm1_clamp_limit is None
    for mod in (model.model.layers[0].self_attn.qkv_proj, model.model.layers[4].moe.share_expert.down_proj):
        assert method(mod) == "AWQLinearMethod" and type(mod.scheme).__name__ == "AWQLinearScheme", mod
    model.load_weights(w.items())
    assert {"model.layers.4.moe.experts.w13_qweight", "model.layers.0.self_attn.qkv_proj.qweight",
            "model.layers.3.moe.share_expert.gate_up_proj.qweight"} <= set(
        w4a16_load.assert_every_param_written("awq", model, w, main_name))
    for step in range(3):  # the MTP layers stay BF16 (extra_config's regular expression)
        mtp, _ = build(served_ckpt, as_h100, draft_idx=step)
        mtp.load_weights(w.items())
        assert not w4a16_load.assert_every_param_written("awq", mtp, w, mtp_name(n + step))
    assert guard_moe_layout(dict(tp_size=1, ep_size=1), served_cfg, "cuda", aiter=False).action != "refuse"
    d = guard_moe_layout(dict(tp_size=1, ep_size=1), served_cfg, "rocm", aiter=False)
    assert d.action == "refuse" and "on ROCm are unverified" in d.message, d.message

    for backend in ("gptq", "gptq:marlin"):
        odd, odd_cfg = _with_config(ckpt, tmp_path, f"as-{backend.replace(':', '-')}", backend=backend)
        assert served.quant_label(odd_cfg["quantization_config"]) == "autoround-awq-as-gptq"
        with pytest.raises(NotServedError, match="^autoround-awq-as-gptq experts .*GPTQ's layouts"):
            build(odd, as_h100)
    sym = dict(qc, sym=True, backend="awq")
    assert served.quant_label(sym) == "autoround-awq-sym"
    for platform in ("nvidia", "amd", "cpu"):
        assert "are unverified" in served.refusal(served.QUANT, served.Setting(platform, quant="autoround-awq-sym"))


def test_autoround_awq_on_a_cpu_loads_the_references_weights(ckpts):
    """The CPU path (`sglang serve` on this machine, tests/test_quant_served.py's for the GPTQ packing): the
    model is built unquantized and the loader dequantizes AutoRound's AWQ tensors with the packing's
    dequantizer; every parameter equals the weights the fp32 reference reads (the same Dequantizer,
    stacked), rounded to the model's dtype once."""
    from test_quant_served import assert_cpu_load_is_the_references

    gpu_contract.sglang_world_of_one()
    ckpt = ckpts["autoround-awq"]
    model, _ = gpu_contract.load_like_sglang(ckpt)
    assert model.cpu_dequant is not None and model.cpu_dequant["packing_format"] == "auto_round:auto_awq"
    assert_cpu_load_is_the_references(autoround, ckpt, model)
    # Teeth: the AWQ tensors read as GPTQ's would not even pair up.
    bad = autoround.Dequantizer(dict(model.cpu_dequant, packing_format="auto_round:auto_gptq"))
    w = load_file(str(ckpt / "model.safetensors"))
    for k in [k for k in w if k.startswith("model.layers.0.self_attn.q_proj.")]:
        bad.feed(k, w[k])
    assert bad.problems()

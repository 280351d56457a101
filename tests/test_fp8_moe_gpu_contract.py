"""Block-FP8 routed experts on SGLang 0.5.23's CUDA path (Fp8MoEMethod -> Triton fused MoE), on CPU.

What an H200 runs for our FP8 MoE layers with the default MoE runner backend: SGLang's Fp8Config gives
FusedMoE its `Fp8MoEMethod`; `create_moe_runner` picks the Triton runner (no DeepEP/Mooncake/NIXL
a2a, so not DeepGEMM); `process_weights_after_loading` takes the CUDA branch of
`process_weights_after_loading_block_quant` (with the Triton runner it leaves the FP8 weights and
their block scales as loaded: the UE8M0 requant is DeepGEMM's); `apply` hands the runner
`TritonMoeQuantInfo(use_fp8_w8a8=True, block_shape=[128, 128], w13/w2 scales = weight_scale_inv)`;
the fused MoE quantizes each GEMM's input to FP8 per token and 128-group
(`sglang_per_token_group_quant_fp8`, CUDA branch) and runs `fused_moe_kernel` on FP8 x FP8 with the
block scales; Step's clamp is SGLang's `_swiglu_silu_clamp_mul(gemm1_limit)` between the GEMMs.

Here that path runs on CPU: the model is built by SGLang's loader functions with its real Fp8Config
(platform faked as CUDA for our runner policy, as in test_fp8_gpu_load.py), the checkpoint loaded,
`process_weights_after_loading` run with fp8.py's `_is_cpu` constant set to False for that call only
(on CPU the branch above would assert AMX and repack the weights for SGLang's CPU kernels); TopK
dispatches `forward_cuda`; the Triton kernels run under TRITON_INTERPRET=1 (fp8 `tl.dot` included:
the interpreter widens e4m3 to fp16 and accumulates in fp32); the two CUDA-only activation quantizers
are pure-torch stand-ins (tests/gpu_contract.py, checked below against an independent formula).
Activations are bf16, as served.

Two checkpoints: the FP8 tiny one (hidden 128 = one group: SGLang routes a whole-row group to the
per-token kernel) and a wider one (hidden and expert width 256: two 128-groups per row, the group
kernel, as the real model's 4096 / 1280 take).

Checks, strictest first:
- launch contract: captured arguments of both `invoke_fused_moe_kernel` calls (FP8 weights, their
  block scales, use_fp8_w8a8, [128, 128], bf16 compute, H200's default config), the quantizer's
  output against the specified formula, and `gemm1_limit` reaching the fused-MoE sequence;
- each GEMM: the kernel's output against the fp64 product of its own dequantized FP8 operands,
  tolerance 1e-2 relative (bf16 storage; measured 0.0077, see the test), teeth: another expert's
  scales; the clamp: the down GEMM's input is exactly Step's clamped SwiGLU of the gate/up output;
- end to end: the plain-PyTorch reference (tests/reference, fp32 on the dequantized weights, shared
  expert zeroed so `moe()` is the routed sum) without activation quantization, REL_TOL = 0.15 of
  the output's scale (measured 0.036-0.077: FP8 activation quantization, see the test); teeth:
  dropping the clamp or the block scales is >= 10x outside it.
Plus: no host sync in the forward; a swap-AB (SM90 tuned-config) launch computes the same.

Not verified here (needs an H200): SGLang's CUDA JIT quantizers themselves (the stand-ins follow
their sources; fast-math division there may move an element at an exact rounding tie by one e4m3
code); compiled Triton on SM90 (the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest,
and has no pipelining/wgmma); fused_moe.py's own CUDA-only pieces, which stay on their CPU branches
here: for unclamped layers sgl_kernel's `silu_and_mul` (here the torch fallback), and the top-k
combine (CUDA: `torch.add` for top-2; here `moe_sum_reduce_triton`); tuned-config TMA; the shared
expert's FP8 linears (Fp8LinearMethod; not run here); CUDA-graph capture itself; real widths
(4096 / 1280, 288 experts) and TP/EP layouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json

import gpu_contract
import pytest
import torch
import torch.nn.functional as F
from reference import Step35Reference
from safetensors.torch import load_file

from sglang_step35.tiny import FP8_TINY_SPEC, write_tiny_checkpoint

FP8 = torch.float8_e4m3fn
BLOCK = 128
REL_TOL = 0.15  # of max |reference output|; see test_fp8_layers_match_the_reference_on_dequantized_weights
ALIGN_MODULE = "sglang.srt.layers.moe.moe_runner.triton_utils.moe_align_block_size"
WIDE_SPEC = dataclasses.replace(FP8_TINY_SPEC, hidden_size=256, moe_intermediate_size=256)


@pytest.fixture(scope="module")
def fp8_cuda_path():
    """World-size-1 SGLang state; our platform probe answers "cuda"; SGLang's GPU MoE path on CPU."""
    with gpu_contract.sglang_gpu_moe_path() as mp:
        gpu_contract.fake_platform_probe(mp, "cuda")
        with gpu_contract.cuda_fp8_activation_quant(sm90=True):
            yield


def _quant_formula(x: torch.Tensor, group: int):
    """Dynamic FP8 activation quantization as specified (independent of the stand-ins' code): per row
    and `group` columns, scale = max|x| / 448, q = e4m3(x / scale), round to nearest even."""
    g = x.float().unflatten(-1, (-1, group))
    scale = g.abs().amax(-1, keepdim=True) / 448.0
    return (g / scale).clamp(-448, 448).to(FP8).flatten(-2), scale.squeeze(-1)


def _assert_quantized_as_specified(q, s, x, group=BLOCK):
    """q, s are `x` quantized by the formula: scales to 1 ulp (a kernel may multiply by 1/448), bytes
    equal except at the formula's exact ties (x / scale halfway between two e4m3 values, where the
    kernels' fp32 `x * (1 / scale)` or `x * (448 / amax)` and the formula's `x / scale` round apart:
    ~0.3% of bf16 inputs, whose few mantissa bits make such ratios common), and there by one code."""
    want_q, want_s = _quant_formula(x, group)
    assert q.dtype == FP8 and q.shape == x.shape and s.shape == want_s.shape
    torch.testing.assert_close(s, want_s, rtol=2.4e-7, atol=0)
    got, want = _bits(q).int(), _bits(want_q).int()
    off = got != want
    assert off.float().mean() < 0.01 and ((got - want)[off].abs() == 1).all()
    g = x.double().unflatten(-1, (-1, group))
    exact = (g * 448 / g.abs().amax(-1, keepdim=True)).flatten(-2)[off]
    torch.testing.assert_close(exact, (q.double() + want_q.double())[off] / 2, rtol=1e-9, atol=0)


class _Capture:
    """What SGLang's fused MoE hands its kernels, recorded around the real calls: each
    `invoke_fused_moe_kernel` (arguments bound by name, its output C copied after the launch), each
    activation quantization (`sglang_per_token_group_quant_fp8`: input, group, q, scales) and the
    `gemm1_limit` of each `_fused_moe_kernel_sequence`."""

    def __init__(self):
        self.gemms, self.quants, self.limits = [], [], []

    @contextlib.contextmanager
    def active(self):
        from unittest import mock

        from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels
        from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

        invoke, seq = fused_moe.invoke_fused_moe_kernel, fused_moe._fused_moe_kernel_sequence
        quant = kernels.sglang_per_token_group_quant_fp8
        sig, seq_sig = inspect.signature(invoke), inspect.signature(seq)

        def rec_invoke(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            invoke(*args, **kwargs)
            self.gemms.append(dict(bound.arguments, A=bound.arguments["A"].clone(), C=bound.arguments["C"].clone()))

        def rec_quant(x, group_size, *args, **kwargs):
            q, s = quant(x, group_size, *args, **kwargs)
            self.quants.append(dict(x=x.clone(), group=group_size, q=q.clone(), s=s.clone()))
            return q, s

        def rec_seq(*args, **kwargs):
            self.limits.append(seq_sig.bind(*args, **kwargs).arguments.get("gemm1_limit"))
            return seq(*args, **kwargs)

        with mock.patch.object(fused_moe, "invoke_fused_moe_kernel", rec_invoke), \
                mock.patch.object(kernels, "sglang_per_token_group_quant_fp8", rec_quant), \
                mock.patch.object(fused_moe, "_fused_moe_kernel_sequence", rec_seq):
            yield self


@pytest.fixture(scope="module", params=["tiny", "wide"])
def fp8_case(request, fp8_cuda_path, tmp_path_factory):
    """One FP8 checkpoint built and post-processed as on CUDA; each MoE layer run once on 5 tokens with
    the launches captured, and once on 1 token (decode)."""
    spec = FP8_TINY_SPEC if request.param == "tiny" else WIDE_SPEC
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp(f"fp8-moe-{request.param}"), seed=5, fp8=True, spec=spec)
    raw = load_file(str(ckpt / "model.safetensors"))
    model, qc = gpu_contract.load_like_sglang(ckpt)
    loaded = {i: {n: p.detach().clone() for n, p in moe.experts.named_parameters()} for i, moe in gpu_contract.moe_layers(model)}
    for _, moe in gpu_contract.moe_layers(model):
        gpu_contract.post_load_off_cpu(moe.experts)
        moe.topk._forward_method = moe.topk.forward_cuda  # what SGLang's CustomOp dispatch picks on CUDA
    cfg = json.loads((ckpt / "config.json").read_text())
    x5, x1 = gpu_contract.bf16_tokens(cfg["hidden_size"], 5, seed=11), gpu_contract.bf16_tokens(cfg["hidden_size"], 1, seed=12)
    runs = {}
    for i, moe in gpu_contract.moe_layers(model):
        with _Capture().active() as cap:
            out5 = gpu_contract.routed_output(moe, x5)
        runs[i] = dict(cap=cap, out5=out5, out1=gpu_contract.routed_output(moe, x1),
                       topk=moe.topk(x5, F.linear(x5.float(), moe.gate.weight.float())))
    deq = gpu_contract.dequantized_routed_weights(raw)
    return dict(name=request.param, raw=raw, model=model, qc=qc, loaded=loaded, cfg=cfg, x5=x5, x1=x1, runs=runs,
                ref=Step35Reference(ckpt, weights=deq),
                ref_unclamped=Step35Reference(ckpt, weights=deq, routed_clamp=False))


def _limit(cfg, i):
    limit = cfg["swiglu_limits"][i]
    return limit if limit and limit > 0 else None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8 else t


def test_stand_in_quantizers_match_the_specified_formula(fp8_cuda_path):
    """SGLang's CUDA activation quantizer (`sglang_per_token_group_quant_fp8`) on the stand-ins: a row
    of one group takes the per-token kernel, wider rows the group kernel; both give the formula's
    bytes and scales (up to its exact ties, see _assert_quantized_as_specified) and dequantize to
    within e4m3's half step (2^-4 relative) plus its subnormal step."""
    from sglang.kernels.ops.quantization.fp8_kernel import (
        sglang_per_token_group_quant_fp8,
    )

    gen = torch.Generator().manual_seed(0)
    for width in (128, 256, 512):
        x = (torch.randn(7, width, generator=gen) * torch.logspace(-3, 2, 7)[:, None]).bfloat16()
        x[3, 5] = 300.0  # one outlier: its group's scale, not its neighbours'
        q, s = sglang_per_token_group_quant_fp8(x, BLOCK)
        assert s.shape == (7, width // BLOCK)
        _assert_quantized_as_specified(q, s, x)
        back = (q.float().unflatten(-1, (-1, BLOCK)) * s[..., None]).flatten(-2)
        bound = x.float().abs() * 2**-4 + s.repeat_interleave(BLOCK, -1) * 2**-10
        assert ((back - x.float()).abs() <= bound).all()
        if width > BLOCK:  # teeth: one scale per row instead of per group is not what was computed
            assert not torch.equal(_bits(q), _bits(_quant_formula(x, width)[0]))


def test_post_load_cuda_branch_keeps_fp8_weights_and_the_triton_runner(fp8_case):
    """Fp8Config gives every routed-expert layer Fp8MoEMethod on SGLang's Triton runner; the CUDA
    branch of process_weights_after_loading leaves weights and block scales exactly as loaded (the
    checkpoint's), no AMX repack; the runner receives use_fp8_w8a8, 128x128 blocks, the block scales,
    no static activation scales; only the clamped layer carries gemm1_clamp_limit, and it reaches the
    fused-MoE sequence."""
    from sglang.srt.layers.moe import MoeRunnerBackend
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8MoEMethod

    model, cfg, raw = fp8_case["model"], fp8_case["cfg"], fp8_case["raw"]
    assert isinstance(fp8_case["qc"], Fp8Config) and model.cpu_dequant is None
    layers = gpu_contract.moe_layers(model)
    assert [i for i, _ in layers] == [2, 3, 4] and _limit(cfg, 4) and not _limit(cfg, 2) and not _limit(cfg, 3)
    for i, moe in layers:
        e, qm = moe.experts, moe.experts.quant_method
        assert type(qm) is Fp8MoEMethod and qm.runner.runner_backend is MoeRunnerBackend.TRITON
        assert not getattr(e, "use_intel_amx_backend", False)
        for name, before in fp8_case["loaded"][i].items():
            after = getattr(e, name)
            assert after.dtype == before.dtype and torch.equal(_bits(after), _bits(before)), f"layer {i}: {name}"
        p = f"model.layers.{i}.moe."
        w13 = torch.cat([raw[p + "gate_proj.weight"], raw[p + "up_proj.weight"]], 1)
        assert e.w13_weight.dtype == FP8 and torch.equal(_bits(e.w13_weight), _bits(w13))
        assert torch.equal(e.w2_weight_scale_inv, raw[p + "down_proj.weight_scale_inv"])
        info = qm.get_triton_quant_info(e)
        assert info.use_fp8_w8a8 and info.block_shape == [BLOCK, BLOCK]
        assert info.w13_scale is e.w13_weight_scale_inv and info.w2_scale is e.w2_weight_scale_inv
        assert info.a13_scale is None and info.a2_scale is None  # dynamic: quantized per call
        assert e.moe_runner_config is qm.moe_runner_config is qm.runner.config
        assert e.moe_runner_config.gemm1_clamp_limit == _limit(cfg, i)
        assert fp8_case["runs"][i]["cap"].limits == [_limit(cfg, i)]


def test_fused_moe_launches_fp8_gemms_with_block_scales(fp8_case):
    """The two kernel launches of each layer (gate/up, then down): FP8 weights with their block
    scales, use_fp8_w8a8 and 128x128 blocks, bf16 compute, H200's default block-FP8 config (no swap-AB
    at these sizes); each GEMM's input is quantized by SGLang's CUDA quantizer (the per-token kernel
    when a row is one 128-group, the group kernel otherwise) into the formula's bytes."""
    import triton.language as tl
    from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels

    for i, moe in gpu_contract.moe_layers(fp8_case["model"]):
        cap, e = fp8_case["runs"][i]["cap"], moe.experts
        assert len(cap.gemms) == 2 and len(cap.quants) == 2
        for g, w, s in zip(cap.gemms, (e.w13_weight, e.w2_weight), (e.w13_weight_scale_inv, e.w2_weight_scale_inv)):
            assert g["B"] is w and g["B_scale"] is s and w.dtype == FP8
            assert g["use_fp8_w8a8"] and g["block_shape"] == [BLOCK, BLOCK] and not g["per_channel_quant"]
            assert g["A_scale"] is None and g["A"].dtype == torch.bfloat16 and g["compute_type"] == tl.bfloat16
            c = g["config"]
            assert (c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"], c["BLOCK_SIZE_K"]) == (64, BLOCK, BLOCK)
            assert not kernels.should_enable_swap_ab(c["BLOCK_SIZE_M"], c["BLOCK_SIZE_N"])
        for g, qz in zip(cap.gemms, cap.quants):
            assert torch.equal(qz["x"], g["A"]) and qz["group"] == BLOCK
            _assert_quantized_as_specified(qz["q"], qz["s"], g["A"])
        assert not cap.gemms[0]["mul_routed_weight"] and cap.gemms[1]["mul_routed_weight"]


def _gemm_expected(g, qz, topk_ids, topk_weights, scale=None):
    """What one block-FP8 GEMM launch must write, in fp64 from its FP8 operands: row r of the sorted
    problem (token r // top_k) times its expert's dequantized weight, times the routing weight on the
    down GEMM."""
    a = (qz["q"].double().unflatten(-1, (-1, BLOCK)) * qz["s"].double()[..., None]).flatten(-2)
    w = gpu_contract.dequantize_blocks(g["B"], g["B_scale"] if scale is None else scale, BLOCK, BLOCK)
    ids = topk_ids.reshape(-1).long()
    out = torch.einsum("rk,rnk->rn", a[torch.arange(ids.numel()) // g["top_k"]], w[ids])
    if g["mul_routed_weight"]:
        out = out * topk_weights.reshape(-1, 1).double()
    return out


@pytest.mark.parametrize("gemm", [0, 1], ids=["gate_up", "down"])
def test_each_fp8_gemm_equals_its_dequantized_product(fp8_case, gemm):
    """The kernel's output equals the product of its dequantized FP8 operands to bf16 storage
    (tolerance 1e-2 relative): the kernel accumulates in fp32 (far below that) and stores bf16, which
    the Triton 3.8 interpreter does by truncation (`cast_impl` passes no rounding mode to
    `_convert_float`): up to one ulp, 2^-7 relative, measured 0.0077; a GPU rounds to nearest, half
    that. Teeth: each expert given the next one's block scales (drawn alike, yet a few % apart) is
    outside it (measured >= 0.099 relative)."""
    for i, _ in gpu_contract.moe_layers(fp8_case["model"]):
        run = fp8_case["runs"][i]
        g, qz = run["cap"].gemms[gemm], run["cap"].quants[gemm]
        ids, weights = run["topk"].topk_ids, run["topk"].topk_weights
        got = g["C"][: ids.numel()].reshape(ids.numel(), -1).double()
        want = _gemm_expected(g, qz, ids, weights)
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5, msg=lambda m, i=i: f"layer {i}: {m}")
        rolled = _gemm_expected(g, qz, ids, weights, scale=g["B_scale"].roll(1, 0))
        assert not torch.allclose(got, rolled, rtol=1e-2, atol=1e-5)


def test_clamp_is_applied_between_the_fp8_gemms(fp8_case):
    """The down GEMM's input is Step's SwiGLU of the gate/up GEMM's output: on the clamped layer
    min(silu(gate), L) * clamp(up, -L, L) exactly (SGLang's `_swiglu_silu_clamp_mul`, bf16), which
    differs from the unclamped silu(gate) * up wherever the clamp binds; on the others silu(gate) * up."""
    cfg = fp8_case["cfg"]
    for i, _ in gpu_contract.moe_layers(fp8_case["model"]):
        g1, g2 = fp8_case["runs"][i]["cap"].gemms
        rows = fp8_case["runs"][i]["topk"].topk_ids.numel()
        gate, up = g1["C"][:rows].chunk(2, dim=-1)
        plain = F.silu(gate) * up
        limit = _limit(cfg, i)
        if limit is None:
            torch.testing.assert_close(g2["A"][:rows], plain, msg=lambda m, i=i: f"layer {i}: {m}")
            continue
        clamped = F.silu(gate).clamp(max=limit) * up.clamp(-limit, limit)
        assert torch.equal(g2["A"][:rows], clamped)
        binds = (F.silu(gate) > limit) | (up.abs() > limit)
        assert binds.float().mean() > 0.1, "inputs too small for the clamp to bind"
        assert not torch.equal(plain[binds], clamped[binds])


def test_fp8_layers_match_the_reference_on_dequantized_weights(fp8_case):
    """Every FP8 MoE layer (the clamped one included) at prefill (5 tokens) and decode (1 token) sizes
    equals the fp32 reference on the dequantized weights within REL_TOL of the output's scale.
    The gap is FP8 activation quantization: each GEMM input element moves by up to 2^-4 of itself
    (e4m3's half step), twice, so outputs are off by ~5% rms; measured max |out - ref| / max |ref|:
    0.036-0.077 over both checkpoints, 1/5/16 tokens and inputs of scale 0.3-3 (0.086 at scale 3 on the
    clamped layer, where clamped outputs are small). REL_TOL = 0.15 is twice the worst at scale 1."""
    ref = fp8_case["ref"]
    for i, _ in gpu_contract.moe_layers(fp8_case["model"]):
        run = fp8_case["runs"][i]
        for x, out in ((fp8_case["x5"], run["out5"]), (fp8_case["x1"], run["out1"])):
            assert out.dtype == torch.bfloat16
            err = gpu_contract.rel_err(out, ref.moe(i, x.float()))
            assert err < REL_TOL, f"layer {i}, {x.shape[0]} tokens: {err:.3f}"


def test_dropping_the_clamp_or_the_scales_fails_the_reference(fp8_case):
    """Teeth of REL_TOL: the clamped layer computed without gemm1_clamp_limit, or with every block
    scale 1, is far from the reference (and without the clamp it is the unclamped reference)."""
    moe, ref, x = fp8_case["model"].model.layers[4].moe, fp8_case["ref"], fp8_case["x5"]
    want = ref.moe(4, x.float())
    unclamped, unit_scales = gpu_contract.without_clamp_or_scales(
        moe, x, ("w13_weight_scale_inv", "w2_weight_scale_inv"))
    assert gpu_contract.rel_err(unclamped, want) > 10 * REL_TOL
    assert gpu_contract.rel_err(unclamped, fp8_case["ref_unclamped"].moe(4, x.float())) < REL_TOL
    assert gpu_contract.rel_err(unit_scales, want) > 10 * REL_TOL
    assert torch.equal(gpu_contract.routed_output(moe, x), fp8_case["runs"][4]["out5"])  # restored


def test_fp8_moe_path_has_no_host_sync(fp8_case):
    """Decode-sized batches through every FP8 MoE layer's CUDA path (router, TopK, activation
    quantization, both GEMMs, clamp, combine): nothing makes the host wait, so CUDA graphs can capture
    it (tiny: the per-token quantizer, wide: the group one). The quantizer stand-ins and Triton
    launches are opaque, as their kernels are on a GPU."""
    for i, moe in gpu_contract.moe_layers(fp8_case["model"]):
        det = gpu_contract.HostSyncDetector()
        with gpu_contract.opaque_triton_launches(det), det:
            gpu_contract.routed_output(moe, fp8_case["x1"])
        assert det.syncs == [], f"layer {i}: host syncs {sorted(set(det.syncs))}"


def test_swap_ab_config_of_tuned_sm90_kernels_computes_the_same(fp8_case):
    """SGLang's tuned H200 configs with BLOCK_SIZE_M < 64 make the FP8 kernel swap its operands
    (`should_enable_swap_ab` on SM90). No tuned H200 config ships for Step-3.5's experts (288 of 1280,
    nor their TP/EP slices: H200 takes the default config, the other tests' path), but a tuned one
    would take this branch: under such a config each GEMM of the clamped layer still equals its
    dequantized product, and the layer the default-config result (to bf16 storage and the FP8
    requantization it can flip) and the reference."""
    from sglang.kernels.ops.moe import fused_moe_triton_kernels as kernels
    from sglang.srt.layers.moe.moe_runner.triton_utils import override_config

    tuned = {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": BLOCK, "BLOCK_SIZE_K": BLOCK, "GROUP_SIZE_M": 1,
             "num_warps": 4, "num_stages": 3}
    assert kernels.should_enable_swap_ab(tuned["BLOCK_SIZE_M"], tuned["BLOCK_SIZE_N"])
    moe, x = fp8_case["model"].model.layers[4].moe, fp8_case["x5"]
    with override_config(tuned), _Capture().active() as cap:
        out = gpu_contract.routed_output(moe, x)
    assert [g["config"]["BLOCK_SIZE_M"] for g in cap.gemms] == [16, 16]
    topk = fp8_case["runs"][4]["topk"]
    for g, qz in zip(cap.gemms, cap.quants):  # each swapped GEMM still equals its dequantized product
        got = g["C"][: topk.topk_ids.numel()].reshape(topk.topk_ids.numel(), -1).double()
        torch.testing.assert_close(got, _gemm_expected(g, qz, topk.topk_ids, topk.topk_weights), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(out, fp8_case["runs"][4]["out5"], rtol=2e-2, atol=2e-2 * float(out.abs().max()))
    assert gpu_contract.rel_err(out, fp8_case["ref"].moe(4, x.float())) < REL_TOL

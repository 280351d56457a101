"""Our decoder layer runs through SGLang's layer-boundary machinery (`append_stages` /
`declare_attn` / `declare_ffn` and the residual stream of `layer_boundary.residual.batch`), so each
norm is SGLang's fused residual add + RMSNorm, `norm(x, residual)`, the call that
`--enable-flashinfer-allreduce-fusion` and AITER's all-reduce fusion replace with one kernel. In
process, fp32, on the tiny checkpoint:

- the main model over a prompt past the sliding window, then decode steps, equals the plain
  reference (logits and the pre-norm state the MTP draft reads), every norm after the first taking
  the fused path (SGLang's GemmaRMSNorm called with a residual);
- the MTP draft layer likewise (its output, pre- and post-head-norm);
- two pipeline stages hand on SGLang's (hidden_states, residual) pair and equal the reference;
- the stages each layer declares: attention leaves its TP sum to the boundary, the FFNs too where
  one all-reduce completes them (tested in the rule `leaves_sum_to_boundary`).

Attention itself is not what is tested here: each RadixAttention is replaced by a plain causal
attention over a per-layer KV list (window as the reference counts it), so no SGLang attention
backend or KV pool is needed. Served runs: tests/test_parity_served.py, tests/test_mtp.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import gpu_contract
from sglang_step35.reference import Step35Reference
from sglang_step35.tiny import write_tiny_checkpoint

FP32_TOL = 1e-4  # as tests/test_pp_cpu.py: fp32 both sides
PROMPT = [(37 * i + 11) % 1000 + 20 for i in range(24)]  # > the tiny sliding window (16)
DECODED = [101, 202, 303]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("fused"), seed=0)


@pytest.fixture(scope="module")
def cfg(ckpt):
    from sglang_step35.config import Step35Config

    gpu_contract.sglang_world_of_one()
    return Step35Config(**json.loads((ckpt / "config.json").read_text()))


@pytest.fixture(scope="module")
def ref(ckpt):
    return Step35Reference(ckpt, dtype=torch.float32)


def _fp32(raw: dict):
    return [(k, v.float() if v.dtype == torch.bfloat16 else v) for k, v in raw.items()]


class PlainCausalAttention(nn.Module):
    """Stands in for one layer's RadixAttention: appends this call's k/v to its own list (the
    calls are consecutive positions of one sequence) and attends causally, sliding layers over
    the last `window` keys including the query's own (the reference's convention)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, window: int):
        super().__init__()
        self.h, self.kvh, self.d, self.window = num_heads, num_kv_heads, head_dim, window
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []

    def forward(self, q, k, v, forward_batch, save_kv_cache: bool = True):  # noqa: ARG002
        t = q.shape[0]
        self.k.append(k.reshape(t, self.kvh, self.d))
        self.v.append(v.reshape(t, self.kvh, self.d))
        keys, values = torch.cat(self.k), torch.cat(self.v)
        n = keys.shape[0]
        group = self.h // self.kvh
        keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", q.reshape(t, self.h, self.d), keys) * self.d**-0.5
        qp, kp = torch.arange(n - t, n)[:, None], torch.arange(n)[None, :]
        allowed = kp <= qp
        if self.window:
            allowed &= kp > qp - self.window
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hqk,khd->qhd", p, values).reshape(t, self.h * self.d)


def _plain_attention(layer, config, index: int) -> None:
    from sglang_step35.config import layer_spec

    a = layer.self_attn
    a.attn = PlainCausalAttention(a.num_heads, a.num_kv_heads, a.head_dim, layer_spec(config, index).window)


def _batch(capture: bool, decode: bool = False):
    """The ForwardBatch fields the layer boundaries and our model read (the attention is plain)."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardMode

    mode = CaptureHiddenMode.FULL if capture else CaptureHiddenMode.NULL
    return SimpleNamespace(residual_stream=None, capture_hidden_mode=mode, spec_info=None, attn_cp_metadata=None,
                           forward_mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND)


@pytest.fixture()
def fused_norm_calls(monkeypatch):
    """Every call of SGLang's GemmaRMSNorm (the class our norms are), recorded as (the norm module,
    whether it got a residual), then run as SGLang runs it."""
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    calls: list[tuple[nn.Module, bool]] = []
    original = GemmaRMSNorm.forward

    def recording(self, x, residual=None, *args, **kwargs):
        calls.append((self, residual is not None))
        return original(self, x, residual, *args, **kwargs)

    monkeypatch.setattr(GemmaRMSNorm, "forward", recording)
    return calls


def _residual_norms(model: nn.Module, calls) -> list[tuple[str, bool]]:
    """The calls of the norms on the residual stream (not the per-head q/k norms), by name."""
    names = {id(m): name for name, m in model.named_modules()}
    return [(names[id(m)], fused) for m, fused in calls if not names[id(m)].endswith(("q_norm", "k_norm"))]


def _build(cls, *args, **kwargs):
    from sglang.srt.runtime_context import get_context

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with get_context().override_server_args(device="cpu"):
            return cls(*args, **kwargs)
    finally:
        torch.set_default_dtype(old)


def test_main_model_prefill_and_decode_equal_the_reference_through_fused_add_norm(cfg, ckpt, ref, fused_norm_calls):
    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    model = _build(Step3p5ForCausalLM, cfg)
    model.load_weights(_fp32(load_file(str(ckpt / "model.safetensors"))))
    from sglang.srt.layers.layernorm import GemmaRMSNorm

    # The weight the fused and all-reduce-fused kernels read (1 + w) follows the loaded weight.
    for name, m in model.named_modules():
        if isinstance(m, GemmaRMSNorm):
            torch.testing.assert_close(m.gemma_weight, m.weight + 1, rtol=0, atol=0, msg=name)
    for i, layer in enumerate(model.model.layers):
        _plain_attention(layer, cfg, i)
    head = model.lm_head.weight
    n = cfg.num_hidden_layers

    seq = list(PROMPT)
    with torch.no_grad():
        normed, pre_norm = model.model(torch.tensor(seq), torch.arange(len(seq)), _batch(capture=True))
    torch.testing.assert_close(normed @ head.t(), ref.logits(seq), atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(pre_norm, ref.hidden_states(seq), atol=FP32_TOL, rtol=FP32_TOL)
    # Per layer two norms, then the final one: only the stack's first norm has no residual to add.
    expected = [(f"model.layers.{i}.{norm}", (i, norm) != (0, "input_layernorm"))
                for i in range(n) for norm in ("input_layernorm", "post_attention_layernorm")]
    expected.append(("model.norm", True))
    assert _residual_norms(model, fused_norm_calls) == expected

    for tok in DECODED:  # one decode step each: one new token at the next position
        seq.append(tok)
        fused_norm_calls.clear()
        with torch.no_grad():
            normed, pre_norm = model.model(torch.tensor([tok]), torch.tensor([len(seq) - 1]), _batch(capture=False, decode=True))
        assert pre_norm is None  # nothing captures it: no snapshot add
        torch.testing.assert_close(normed @ head.t(), ref.logits(seq)[-1:], atol=FP32_TOL, rtol=FP32_TOL)
        assert _residual_norms(model, fused_norm_calls) == expected


def test_pipeline_stages_hand_on_hidden_states_and_residual_and_equal_the_reference(cfg, ckpt, ref):
    """PP 2 (stage 0: layers 0-1, stage 1: layers 2-4, as SGLang's get_pp_indices splits the tiny
    model): stage 0 sends SGLang's pair (the last FFN's output and the residual it is owed, as the
    built-in sends it), stage 1 takes it up with `from_pp`; the logits equal the reference."""
    from sglang.srt.runtime_context import get_parallel

    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    raw = _fp32(load_file(str(ckpt / "model.safetensors")))
    stages = []
    for rank in (0, 1):
        pp_group = SimpleNamespace(world_size=2, rank_in_group=rank, is_first_rank=rank == 0, is_last_rank=rank == 1,
                                   ranks=[0, 1], unique_name="pp", cpu_group=None, device_group=None)  # fmt: skip
        with get_parallel().override(pp_group=pp_group, pp_rank=rank, pp_size=2):
            stage = _build(Step3p5ForCausalLM, cfg)
        stage.load_weights(raw)
        for i in range(stage.start_layer, stage.end_layer):
            _plain_attention(stage.model.layers[i], cfg, i)
        stages.append(stage)
    assert [(s.start_layer, s.end_layer) for s in stages] == [(0, 2), (2, 5)]
    ids, pos = torch.tensor(PROMPT), torch.arange(len(PROMPT))
    with torch.no_grad():
        sent = stages[0].model(ids, pos, _batch(capture=False))
        assert set(sent.tensors) == {"hidden_states", "residual"}
        # What crosses is the pair whose sum is layer 1's output.
        torch.testing.assert_close(sent["hidden_states"] + sent["residual"],
                                   ref.decoder_layer(1, ref.decoder_layer(0, ref.embed(PROMPT), pos), pos),
                                   atol=FP32_TOL, rtol=FP32_TOL)
        normed, _ = stages[1].model(None, pos, _batch(capture=False), pp_proxy_tensors=sent)
    torch.testing.assert_close(normed @ stages[1].lm_head.weight.t(), ref.logits(PROMPT), atol=FP32_TOL, rtol=FP32_TOL)


class HandedOn(nn.Module):
    """Stands in for the MTP draft's LogitsProcessor: (logits of the normed state, the pre-norm
    state handed to the next draft step)."""

    def forward(self, input_ids, normed, head, forward_batch, hidden_states_before_norm=None):  # noqa: ARG002
        return normed @ head.weight.t(), hidden_states_before_norm


def test_mtp_draft_layer_equals_the_reference_through_fused_add_norm(cfg, ckpt, ref, fused_norm_calls):
    from sglang_step35.models.step3p5_mtp import Step3p5MTP

    mtp = _build(Step3p5MTP, cfg, draft_model_idx=0)
    mtp.load_weights(_fp32(load_file(str(ckpt / "model.safetensors"))))
    _plain_attention(mtp.layer, cfg, mtp.layer_index)
    # The logits processor's inputs are what the draft hands on: (normed, pre-norm).
    mtp.logits_processor = HandedOn()

    trunk = ref.hidden_states(PROMPT)
    t = len(PROMPT) - 1
    batch = _batch(capture=True)
    batch.spec_info = SimpleNamespace(hidden_states=trunk[:t])
    fused_norm_calls.clear()
    with torch.no_grad():
        logits, state = mtp(torch.tensor(PROMPT[1:]), torch.arange(t), batch)
    want_state = ref.mtp_states(PROMPT, trunk)[0]
    torch.testing.assert_close(state, want_state, atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(logits, ref.mtp_head(0, want_state), atol=FP32_TOL, rtol=FP32_TOL)
    # enorm, hnorm (plain), then the layer's input norm (the stack's first), its post-attention
    # norm and the head norm, both fused with the residual add.
    assert _residual_norms(mtp, fused_norm_calls) == [
        ("enorm", False), ("hnorm", False), ("layer.input_layernorm", False),
        ("layer.post_attention_layernorm", True), ("shared_head_norm", True)]


def test_each_layer_declares_sglang_stages_that_leave_its_sums_to_the_boundary(cfg):
    from sglang.srt.layers.layer_boundary import ProducerReduction, StageKind

    from sglang_step35.models.step3p5 import Step35DecoderLayer

    for i in range(cfg.num_hidden_layers):
        attn, ffn = Step35DecoderLayer.stage_facts(cfg, None, i)
        assert attn.kind is StageKind.ATTENTION and attn.reduction is ProducerReduction.ALWAYS_PARTIAL
        assert ffn.kind is StageKind.FFN
        # TP 1 here: the MoE completes its own (trivial) sum; the dense SwiGLU never does.
        assert ffn.sparse == (i in ref_moe_layers(cfg)) and ffn.output_complete == ffn.sparse


def ref_moe_layers(cfg) -> set[int]:
    return {int(s) for s in str(cfg.moe_layers_enum).split(",") if s.strip()}


@pytest.mark.parametrize(
    "routed_complete, shared_replicated, tp, group_size, moe_dp, leaves",
    [
        (False, False, 4, 4, 1, True),  # standard dispatcher, TP-split shared expert: one TP all-reduce
        (False, False, 1, 1, 1, False),  # TP 1: nothing to sum
        (True, True, 4, 4, 1, False),  # a2a: the combine already completed it
        (False, True, 8, 8, 1, False),  # replicated shared expert is added after the sum
        (False, False, 4, 2, 1, False),  # the MoE output reduces over a smaller group than TP
        (False, False, 4, 4, 2, False),  # MoE DP: not the TP ranks
    ],
)
def test_moe_leaves_its_sum_to_the_boundary_only_where_one_tp_all_reduce_completes_it(
    monkeypatch, routed_complete, shared_replicated, tp, group_size, moe_dp, leaves
):
    from sglang_step35.models import step3p5_moe

    layout = SimpleNamespace(routed_output_complete=routed_complete, shared_expert_replicated=shared_replicated)
    monkeypatch.setattr(step3p5_moe, "get_parallel", lambda: SimpleNamespace(moe_dp_size=moe_dp))
    monkeypatch.setattr(step3p5_moe, "post_experts_reduction_group", lambda: SimpleNamespace(world_size=group_size))
    assert step3p5_moe.leaves_sum_to_boundary(layout, tp) is leaves

"""The all-to-all MoE contract (`--moe-a2a-backend deepep` / `mori`), on CPU.

Our `Step35MoE` built as one rank of TP2/EP2 under an a2a backend: the shared expert is
   replicated, the experts see only this rank's attention-TP slice of the tokens, there is no
   all-reduce, and the slices gathered back equal the reference. SGLang's DeepEP dispatcher needs
   GPUs and the deep_ep library, so the experts are replaced by the contract SGLang's dispatcher
   gives (`FusedMoE.forward_impl`: dispatch this rank's tokens, combine returns their complete
   weighted sum over all experts), computed by the reference on the token rows it receives (the
   simulated-EP reference's a2a dispatch/combine, tests/reference/ep_reference.py).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from reference.ep_reference import MoEWeights, moe_forward, route, routed_partial, shared_expert
import gpu_contract


# ---------------------------------------------------------------- our MoE block under a2a

H, E, INTER, S, K, TP = 16, 4, 8, 8, 2, 2


@pytest.fixture(scope="module")
def sglang_state():
    gpu_contract.sglang_world_of_one()


def _config():
    from sglang_step35.config import Step35Config
    from sglang_step35.tiny import TinySpec, tiny_config

    spec = TinySpec(hidden_size=H, num_experts=E, top_k=K, moe_intermediate_size=INTER, share_expert_dim=S,
                    routed_limit=0.0, shared_limit=0.0)  # fmt: skip
    cfg = tiny_config(spec, 64, {"<|endoftext|>": 0, "<|im_end|>": 1})
    cfg.update(moe_router_scaling_factor=3.0)
    return Step35Config(**cfg)


@contextlib.contextmanager
def _as_rank(rank: int):
    """SGLang's parallel state as rank `rank` of TP2 = EP2 with --moe-a2a-backend deepep sees it."""
    from sglang.srt.runtime_context import get_context, get_parallel

    group = SimpleNamespace(world_size=TP, rank_in_group=rank, ranks=list(range(TP)), unique_name="tp",
                            cpu_group=None, device_group=None)  # fmt: skip
    one = SimpleNamespace(world_size=1, rank_in_group=0, ranks=[rank], unique_name="moe_tp", cpu_group=None, device_group=None)
    with get_context().override_server_args(device="cpu", tp_size=TP, ep_size=TP, moe_a2a_backend="deepep"), \
            get_parallel().override(tp_group=group, attn_tp_group=group, moe_ep_group=group, moe_tp_group=one,
                                    tp_rank=rank, attn_tp_rank=rank, moe_ep_rank=rank, moe_tp_rank=0):  # fmt: skip
        yield


def _build_rank(rank: int, monkeypatch, cfg, w: MoEWeights):
    import sglang.srt.layers.moe.fused_moe_triton.layer as fused_layer
    import sglang_step35.models.step3p5_moe as moe_mod
    from sglang_step35.config import layer_spec, moe_layer_ids

    gpu_contract.fake_platform_probe(monkeypatch, "cuda")
    # SGLang's DeepEP dispatcher needs GPUs; the experts' forward is replaced below.
    monkeypatch.setattr(fused_layer, "create_moe_dispatcher", lambda *a, **k: None)
    layer = sorted(moe_layer_ids(cfg))[0]
    from sglang.srt.layers.moe.utils import DeepEPMode, MoeA2ABackend
    from sglang.srt.runtime_context import get_flags

    # What SGLang's initialize_moe_config() seeds from --moe-a2a-backend deepep (restored afterwards).
    monkeypatch.setattr(get_flags().moe, "a2a_backend", MoeA2ABackend.DEEPEP)
    monkeypatch.setattr(get_flags().moe, "deepep_mode", DeepEPMode.AUTO)
    with _as_rank(rank):
        moe = moe_mod.Step35MoE(cfg, layer_spec(cfg, layer), None, prefix=f"model.layers.{layer}.moe")
    with torch.no_grad():
        moe.gate.weight.copy_(w.router.float())
        moe.router_bias.copy_(w.router_bias.float())
        moe.share_expert.gate_up_proj.weight.copy_(torch.cat([w.shared_gate, w.shared_up]).float())
        moe.share_expert.down_proj.weight.copy_(w.shared_down.float())
    return moe


def test_our_block_under_a2a_slices_tokens_completes_without_all_reduce(sglang_state, monkeypatch):
    import sglang_step35.models.step3p5_moe as moe_mod

    cfg = _config()
    w = MoEWeights.random(num_experts=E, top_k=K, hidden=H, intermediate=INTER, shared=S, limit=0.0, shared_limit=0.0,
                          scaling=3.0, seed=3, dtype=torch.float32)  # fmt: skip
    x = torch.randn(6, H, generator=torch.Generator().manual_seed(0))
    ref = moe_forward(x, w)

    def no_all_reduce(t):
        raise AssertionError("all-reduce after a complete a2a combine")

    monkeypatch.setattr(moe_mod, "tensor_model_parallel_all_reduce", no_all_reduce)
    ranks = [_build_rank(r, monkeypatch, cfg, w) for r in range(TP)]
    for moe in ranks:
        assert moe.layout.shared_expert_replicated and moe.layout.tokens_on_attn_tp_slice
        assert tuple(moe.share_expert.gate_up_proj.weight.shape) == (2 * S, H)  # whole, not S/TP
        assert moe.experts.num_local_experts == E // TP

    received, locals_ = {}, {}
    for r, moe in enumerate(ranks):

        def a2a_experts(hidden_states, topk_output, _r=r):
            # SGLang's dispatcher contract: this rank's tokens in, their complete routed sum out.
            received[_r] = hidden_states.clone()
            ids, weights = route(hidden_states, w)
            assert torch.equal(topk_output.topk_ids.long(), ids), "our router disagrees with the reference"
            return routed_partial(hidden_states, w, topk_output.topk_ids.long(), topk_output.topk_weights)

        monkeypatch.setattr(moe.experts, "forward", a2a_experts)

    def gather(local, owned=False):
        locals_[current] = local
        return torch.cat([locals_.get(i, torch.zeros_like(local)) for i in range(TP)])

    monkeypatch.setattr(moe_mod, "attn_tp_gather", gather)
    outs = []
    for current, moe in enumerate(ranks):
        with _as_rank(current):
            outs.append(moe(x.clone()))
    for r in range(TP):
        torch.testing.assert_close(received[r], x.tensor_split(TP)[r])  # only its own slice was dispatched
        torch.testing.assert_close(locals_[r], ref.tensor_split(TP)[r], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[-1], ref, atol=1e-5, rtol=1e-5)  # gathered: every token, shared once
    # The shared expert counted once: the reference without it is far off.
    assert (outs[-1] - (ref - shared_expert(x, w))).abs().max() > 1e-2

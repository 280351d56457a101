"""Step-3.5's feed-forward blocks: the dense SwiGLU MLP (with the per-layer clamp) and the MoE block
(sigmoid router, routed experts on SGLang's FusedMoE, the always-on shared expert).

Where the MoE block's tokens and shared expert live is decided by one rule,
:func:`sglang_step35.moe.layout.moe_block_layout` (the launch guard and ``step35 plan`` read it too):

* SGLang's standard dispatcher: every rank routes every token; the routed output is a partial sum
  over this rank's experts (and its slice of their intermediate) and one TP all-reduce completes it.
  The shared expert is TP-split (its partial sum rides in the same all-reduce) or, where a TP split
  would cut its quantization blocks (FP8 on 4 or 8 GPUs), replicated with SGLang's
  ``parallel_group="replicated"`` and added once, after the all-reduce.
* An all-to-all backend (``--moe-a2a-backend deepep`` / ``mori``): each attention-TP rank routes
  only its slice of the (attention-TP padded) tokens, as SGLang's layer boundaries hand an a2a MoE
  its input (``attn_tp_slice``); the dispatcher's combine returns those tokens' complete output, so
  there is no all-reduce; the replicated shared expert runs on the same slice; the slices are
  all-gathered back (``attn_tp_gather``) for the decoder layer, which holds every token. Clamped
  layers follow the same contract; whether their runner keeps Step's clamp there is
  :func:`sglang_step35.moe.policy.a2a_refusal`'s question (today: no, so they are refused).

Split out of ``step3p5.py`` so this layout lives next to the code it governs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce
from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.layer_boundary.adapters.attention import attn_tp_gather, attn_tp_slice
from sglang.srt.layers.linear import MergedColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from sglang.srt.layers.moe import get_moe_a2a_backend, get_moe_runner_backend
from sglang.srt.layers.moe.utils import post_experts_reduction_group
from sglang.srt.layers.moe.ep_moe.layer import get_moe_impl_class
from sglang.srt.layers.moe.topk import TopK
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix

from sglang_step35 import ops
from sglang_step35.config import LayerSpec
from sglang_step35.models.expert_compute import experts_forward_loop
from sglang_step35.moe.layout import moe_block_layout
from sglang_step35.moe.policy import RoutedRunner, routed_plan
from sglang_step35.moe.quant import quant_spec_of
from sglang_step35.moe.runner import clamp_honouring_method
from sglang_step35.platform import current_platform


def expert_location_settings() -> dict:
    """SGLang's expert-location flags in effect (``get_exec().moe``; the built-in class reads
    ``ep_num_redundant_experts`` there too). Outside a server (nothing published) their defaults."""
    from sglang.srt.runtime_context import get_exec

    try:
        moe = get_exec().moe
    except ValueError:  # "config namespace 'exec' not published": a model built outside a server
        return {}
    return dict(
        ep_num_redundant_experts=int(moe.ep_num_redundant_experts or 0),
        enable_eplb=bool(moe.enable_eplb),
        init_expert_location=str(moe.init_expert_location or "trivial"),
    )


def leaves_sum_to_boundary(layout, tp_size: int) -> bool:
    """Whether the MoE block, inside our decoder layer, hands SGLang's layer boundary its partial
    sum (declared with `declare_ffn(output_complete=False)`), so the boundary completes it, fused
    with the next residual add + RMSNorm where `--enable-flashinfer-allreduce-fusion` / AITER's
    fusion apply. Only where that sum is one all-reduce of (routed + TP-split shared expert) over
    exactly the TP ranks, the group SGLang's boundary reduces an MoE output over
    (`post_experts_reduction_group`). Otherwise (a2a combine already complete, a replicated shared
    expert added after the sum, EP and MoE-TP reduced in two groups, TP 1) the block completes its
    own output and the boundary owes nothing."""
    if tp_size == 1 or layout.routed_output_complete or layout.shared_expert_replicated:
        return False
    parallel = get_parallel()
    return parallel.moe_dp_size == 1 and post_experts_reduction_group().world_size == tp_size


def moe_leaves_sum(config, quant_config: Optional[QuantizationConfig]) -> bool:
    """`leaves_sum_to_boundary` for a config, without building the block: the decoder layer's stage
    declaration (which other pipeline ranks rebuild from the config alone) needs it."""
    tp_size = get_parallel().tp_size
    layout = moe_block_layout(
        a2a_backend=get_moe_a2a_backend(), quant=quant_spec_of(quant_config),
        share_expert_dim=int(config.share_expert_dim), tp_size=tp_size,
    )
    return leaves_sum_to_boundary(layout, tp_size)


class Step35MLP(nn.Module):
    """SwiGLU `down(act(gate(x)) * up(x))`; with limit L: act = min(silu(gate), L), up = clamp(up, ±L)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        swiglu_limit: float,
        quant_config: Optional[QuantizationConfig],
        reduce_results: bool = True,
        prefix: str = "",
        parallel_group: str = "tp",
    ):
        super().__init__()
        # parallel_group="replicated": SGLang's linears keep the whole weight (tp_size 1) on every rank.
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size] * 2, bias=False, quant_config=quant_config,
            parallel_group=parallel_group, prefix=add_prefix("gate_up_proj", prefix),
        )
        self.down_proj = RowParallelLinear(
            intermediate_size, hidden_size, bias=False, quant_config=quant_config,
            reduce_results=reduce_results, parallel_group=parallel_group, prefix=add_prefix("down_proj", prefix),
        )
        self.swiglu_limit = swiglu_limit
        # SGLang's SiluAndMul has no clamp; the clamped layers use our op (a Triton kernel on GPU).
        self.act = SiluAndMul() if swiglu_limit <= 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        h = self.act(gate_up) if self.act is not None else ops.swiglu_clamp(gate_up, self.swiglu_limit)
        out, _ = self.down_proj(h)
        return out


class Step35MoE(nn.Module):
    """Routed experts (sigmoid router, bias for selection only) + the always-on shared expert."""

    def __init__(
        self, config, spec: LayerSpec, quant_config: Optional[QuantizationConfig], prefix: str = "",
        in_layer_boundary: bool = False,
    ):
        super().__init__()
        self.tp_size = get_parallel().tp_size
        # in_layer_boundary: built by our decoder layer, whose SGLang FFN boundary hands the block this
        # rank's rows (attn_tp_slice under a2a, gathered back at its exit) and takes its sum where
        # `leaves_sum_to_boundary` says so. Standalone, the block slices and sums itself.
        self.in_layer_boundary = in_layer_boundary
        self.num_experts = int(config.moe_num_experts)
        self.top_k = int(config.moe_top_k)
        self.scaling = float(getattr(config, "moe_router_scaling_factor", 1.0) or 1.0)
        self.renormalize = bool(getattr(config, "norm_expert_weight", True))
        self.swiglu_limit = spec.swiglu_limit
        self.fp32_gate = bool(getattr(config, "need_fp32_gate", True))
        H = config.hidden_size

        self.gate = ReplicatedLinear(
            H, self.num_experts, bias=False, quant_config=None,
            params_dtype=torch.float32 if self.fp32_gate else None, prefix=add_prefix("gate", prefix),
        )
        self.router_bias = (
            nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32), requires_grad=False)
            if getattr(config, "use_moe_router_bias", True)
            else None
        )
        self.topk = TopK(
            top_k=self.top_k,
            layer_id=spec.index,
            renormalize=self.renormalize,
            custom_routing_function=self._route,
        )
        self.layout = moe_block_layout(
            a2a_backend=get_moe_a2a_backend(), quant=quant_spec_of(quant_config),
            share_expert_dim=int(config.share_expert_dim), tp_size=self.tp_size,
        )
        self.attn_tp_size = get_parallel().attn_tp_size
        self.leaves_sum = in_layer_boundary and leaves_sum_to_boundary(self.layout, self.tp_size)
        runner_backend = get_moe_runner_backend()
        # The allow-list (sglang_step35.served) judges the values SGLang resolved, not only the flags
        # the launch guard saw: Engine(...) skips the CLI, and SGLang may pick a runner itself.
        platform = current_platform()  # the launcher's probe; its AITER switch is SGLang's (unquant._use_aiter)
        self.plan = routed_plan(
            self.swiglu_limit, device=platform.device, ep_size=get_parallel().moe_ep_size,
            aiter=platform.aiter, quant=quant_spec_of(quant_config), a2a_backend=self.layout.a2a_backend,
            runner_backend=getattr(runner_backend, "value", runner_backend), layer_id=spec.index,
            quant_method=quant_config.get_name() if quant_config is not None else None,
            **expert_location_settings(),
        )
        self.experts = get_moe_impl_class(quant_config)(
            num_experts=self.num_experts,
            top_k=self.top_k,
            layer_id=spec.index,
            hidden_size=H,
            intermediate_size=config.moe_intermediate_size,
            quant_config=quant_config,
            reduce_results=False,
            # SGLang's Triton runner applies Step's clamp itself (see moe/policy.py).
            gemm1_clamp_limit=self.swiglu_limit if self.swiglu_limit > 0 else None,
            quant_method=clamp_honouring_method(quant_config) if self.plan.runner is RoutedRunner.FUSED_TRITON else None,
            prefix=add_prefix("experts", prefix),
        )
        # The GPU TopK dispatch picks its output format from the experts' runner; unbound it raises.
        self.topk.bind_runner_backend(
            self.experts.runner_backend, routing_method_type=self.experts.routing_method_type
        )
        self.share_expert = Step35MLP(
            H, config.share_expert_dim, spec.swiglu_limit_shared, quant_config, reduce_results=False,
            prefix=add_prefix("share_expert", prefix),
            parallel_group="replicated" if self.layout.shared_expert_replicated else "tp",
        )

    def _route(self, hidden_states, gating_output, topk, renormalize):  # noqa: ARG002 (TopK passes it by name)
        # Step's rule (not DeepSeek's grouped top-k): sigmoid scores; select by score + bias; weight
        # by the unbiased scores, renormalised, times the scaling factor.
        #
        # Why not SGLang's own TopK(scoring_func="sigmoid", correction_bias=..., routed_scaling_factor=s,
        # apply_routed_scaling_factor_on_output=True) (SGLang 0.5.23, sglang/srt/layers/moe/topk.py):
        # its GPU route (forward_cuda -> biased_topk_jit_kernel_impl -> moe_fused_gate's Triton
        # _router_triton_kernel) *is* Step's rule, but not every path SGLang takes for this model is:
        # - forward_native (TopK._torch_compile_forward, topk.py:829: 1-token batches under
        #   --enable-torch-compile) -> fused_topk_torch_native, torch.topk(sorted=False) (topk.py:1122):
        #   ties are not broken to the lowest expert, so other experts get picked (bf16 logits, zero
        #   bias: 4% of rows at randn*2 logits);
        # - the CPU engine (forward_cpu, which plugin.register() selects on GPU-less hosts):
        #   select_experts skips the JIT gate (topk.py:2977) and fused_topk calls topk_sigmoid
        #   (topk.py:1367), imported only on CUDA/HIP/XPU (topk.py:238) -> NameError; with AMX,
        #   fused_topk_cpu rejects apply_routed_scaling_factor_on_output (topk.py:1185);
        # - grouped with num_expert_group=1 instead: AITER's aiter_biased_grouped_topk asserts
        #   not apply_routed_scaling_factor_on_output (topk.py:2105) and always folds the scale;
        # - moe_fused_gate asserts a bias for sigmoid (moe_fused_gate.py:384): use_moe_router_bias=False
        #   would need a zeros tensor.
        # tests/test_router_topk.py pins each of these; bench/kernels.py ("router_vs_topk") compares.
        return ops.sigmoid_topk_route(
            ops.as_fp32(gating_output), self.router_bias, topk, self.scaling, renormalize
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every token in, every token out (the decoder layer holds them all on every TP rank)."""
        if self.in_layer_boundary:
            return self._block(x)  # the boundary already chose this rank's rows (see __init__)
        # Under a2a SGLang pads batches to a multiple of attention TP (require_attn_tp_gather ->
        # prepare_mlp_sync_batch / the CUDA-graph batch alignment); a batch that is not (SGLang's
        # --disable-attn-tp-gather) stays whole, as SGLang's UNPADDED boundary keeps it: every rank
        # then dispatches all rows and the combine still completes them. A shape test, no host sync.
        if self.layout.tokens_on_attn_tp_slice and self.attn_tp_size > 1 and x.shape[0] % self.attn_tp_size == 0:
            local = self._block(attn_tp_slice(x))
            return attn_tp_gather(local, owned=True)
        return self._block(x)

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE block on the rows this rank routes; the result is complete (summed over ranks)."""
        # The fp32 router as a plain matmul (like the built-in): ReplicatedLinear would route fp32
        # through the platform's GEMM (AITER's tgemm on ROCm), whose fp32 support is unverified.
        logits = F.linear(x.float(), ops.as_fp32(self.gate.weight)) if self.fp32_gate else self.gate(x)[0]
        topk_output = self.topk(x, logits)
        # Shared expert first: the fused MoE runs in place (FusedMoE inplace=True) and overwrites x.
        shared = self.share_expert(x)
        if self.plan.uses_fused_moe:
            routed = self.experts(x, topk_output)
        else:
            routed = experts_forward_loop(self.experts, x, topk_output, self.swiglu_limit)
        if self.layout.routed_output_complete or self.tp_size == 1:
            return routed + shared  # the a2a combine summed every expert; the shared expert is whole
        if self.leaves_sum:
            return routed + shared  # a partial sum: the layer boundary completes it (leaves_sum_to_boundary)
        if self.layout.shared_expert_replicated:
            # Whole on every rank: added after the sum, or the all-reduce would count it tp_size times.
            return tensor_model_parallel_all_reduce(routed) + shared
        return tensor_model_parallel_all_reduce(routed + shared)

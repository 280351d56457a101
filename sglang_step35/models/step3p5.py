"""Step3p5ForCausalLM for SGLang 0.5.23, built from SGLang's layers (registered via
SGLANG_EXTERNAL_MODEL_PACKAGE; the class name must stay, SGLang keys hybrid-SWA and EAGLE on it).

Naming: `Step3p5*` only where SGLang keys on the name (this class and the MTP draft's `Step3p5MTP`,
the checkpoint's architectures); everything else of ours is `Step35*`, and every environment
variable of ours starts `SGLANG_STEP35_`.

One decoder layer: h = x + Attn(norm(x)); y = h + FFN(norm(h)) with Gemma-form RMSNorms.
Attention: q/k/v -> per-head Gemma RMSNorm on q, k -> NeoX rope on the first `rotary_dim` dims
(per-layer theta, llama3 scaling on full layers only) -> causal attention (sliding layers: the last
`sliding_window` keys) -> per-head sigmoid gate -> o_proj. FFN: dense SwiGLU (layers before the MoE
range) or sigmoid-routed MoE + shared expert, each with its per-layer SwiGLU clamp.

Pipeline parallelism (`--pp-size`), as SGLang's own MoE models do it: each stage builds only its
layers `[start_layer, end_layer)` (SGLang's `make_layers` / `get_pp_indices`, which honours
SGLANG_PP_LAYER_PARTITION), the others are `PPMissingLayer`s; the embedding lives on the first stage,
the final norm and lm_head on the last. Our layers fold the residual into their output (no separate
residual stream), so a stage hands the next one `PPProxyTensors({"hidden_states": h})` alone, which
is what SGLang's pipeline sends. RadixAttention keeps the global layer id: SGLang's KV pool of a
stage is indexed `layer_id - start_layer`. The MTP draft needs the last stage's pre-norm state;
SGLang 0.5.23 cannot run Step's (multi-layer) EAGLE under PP, which `parallel_guard` refuses at launch.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Iterable, Optional, Tuple, Union

import torch
from torch import nn

from sglang.srt.layers.layer_boundary import append_stages, declare_attn, declare_ffn
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.layers.layernorm import GemmaRMSNorm
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.eplb.expert_location import ModelConfigForExpertLocation
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.utils import PPMissingLayer
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, PPProxyTensors
from sglang.srt.runtime_context import get_parallel
from sglang.srt.models.utils import WeightsMapper
from sglang.srt.utils import add_prefix, make_layers

from sglang_step35.launch.marker import require_launch_policy
from sglang_step35 import ops
from sglang_step35.checkpoint import layer_index
from sglang_step35.attention import model_radix_sliding_window_size, model_runner_sliding_window_size
from sglang_step35.config import LayerSpec, layer_spec, validate
from sglang_step35.models.quant_build import quant_config_to_build
from sglang_step35.models.weights import load_step3p5_weights
from sglang_step35.quant import attention_quant_config, g_proj_quant_config
from sglang_step35.models.step3p5_moe import Step35MLP, Step35MoE, moe_leaves_sum

logger = logging.getLogger(__name__)  # under "sglang_step35", whose handler plugin.py installs


class Step35Attention(nn.Module):
    def __init__(
        self, config, spec: LayerSpec, quant_config: Optional[QuantizationConfig], prefix: str = "",
        draft: bool = False,
    ):
        super().__init__()
        tp = get_parallel().attn_tp_size
        H = config.hidden_size
        self.head_dim = spec.head_dim
        self.num_heads = spec.num_heads // tp
        self.num_kv_heads = max(1, spec.num_kv_heads // tp)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            H, self.head_dim, spec.num_heads, spec.num_kv_heads, bias=False, quant_config=quant_config,
            prefix=add_prefix("qkv_proj", prefix),
        )
        # reduce_results=False: the attention's sum is left to SGLang's layer boundary (declare_attn's
        # ALWAYS_PARTIAL), which completes it fused with the residual add + post-attention norm.
        self.o_proj = RowParallelLinear(
            spec.num_heads * self.head_dim, H, bias=False, quant_config=quant_config, reduce_results=False,
            prefix=add_prefix("o_proj", prefix),
        )
        # One gate logit per query head, split with the heads under TP. Quantized only where the
        # checkpoint's format quantizes it (sglang_step35.quant.g_proj_quant_config).
        self.g_proj = ColumnParallelLinear(
            H, spec.num_heads, bias=False, quant_config=g_proj_quant_config(quant_config, config),
            prefix=add_prefix("g_proj", prefix),
        )
        self.use_gate = bool(getattr(config, "use_head_wise_attn_gate", True))
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim,
            rotary_dim=spec.rotary_dim,
            max_position=config.max_position_embeddings,
            base=spec.rope_theta,
            is_neox_style=True,
            rope_scaling=dict(config.rope_scaling) if spec.use_rope_scaling else None,
        )
        self.attn = RadixAttention(
            self.num_heads,
            self.head_dim,
            self.head_dim**-0.5,
            num_kv_heads=self.num_kv_heads,
            layer_id=spec.index,
            # The config counts the query's own key in the window (HF convention); what SGLang's
            # sliding_window_size means differs per attention backend (attention/window.py).
            sliding_window_size=model_radix_sliding_window_size(spec.window, draft) if spec.window else -1,
            quant_config=attention_quant_config(quant_config, config),
            prefix=add_prefix("attn", prefix),
        )

    def _head_norm(self, x: torch.Tensor, norm: GemmaRMSNorm) -> torch.Tensor:
        t = x.shape[0]
        return norm(x.reshape(-1, self.head_dim)).reshape(t, -1)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self._head_norm(q, self.q_norm)
        k = self._head_norm(k, self.k_norm)
        q, k = self.rotary_emb(positions, q, k)
        out = self.attn(q, k, v, forward_batch)
        if self.use_gate:
            gate, _ = self.g_proj(x)
            # inplace: the attention output is ours alone; on CPU the gate then costs the built-in's ops.
            out = ops.head_gate(out, gate, self.num_heads, inplace=True)
        out, _ = self.o_proj(out)
        return out


class Step35DecoderLayer(nn.Module):
    def __init__(
        self, config, layer_id: int, quant_config: Optional[QuantizationConfig], prefix: str = "",
        draft: bool = False,
    ):
        super().__init__()
        spec = layer_spec(config, layer_id)
        H = config.hidden_size
        self.input_layernorm = GemmaRMSNorm(H, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(H, config.rms_norm_eps)
        # draft: an MTP layer, whose runner may use --speculative-draft-attention-backend.
        self.self_attn = Step35Attention(
            config, spec, quant_config, prefix=add_prefix("self_attn", prefix), draft=draft
        )
        self.is_moe = spec.is_moe
        if spec.is_moe:
            self.moe = Step35MoE(config, spec, quant_config, prefix=add_prefix("moe", prefix), in_layer_boundary=True)
        else:
            # reduce_results=False: the boundary completes the dense FFN's TP sum (see stage_facts).
            self.mlp = Step35MLP(
                H, config.intermediate_size, spec.swiglu_limit_shared, quant_config, reduce_results=False,
                prefix=add_prefix("mlp", prefix),
            )
        # The residual stream between stages is SGLang's (layer_boundary): each norm reads
        # `norm(x, residual)` -> (normed, x + residual), SGLang's fused add + RMSNorm, and where the
        # previous stage left a TP sum, the all-reduce fusions (--enable-flashinfer-allreduce-fusion,
        # AITER's) complete it in the same kernel. Gemma-form norms ((1 + w), fp32 math) as before.
        attn, ffn = self.stage_facts(config, quant_config, layer_id)
        self.attn_boundary, self.ffn_boundary = append_stages(
            (attn, self.input_layernorm), (ffn, self.post_attention_layernorm)
        )

    @staticmethod
    def stage_facts(config, quant_config: Optional[QuantizationConfig], layer_id: int):
        """The stages layer `layer_id` declares, without building it: SGLang's make_layers binds a
        neighbouring pipeline stage's layers from this (and checks each built layer against it).
        Attention: its o_proj sum is always left to the FFN's input (ALWAYS_PARTIAL). FFN: the dense
        SwiGLU leaves its TP sum to the boundary; the MoE block does where `moe_leaves_sum` says."""
        def sparse(i: int) -> bool:
            return i < int(config.num_hidden_layers) and layer_spec(config, i).is_moe

        is_moe = sparse(layer_id)
        return (
            declare_attn(),
            declare_ffn(
                sparse=is_moe, next_layer_sparse=sparse(layer_id + 1),
                output_complete=is_moe and not moe_leaves_sum(config, quant_config),
            ),
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """x: this layer's input as the residual stream (forward_batch.residual_stream) holds it; the
        output likewise (the FFN's contribution, its residual add deferred to the next norm)."""
        h = self.attn_boundary.prepare(x, forward_batch)
        if h.shape[0] != 0:
            h = self.self_attn(positions, h, forward_batch)
        h = self.attn_boundary.finish(h, forward_batch)
        h = self.ffn_boundary.prepare(h, forward_batch)
        h = self.moe(h) if self.is_moe else self.mlp(h)
        return self.ffn_boundary.finish(h, forward_batch)


class Step35Model(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""):
        super().__init__()
        self.config = config
        self.pp_group = get_parallel().pp_group
        if self.pp_group.is_first_rank:
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, prefix=add_prefix("embed_tokens", prefix)
            )
        else:
            self.embed_tokens = PPMissingLayer()
        # Main layers only: the MTP layers stored after them belong to Step3p5MTP. This stage's
        # range comes from SGLang (get_pp_indices), the same split its KV pool and runner use.
        self.layers, self.start_layer, self.end_layer = make_layers(
            config.num_hidden_layers,
            lambda idx, prefix: Step35DecoderLayer(config, idx, quant_config, prefix=prefix),
            pp_rank=self.pp_group.rank_in_group,
            pp_size=self.pp_group.world_size,
            prefix=add_prefix("layers", prefix),
            stage_facts=partial(Step35DecoderLayer.stage_facts, config, quant_config),
        )
        if self.pp_group.is_last_rank:
            self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.norm = PPMissingLayer()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
    ) -> Union[tuple[torch.Tensor, torch.Tensor], PPProxyTensors]:
        """Last stage: (normed hidden states, pre-norm hidden states); MTP drafts from the latter.
        Any other stage: the proxy tensors for the next one."""
        if self.pp_group.is_first_rank:
            h = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
            residual_batch.start(forward_batch)
        else:
            if pp_proxy_tensors is None:
                raise RuntimeError(
                    f"Step35Model pipeline stage {self.pp_group.rank_in_group} (layers "
                    f"{self.start_layer}-{self.end_layer - 1}) got no pp_proxy_tensors from the previous stage")
            # hidden_states + residual, as residual_batch.to_pp sent them.
            h = self.layers[self.start_layer].attn_boundary.from_pp(pp_proxy_tensors, forward_batch)
        for i in range(self.start_layer, self.end_layer):
            h = self.layers[i](positions, h, forward_batch)
        if not self.pp_group.is_last_rank:
            return residual_batch.to_pp(h, forward_batch)
        h = residual_batch.complete_output(h, forward_batch)
        # The pre-norm state (output + residual) only where the logits processor keeps it: a batch
        # that captures hidden states (MTP/EAGLE drafting, --return-hidden-states).
        mode = getattr(forward_batch, "capture_hidden_mode", None)
        pre_norm = residual_batch.snapshot(h, forward_batch) if mode is not None and mode.need_capture() else None
        return residual_batch.final_norm(h, forward_batch, self.norm), pre_norm


class Step3p5ForCausalLM(nn.Module):
    def __init__(self, config, quant_config: Optional[QuantizationConfig] = None, prefix: str = ""):
        super().__init__()
        require_launch_policy(type(self).__name__, config)  # its checks decided this launch (launch/marker.py)
        validate(config, tp_size=get_parallel().attn_tp_size)
        self.config = config
        # A quantized checkpoint whose SGLang kernels cannot run here (block FP8 on a CPU without AMX,
        # W8A8-INT8, ... on any CPU): build unquantized and let the loader dequantize (models/weights.py).
        self.cpu_dequant, quant_config = quant_config_to_build(quant_config, config)
        self.quant_config = quant_config
        self.pp_group = get_parallel().pp_group
        self.model = Step35Model(config, quant_config, prefix=add_prefix("model", prefix))
        # Step-3.5 does not tie its head to the embedding: each lives on its own stage alone.
        if self.pp_group.is_last_rank:
            self.lm_head = ParallelLMHead(
                config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=add_prefix("lm_head", prefix)
            )
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(config)
        # Fixed with the layers' values, for the backends in effect now (see get_attention_sliding_window_size).
        self.runner_sliding_window = model_runner_sliding_window_size(int(config.sliding_window))
        logger.info("serving with model class %s.%s", __name__, type(self).__name__)

    def get_attention_sliding_window_size(self) -> int:
        """SGLang's runner-level window (model_runner.sliding_window_size): flashinfer's decode and
        triton's read it instead of the layers' value (attention/window.py)."""
        return self.runner_sliding_window

    @classmethod
    def get_model_config_for_expert_location(cls, config):
        """For SGLang's expert-distribution recording (--expert-distribution-recorder-mode; SGLang asks
        the model class). EPLB itself (--enable-eplb, --ep-num-redundant-experts, a non-trivial
        --init-expert-location) is not served: sglang_step35.served refuses it at launch and at
        construction. Layer ids are global under PP as well: each stage records its own layers into
        the one [num_layers, ...] expert map, and our MoE blocks pass their global index as layer_id."""
        return ModelConfigForExpertLocation(
            num_layers=config.num_hidden_layers, num_logical_experts=int(config.moe_num_experts)
        )

    @property
    def start_layer(self) -> int:
        """First layer of this pipeline stage (SGLang sizes and indexes the stage's KV pool by it)."""
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        pp_proxy_tensors: Optional[PPProxyTensors] = None,
        **kwargs,
    ):
        # SGLang's runner passes pp_proxy_tensors only to models whose forward names it (support_pp).
        out = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors=pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return out
        hidden, pre_norm = out
        # EAGLE/MTP reads `hidden_states` from the logits output; Step's MTP wants the pre-norm state.
        # The logits processor stores `hidden_states_before_norm` instead of the normed state whenever
        # the batch captures hidden states (capture_hidden_mode != NULL); logits use `hidden`.
        return self.logits_processor(
            input_ids, hidden, self.lm_head, forward_batch, hidden_states_before_norm=pre_norm
        )

    # Checkpoint names -------------------------------------------------------------------------
    # The naming tables of a Step-3.5 checkpoint, next to load_weights as in SGLang's qwen3_moe.py;
    # Step3p5MTP uses the same ones. The loader (models/weights.py) derives what a checkpoint must
    # hold from these and the module tree SGLang built; shapes come from sglang_step35.checkpoint.
    #
    # Our parameter suffix (within a decoder layer) -> the checkpoint tensors that feed it, as
    # (checkpoint suffix, shard id). Shard ids are those SGLang's fused layers take: "q"/"k"/"v" for
    # QKVParallelLinear, 0/1 for MergedColumnParallelLinear, "w1"/"w3"/"w2" for FusedMoE (whose
    # checkpoint tensors are stacked [E, ...] and loaded expert by expert). Unlisted parameters are
    # loaded from the tensor of the same name.
    stacked_params_mapping: dict[str, list[tuple[str, Union[str, int, None]]]] = {
        "self_attn.qkv_proj.weight": [
            ("self_attn.q_proj.weight", "q"), ("self_attn.k_proj.weight", "k"), ("self_attn.v_proj.weight", "v")],
        "mlp.gate_up_proj.weight": [("mlp.gate_proj.weight", 0), ("mlp.up_proj.weight", 1)],
        "moe.share_expert.gate_up_proj.weight": [
            ("share_expert.gate_proj.weight", 0), ("share_expert.up_proj.weight", 1)],
        "moe.share_expert.down_proj.weight": [("share_expert.down_proj.weight", None)],
        "moe.experts.w13_weight": [("moe.gate_proj.weight", "w1"), ("moe.up_proj.weight", "w3")],
        "moe.experts.w2_weight": [("moe.down_proj.weight", "w2")],
    }
    # Our fused modules -> the checkpoint modules they hold. SGLang hands this to the quantization
    # config (model_loader/loader.py _get_quantization_config -> get_quant_config sets
    # `packed_modules_mapping`), whose per-layer lookups (compressed-tensors / w8a8_int8 `ignore`,
    # ModelOpt's per-layer lists, Quark's layer configs) resolve `qkv_proj` / `gate_up_proj` through
    # their `q/k/v_proj` / `gate/up_proj` names; without it they never match (vllm #41892).
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    # A quantization_config names the modules it keeps unquantized (modules_to_not_convert /
    # ignored_layers) as the checkpoint does; SGLang's loader maps those names with this before
    # matching them against our module prefixes (model_loader/loader.py, apply_weight_name_mapper).
    # The checkpoint's `share_expert` lives under our `moe`; its stacked expert tensors feed
    # `moe.experts`. The identity entry keeps a name already in our form from being mapped twice
    # (SGLang applies the longest matching substring only).
    hf_to_sglang_mapper = WeightsMapper(orig_to_new_substr={
        ".moe.share_expert": ".moe.share_expert",
        ".share_expert": ".moe.share_expert",
        ".moe.gate_proj": ".moe.experts",
        ".moe.up_proj": ".moe.experts",
        ".moe.down_proj": ".moe.experts",
    })
    # Checkpoint tensors outside the decoder layers, by the pipeline stage that holds them.
    first_stage_tensors = ("model.embed_tokens.weight",)
    last_stage_tensors = ("model.norm.weight", "lm_head.weight")

    def checkpoint_name(self, pname: str) -> tuple[str, str]:
        """Our parameter -> (checkpoint prefix, suffix): decoder layers keep the checkpoint's
        `model.layers.{i}.`, everything else is named as in the checkpoint."""
        i = layer_index(pname)
        return (f"model.layers.{i}.", pname[len(f"model.layers.{i}."):]) if i is not None else ("", pname)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        load_step3p5_weights(self, weights)

    def get_embed_and_head(self):
        return self.model.embed_tokens.weight, self.lm_head.weight

    def set_embed_and_head(self, embed, head):
        del self.model.embed_tokens.weight
        del self.lm_head.weight
        self.model.embed_tokens.weight = embed
        self.lm_head.weight = head


EntryClass = Step3p5ForCausalLM

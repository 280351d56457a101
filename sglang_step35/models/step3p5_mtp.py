"""Step3p5MTP: one Step-3.5 MTP (multi-token prediction) draft layer for SGLang's multi-layer EAGLE.

How SGLang 0.5.23 drives it (sglang/srt/speculative/multi_layer_eagle_worker_v2.py, tp_worker.py):
- the draft ModelConfig renames the architecture Step3p5ForCausalLM -> Step3p5MTP, and the draft
  TpModelWorker builds one ModelRunner per draft step (`--speculative-num-steps`), each constructing
  this class with `draft_model_idx` = the step. So one instance holds exactly one MTP layer:
  checkpoint layer `num_hidden_layers + draft_model_idx`;
- each runner has its own one-layer hybrid-SWA KV pool (`swa_attention_layer_ids = [0]` for
  Step3p5MTP in model_config.py, one layer in layer_setup.py): the layer's RadixAttention must use
  layer_id 0, whatever its index in the checkpoint;
- the worker puts the previous hidden states on `forward_batch.spec_info.hidden_states` (step 0:
  the target's, captured with `hidden_states_before_norm`; step i>0: step i-1's output, because the
  worker treats Step3p5MTP as chain-style) and reads `logits_output.hidden_states` back, which the
  LogitsProcessor fills from `hidden_states_before_norm` when given. Hence `forward` hands the
  pre-head-norm state to the logits processor;
- there is no separate draft decode: every step runs as a draft extend over the accepted window with
  input ids rotated by one token per step.

One MTP layer:  e = enorm(embed(next_token)); h = hnorm(h_prev); z = eh_proj([e ; h]);
  y = DecoderLayer(z) (sliding-window attention + dense SwiGLU, settings from the per-layer lists at
  its own index); logits = head(shared_head.norm(y)); y (pre-norm) feeds the next MTP layer.
The embedding is shared with the target through SGLang's EAGLE hook (`set_embed_and_head`); the head
is the layer's own `shared_head.output` (the target's lm_head only if the checkpoint lacks it).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Tuple

import torch
from torch import nn

from sglang.srt.layers.layer_boundary import layer_stack
from sglang.srt.layers.layer_boundary.residual import batch as residual_batch
from sglang.srt.layers.layernorm import GemmaRMSNorm
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.utils import add_prefix

from sglang_step35.launch.marker import require_launch_policy
from sglang_step35.config import SLIDING, cfg_get
from sglang_step35.mtp_check import Step35MTPError, check_mtp_request
from sglang_step35.models.step3p5 import Step35DecoderLayer, Step3p5ForCausalLM
from sglang_step35.attention import model_runner_sliding_window_size
from sglang_step35.checkpoint import checkpoint_shapes
from sglang_step35.models.quant_build import quant_config_to_build, quant_format_of
from sglang_step35.models.weights import (
    Step35WeightError,
    checkpoint_sources,
    checkpoint_view,
    kv_scale_targets,
    load_checkpoint,
)

logger = logging.getLogger(__name__)

class Step3p5MTP(nn.Module):
    """MTP layer `draft_model_idx` of a Step-3.5 checkpoint as a standalone draft model."""

    def __init__(
        self,
        config,
        quant_config: Optional[QuantizationConfig] = None,
        draft_model_idx: Optional[int] = None,
        prefix: str = "",
    ):
        super().__init__()
        require_launch_policy(type(self).__name__, config)  # its checks decided this launch (launch/marker.py)
        self.config = config
        # A quantized checkpoint whose SGLang kernels cannot run here (block FP8 on a CPU without AMX,
        # W8A8-INT8, ... on any CPU): build unquantized and let the loader dequantize (models/weights.py).
        self.cpu_dequant, quant_config = quant_config_to_build(quant_config, config)
        self.quant_config = quant_config
        # Plain (single-layer) EAGLE passes no index: it drafts with the first MTP layer.
        self.draft_model_idx = 0 if draft_model_idx is None else int(draft_model_idx)
        n = int(config.num_hidden_layers)
        try:
            from sglang.srt.runtime_context import get_spec

            steps = int(get_spec().speculative_num_steps or 0) or None
        except Exception:  # outside a server (unit use): only this layer's index matters
            steps = None
        check_mtp_request(config, max(steps or 0, self.draft_model_idx + 1))
        # Derived from the config (sglang #29583 hard-codes 45): checkpoint layer of this step.
        self.layer_index = n + self.draft_model_idx
        types = cfg_get(config, "layer_types")
        if self.layer_index >= len(types):
            raise Step35MTPError(
                f"config 'layer_types' has {len(types)} entries; MTP layer {self.layer_index} needs "
                f"{self.layer_index + 1} (per-layer lists must include the MTP layers)"
            )
        if types[self.layer_index] != SLIDING:
            # SGLang gives the Step3p5MTP draft a one-layer *sliding-window* KV pool.
            raise Step35MTPError(
                f"MTP layer {self.layer_index} is {types[self.layer_index]!r}; SGLang's Step-3.5 draft "
                "pool supports only sliding_attention MTP layers"
            )
        H = config.hidden_size
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, H, prefix=add_prefix("embed_tokens", prefix))
        self.enorm = GemmaRMSNorm(H, config.rms_norm_eps)
        self.hnorm = GemmaRMSNorm(H, config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * H, H, bias=False, quant_config=None, prefix=add_prefix("eh_proj", prefix))
        # Our decoder layer reads layer_spec(config, layer_index): window, heads, rope and the dense
        # SwiGLU (MTP indices are outside moe_layers_enum) with the clamp at that index.
        # Prefixed with the checkpoint's name for the layer: SGLang matches the quantization_config's
        # modules_to_not_convert against it (an MTP layer kept in BF16 is built unquantized).
        # Its own one-layer stack of SGLang's stage boundaries (the layer's stages bind when it closes):
        # the layer's output then ends at shared_head_norm, fused add + norm as in the main model.
        with layer_stack():
            self.layer = Step35DecoderLayer(
                config, self.layer_index, quant_config, prefix=add_prefix(f"model.layers.{self.layer_index}", prefix),
                draft=True,
            )
        assert not self.layer.is_moe, "MTP layers use the dense SwiGLU"
        # The draft runner's KV pool holds this one layer at local id 0 (see module docstring).
        self.layer.self_attn.attn.layer_id = 0
        self.runner_sliding_window = model_runner_sliding_window_size(int(config.sliding_window), draft=True)
        self.shared_head_norm = GemmaRMSNorm(H, config.rms_norm_eps)
        # Prefixed with its checkpoint name too: ModelOpt's / Quark's exclude lists name checkpoint
        # modules (`model.layers.45.*`, `model.layers.45.shared_head.output`), and ModelOpt quantizes
        # a ParallelLMHead its list does not exclude.
        self.shared_head_head = ParallelLMHead(
            config.vocab_size, H, quant_config=quant_config,
            prefix=add_prefix(f"model.layers.{self.layer_index}.shared_head.output", prefix),
        )
        self.logits_processor = LogitsProcessor(config)
        self._head_from_target = False
        logger.info(
            "Step3p5MTP draft step %d = checkpoint layer model.layers.%d",
            self.draft_model_idx, self.layer_index,
        )

    # SGLang's EAGLE machinery -------------------------------------------------------------------
    def get_attention_sliding_window_size(self) -> int:
        """The draft runner's window value (see Step3p5ForCausalLM's)."""
        return self.runner_sliding_window

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def get_embed_and_head(self):
        return self.embed_tokens.weight, self.shared_head_head.weight

    def set_embed_and_head(self, embed, head):
        """Share the target's embedding (one copy in memory); keep this layer's own head unless the
        checkpoint did not have one."""
        del self.embed_tokens.weight
        self.embed_tokens.weight = embed
        if self._head_from_target:
            del self.shared_head_head.weight
            self.shared_head_head.weight = head

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        e = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        h_prev = forward_batch.spec_info.hidden_states
        if h_prev.shape[0] != e.shape[0]:
            raise RuntimeError(
                f"Step3p5MTP step {self.draft_model_idx}: {e.shape[0]} input tokens but "
                f"{h_prev.shape[0]} previous hidden states"
            )
        z, _ = self.eh_proj(torch.cat([self.enorm(e), self.hnorm(h_prev.to(e.dtype))], dim=-1))
        residual_batch.start(forward_batch)
        y = residual_batch.complete_output(self.layer(positions, z, forward_batch), forward_batch)
        # The logits use the head-normed state; the next MTP layer gets y (pre-norm) itself (chain, #18564).
        pre_norm = residual_batch.snapshot(y, forward_batch)
        normed = residual_batch.final_norm(y, forward_batch, self.shared_head_norm)
        return self.logits_processor(
            input_ids, normed, self.shared_head_head, forward_batch, hidden_states_before_norm=pre_norm
        )

    # Checkpoint names ---------------------------------------------------------------------------
    # The main model's table (one table): the draft's decoder layer is a Step35DecoderLayer.
    stacked_params_mapping = Step3p5ForCausalLM.stacked_params_mapping
    packed_modules_mapping = Step3p5ForCausalLM.packed_modules_mapping  # SGLang reads it off the draft's class
    # Our parameters outside the decoder layer -> their checkpoint suffix within the MTP layer.
    head_params = {
        "enorm.weight": "enorm.weight",
        "hnorm.weight": "hnorm.weight",
        "eh_proj.weight": "eh_proj.weight",
        "shared_head_norm.weight": "shared_head.norm.weight",
        "shared_head_head.weight": "shared_head.output.weight",
    }

    def checkpoint_name(self, pname: str) -> tuple[str, str]:
        """Our parameter -> (checkpoint prefix, suffix): see models/weights.py."""
        if pname == "embed_tokens.weight":
            return "model.", pname
        layer = f"model.layers.{self.layer_index}."
        if pname.startswith("layer."):
            return layer, pname[len("layer."):]
        return layer, self.head_params[pname]

    def _normalised(self, weights):
        """The checkpoint stream with `model.layers.{L}.transformer.` nesting removed; the layer's own
        embedding copy stands in for `model.embed_tokens.weight` only when that is absent."""
        layer = f"model.layers.{self.layer_index}."
        own_embed = None
        have_embed = False
        for name, tensor in weights:
            if name.startswith(layer + "transformer."):
                name = layer + name[len(layer + "transformer."):]
            if name == layer + "embed_tokens.weight":
                own_embed = tensor
                continue
            have_embed |= name == "model.embed_tokens.weight"
            yield name, tensor
        if own_embed is not None and not have_embed:
            yield "model.embed_tokens.weight", own_embed

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load this step's MTP layer (BF16 or block FP8, as SGLang built its modules) from a full
        Step-3.5 checkpoint; other layers' tensors are skipped. Errors list every missing,
        mis-shaped or wrong-precision tensor of the layer."""
        L = self.layer_index
        layer = f"model.layers.{L}."
        cfg = checkpoint_view(self.config)
        layout = {k: v for k, v in checkpoint_shapes(cfg).items() if k.startswith(layer) or k == "model.embed_tokens.weight"}
        sources = checkpoint_sources(self, layout, self.checkpoint_name, *quant_format_of(self))
        rep = load_checkpoint(
            self, self._normalised(weights), sources, skip=lambda name: not name.startswith(layer),
            kv_scales=kv_scale_targets(self, self.checkpoint_name),
        )
        if not any(name.startswith(layer) for name in [*rep.seen, *rep.unexpected]):
            raise Step35MTPError(
                f"checkpoint has no MTP layers (model.layers.{L}...): draft step {self.draft_model_idx} "
                "needs it; serve without --speculative-algorithm or use a checkpoint with its MTP layers"
            )
        # Some checkpoints keep no per-layer head copy; SGLang then hands us the target's lm_head.
        self._head_from_target = "shared_head_head.weight" not in rep.loaded
        lines = rep.problems(sources, dict(self.named_parameters()), allow_missing=["shared_head_head.weight"])
        if lines:
            raise Step35WeightError("\n".join([f"MTP layer model.layers.{L} does not match config.json:", *lines]))


EntryClass = Step3p5MTP

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

from sglang.srt.layers.layernorm import GemmaRMSNorm
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.utils import add_prefix

from sglang_step35.config import SLIDING, cfg_get
from sglang_step35.mtp_check import Step35MTPError, check_mtp_request
from sglang_step35.models.step3p5 import Step3p5DecoderLayer
from sglang_step35.models.weights import STACKED_PARAMS, Step35WeightError

logger = logging.getLogger(__name__)

# Tensors of an MTP layer outside its decoder block (checkpoint suffix -> our parameter name).
MTP_HEAD_PARAMS = {
    "enorm.weight": "enorm.weight",
    "hnorm.weight": "hnorm.weight",
    "eh_proj.weight": "eh_proj.weight",
    "shared_head.norm.weight": "shared_head_norm.weight",
    "shared_head.output.weight": "shared_head_head.weight",
}


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
        self.config = config
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
        self.layer = Step3p5DecoderLayer(config, self.layer_index, quant_config, prefix=add_prefix("layer", prefix))
        assert not self.layer.is_moe, "MTP layers use the dense SwiGLU"
        # The draft runner's KV pool holds this one layer at local id 0 (see module docstring).
        self.layer.self_attn.attn.layer_id = 0
        self.shared_head_norm = GemmaRMSNorm(H, config.rms_norm_eps)
        self.shared_head_head = ParallelLMHead(
            config.vocab_size, H, quant_config=quant_config, prefix=add_prefix("shared_head.head", prefix)
        )
        self.logits_processor = LogitsProcessor(config)
        self._head_from_target = False
        logger.info(
            "sglang-step35: Step3p5MTP draft step %d = checkpoint layer model.layers.%d",
            self.draft_model_idx, self.layer_index,
        )

    # SGLang's EAGLE machinery -------------------------------------------------------------------
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
        y = self.layer(positions, z, forward_batch)
        # The logits use the head-normed state; the next MTP layer gets y itself (chain, #18564).
        return self.logits_processor(
            input_ids, self.shared_head_norm(y), self.shared_head_head, forward_batch, hidden_states_before_norm=y
        )

    # Weights ------------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load this step's MTP layer from a full Step-3.5 checkpoint (all other tensors skipped).

        Accepts `model.layers.{L}.transformer.<...>` nesting and a per-layer embedding copy; errors
        list every missing or mis-shaped tensor of the layer."""
        L = self.layer_index
        layer_prefix = f"model.layers.{L}."
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        seen_layer = False
        misshaped: list[str] = []
        embed_loaded_from_model = False
        for name, tensor in weights:
            if name == "model.embed_tokens.weight":
                # Loaded so the draft also works stand-alone; replaced by the target's shared copy.
                self._load(params["embed_tokens.weight"], tensor, None, name, misshaped)
                loaded.add("embed_tokens.weight")
                embed_loaded_from_model = True
                continue
            if not name.startswith(layer_prefix):
                continue
            seen_layer = True
            suffix = name[len(layer_prefix):]
            if suffix.startswith("transformer."):
                suffix = suffix[len("transformer."):]
            if suffix == "embed_tokens.weight":
                if not embed_loaded_from_model:
                    self._load(params["embed_tokens.weight"], tensor, None, name, misshaped)
                    loaded.add("embed_tokens.weight")
                continue
            if suffix in MTP_HEAD_PARAMS:
                pname = MTP_HEAD_PARAMS[suffix]
                self._load(params[pname], tensor, None, name, misshaped)
                loaded.add(pname)
                continue
            for param_suffix, ckpt_suffix, shard in STACKED_PARAMS:
                if suffix == ckpt_suffix:
                    pname = "layer." + param_suffix
                    if pname in params:
                        self._load(params[pname], tensor, shard, name, misshaped)
                        loaded.add(pname)
                        break
            else:
                pname = "layer." + suffix
                if pname not in params:
                    raise Step35WeightError(f"MTP layer {L}: unexpected tensor {name} (no parameter {pname})")
                self._load(params[pname], tensor, None, name, misshaped)
                loaded.add(pname)
        if not seen_layer:
            raise Step35MTPError(
                f"checkpoint has no MTP layers (model.layers.{L}...): draft step {self.draft_model_idx} "
                "needs it; serve without --speculative-algorithm or use a checkpoint with its MTP layers"
            )
        missing = sorted(set(params) - loaded)
        if missing == ["shared_head_head.weight"]:
            # Some checkpoints keep no per-layer head copy; SGLang hands us the target's lm_head.
            self._head_from_target = True
            missing = []
        if missing or misshaped:
            lines = [f"MTP layer model.layers.{L} does not match config.json:"]
            if misshaped:
                lines.append("mis-shaped tensors:\n  " + "\n  ".join(misshaped))
            if missing:
                lines.append("parameters never loaded:\n  " + "\n  ".join(missing))
            raise Step35WeightError("\n".join(lines))

    @staticmethod
    def _load(param, tensor, shard, name, misshaped) -> None:
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
        except (AssertionError, RuntimeError) as e:  # SGLang's loaders assert on shape
            misshaped.append(f"{name}: {list(tensor.shape)} ({e})")


EntryClass = Step3p5MTP

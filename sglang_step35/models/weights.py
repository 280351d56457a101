"""Weight loader of Step3p5ForCausalLM: checkpoint names -> SGLang's fused parameters.

Shapes are checked against `sglang_step35.checkpoint.checkpoint_shapes`. Loading collects every
problem — missing, unexpected and mis-shaped tensors — and raises one error listing them all.
"""

from __future__ import annotations

import re
from typing import Iterable, Tuple

import torch

from sglang.srt.model_loader.weight_utils import default_weight_loader

from sglang_step35.checkpoint import checkpoint_shapes


class Step35WeightError(ValueError):
    """The checkpoint does not match the config; the message lists each tensor and shape."""


# (our parameter suffix, checkpoint suffix, shard id) for tensors SGLang fuses into one parameter.
STACKED_PARAMS = [
    ("self_attn.qkv_proj.weight", "self_attn.q_proj.weight", "q"),
    ("self_attn.qkv_proj.weight", "self_attn.k_proj.weight", "k"),
    ("self_attn.qkv_proj.weight", "self_attn.v_proj.weight", "v"),
    ("mlp.gate_up_proj.weight", "mlp.gate_proj.weight", 0),
    ("mlp.gate_up_proj.weight", "mlp.up_proj.weight", 1),
    ("moe.share_expert.gate_up_proj.weight", "share_expert.gate_proj.weight", 0),
    ("moe.share_expert.gate_up_proj.weight", "share_expert.up_proj.weight", 1),
]
# Checkpoint suffix -> our parameter suffix, for tensors loaded as they are.
RENAMED_PARAMS = {
    "share_expert.down_proj.weight": "moe.share_expert.down_proj.weight",
}
# Stacked routed experts [E, ...] -> FusedMoE parameter and its shard id, loaded expert by expert.
EXPERT_PARAMS = {
    "moe.gate_proj.weight": ("moe.experts.w13_weight", "w1"),
    "moe.up_proj.weight": ("moe.experts.w13_weight", "w3"),
    "moe.down_proj.weight": ("moe.experts.w2_weight", "w2"),
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def load_step3p5_weights(model: torch.nn.Module, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
    """Load a real-layout checkpoint into Step3p5ForCausalLM; MTP layers are left to Step3p5MTP."""
    cfg = model.config
    n = cfg.num_hidden_layers
    expected = checkpoint_shapes(cfg)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected, misshaped = [], []

    for name, tensor in weights:
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) >= n:
            if name not in expected and not _is_mtp_variant(name, n):
                unexpected.append(name)
            continue  # MTP layer: Step3p5MTP's
        if name not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != expected[name]:
            misshaped.append(f"{name}: expected {list(expected[name])}, got {list(tensor.shape)}")
            continue
        prefix, suffix = (f"model.layers.{m.group(1)}.", m.group(2)) if m else ("", name)
        for param_suffix, ckpt_suffix, shard in STACKED_PARAMS:
            if suffix == ckpt_suffix:
                pname = prefix + param_suffix
                params[pname].weight_loader(params[pname], tensor, shard)
                loaded.add(pname)
                break
        else:
            if suffix in EXPERT_PARAMS:
                pname_suffix, shard = EXPERT_PARAMS[suffix]
                pname = prefix + pname_suffix
                param = params[pname]
                for e in range(tensor.shape[0]):
                    param.weight_loader(param, tensor[e], pname, shard_id=shard, expert_id=e)
                loaded.add(pname)
            else:
                pname = prefix + RENAMED_PARAMS.get(suffix, suffix)
                param = params[pname]
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(pname)

    missing_params = sorted(set(params) - loaded)
    if unexpected or misshaped or missing_params:
        lines = []
        if misshaped:
            lines.append("mis-shaped tensors:\n  " + "\n  ".join(misshaped))
        if unexpected:
            lines.append("unexpected tensors (not in a Step-3.5 checkpoint for this config):\n  "
                         + "\n  ".join(sorted(unexpected)))
        if missing_params:
            lines.append("parameters never loaded (tensors missing from the checkpoint):\n  "
                         + "\n  ".join(missing_params))
        raise Step35WeightError("Step-3.5 checkpoint does not match config.json:\n" + "\n".join(lines))


def _is_mtp_variant(name: str, n: int) -> bool:
    # Some checkpoints nest an MTP layer's decoder part under `.transformer.`, or keep a per-layer
    # copy of the embedding; both belong to the MTP model.
    return ".transformer." in name or name.endswith(".embed_tokens.weight")

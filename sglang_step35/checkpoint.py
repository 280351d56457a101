"""The Step-3.5 checkpoint layout: tensor names and shapes of a BF16 checkpoint for a given config.

The single description of the real layout (stacked routed experts [E, I, H] / [E, H, I], fp32 router
bias, MTP layers after the main ones): the tiny builder writes exactly these tensors and the weight
loader checks against them. No SGLang import, so it is cheap to use from the CLI and tests.
`LAYER_RE` is the package's one pattern for a decoder layer's tensor name (layer index, rest).
Which of our parameters each tensor feeds is the models' business: the naming tables sit next to
`load_weights` in models/step3p5.py (shared by the MTP draft).
"""

from __future__ import annotations

import re
from typing import Optional

from sglang_step35.config import cfg_get, layer_spec

# `model.layers.{i}.{rest}`: main and MTP layers alike (MTP layers are numbered after the main ones).
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def layer_index(name: str) -> Optional[int]:
    """Decoder layer index of checkpoint tensor / parameter `name`, or None outside the layers."""
    m = LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def checkpoint_shapes(cfg, include_mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a BF16 Step-3.5 checkpoint described by `cfg`."""
    H, V, E, inter, S, F, n = (cfg_get(cfg, k) for k in (
        "hidden_size", "vocab_size", "moe_num_experts", "moe_intermediate_size", "share_expert_dim",
        "intermediate_size", "num_hidden_layers"))
    m = int(cfg_get(cfg, "num_nextn_predict_layers", 0) or 0) if include_mtp else 0
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (V, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    for i in range(n + m):
        s = layer_spec(cfg, i)
        p = f"model.layers.{i}."
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        shapes.update({
            p + "input_layernorm.weight": (H,),
            p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H),
            p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H),
            p + "self_attn.o_proj.weight": (H, q),
            p + "self_attn.q_norm.weight": (s.head_dim,),
            p + "self_attn.k_norm.weight": (s.head_dim,),
            p + "self_attn.g_proj.weight": (s.num_heads, H),
        })
        if s.is_moe:
            shapes.update({
                p + "moe.gate.weight": (E, H),
                p + "moe.router_bias": (E,),
                p + "moe.gate_proj.weight": (E, inter, H),
                p + "moe.up_proj.weight": (E, inter, H),
                p + "moe.down_proj.weight": (E, H, inter),
                p + "share_expert.gate_proj.weight": (S, H),
                p + "share_expert.up_proj.weight": (S, H),
                p + "share_expert.down_proj.weight": (H, S),
            })
        else:
            shapes.update({
                p + "mlp.gate_proj.weight": (F, H),
                p + "mlp.up_proj.weight": (F, H),
                p + "mlp.down_proj.weight": (H, F),
            })
        if i >= n:
            shapes.update({
                p + "enorm.weight": (H,),
                p + "hnorm.weight": (H,),
                p + "eh_proj.weight": (H, 2 * H),
                p + "shared_head.norm.weight": (H,),
                p + "shared_head.output.weight": (V, H),
            })
    return shapes

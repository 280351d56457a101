"""A tiny Step-3.5 checkpoint whose MTP layers draft well without training (test/bench fixture).

Random tiny checkpoints accept ~0 MTP drafts, so a speculative run would never take the accept
paths (KV moves of accepted tokens, bonus tokens, rotated draft windows) and an equality test could
not fail on them. Here every layer's output projections are scaled by `mix`, so the residual stream
is mostly the token's own embedding and the target's next token is mostly f(current token) =
argmax lm_head(norm(embed(t))), perturbed by context through attention/FFN. Each MTP layer is wired
to compute the same f from its `e` input (eh_proj = [I, 0], enorm = 1, head norm and head = the
target's), so drafts agree with the target often but not always (partial acceptance).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_OUTPUT_PROJECTIONS = (
    "self_attn.o_proj.weight",
    "mlp.down_proj.weight",
    "moe.down_proj.weight",
    "share_expert.down_proj.weight",
)


def write_predictable_mtp_checkpoint(src, dst, mix: float = 0.35) -> Path:
    """Copy the tiny checkpoint at `src` to `dst` with the weights described in the module doc."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    n, m, H = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"], cfg["hidden_size"]
    w = load_file(str(src / "model.safetensors"))
    for name in list(w):
        if name.endswith(_OUTPUT_PROJECTIONS):
            w[name] = (w[name].float() * mix).to(w[name].dtype)
    for i in range(n, n + m):
        p = f"model.layers.{i}."
        eh = torch.zeros(H, 2 * H)
        eh[:, :H] = torch.eye(H)
        w[p + "eh_proj.weight"] = eh.to(torch.bfloat16)
        w[p + "enorm.weight"] = torch.zeros(H, dtype=torch.bfloat16)
        w[p + "shared_head.norm.weight"] = w["model.norm.weight"].clone()
        w[p + "shared_head.output.weight"] = w["lm_head.weight"].clone()
    save_file({k: v.contiguous() for k, v in w.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst

"""A batched, trainable Step-3.5 (main layers + chained MTP layers) over checkpoint-named parameters.

Same math as the serving model and the test reference (tests/reference/step35_ref.py), vectorised
over [batch, time] for training; parameters keep the real checkpoint names so the trained weights
are saved in the real layout. The router bias is not learned by gradient: like Step's aux-loss-free
balancing it is nudged after each step toward equal expert load (`update_router_bias`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sglang_step35.config import cfg_get, layer_spec


def inv_freq_for(spec, cfg) -> torch.Tensor:
    f = 1.0 / spec.rope_theta ** (torch.arange(0, spec.rotary_dim, 2, dtype=torch.float64) / spec.rotary_dim)
    scaling = cfg_get(cfg, "rope_scaling")
    if spec.use_rope_scaling:  # llama3: slow down long wavelengths, blend the middle band
        factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        ctx = scaling["original_max_position_embeddings"]
        wl = 2 * math.pi / f
        smooth = ((ctx / wl - low) / (high - low)).clamp(0, 1)
        f = torch.where(wl < ctx / high, f, torch.where(wl > ctx / low, f / factor, (1 - smooth) * f / factor + smooth * f))
    return f.float()


def gemma_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D]; NeoX rotation of the first 2*cos.shape[-1] dims."""
    rot = 2 * cos.shape[-1]
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2: rot], x[..., rot:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def swiglu(x, gate_w, up_w, down_w, limit: float) -> torch.Tensor:
    act, up = F.silu(x @ gate_w.t()), x @ up_w.t()
    if limit > 0:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return (act * up) @ down_w.t()


class TrainableStep35(nn.Module):
    def __init__(self, cfg: dict, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.n, self.m = cfg["num_hidden_layers"], cfg["num_nextn_predict_layers"]
        self.eps = cfg["rms_norm_eps"]
        self.specs = [layer_spec(cfg, i) for i in range(self.n + self.m)]
        self.names = list(weights)
        for name, t in weights.items():
            if name.endswith("router_bias"):
                self.register_buffer(self._key(name), t.float().clone())
            else:
                self.register_parameter(self._key(name), nn.Parameter(t.float().clone()))
        self._freqs = [inv_freq_for(s, cfg) for s in self.specs]
        self.last_load: dict[int, torch.Tensor] = {}

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def w(self, name: str) -> torch.Tensor:
        return getattr(self, self._key(name))

    def state_in_checkpoint_layout(self) -> dict[str, torch.Tensor]:
        return {n: self.w(n).detach().clone() for n in self.names}

    # --- blocks ---
    def attention(self, i: int, x: torch.Tensor) -> torch.Tensor:
        s, p = self.specs[i], f"model.layers.{i}.self_attn."
        B, T, _ = x.shape
        q = (x @ self.w(p + "q_proj.weight").t()).view(B, T, s.num_heads, s.head_dim)
        k = (x @ self.w(p + "k_proj.weight").t()).view(B, T, s.num_kv_heads, s.head_dim)
        v = (x @ self.w(p + "v_proj.weight").t()).view(B, T, s.num_kv_heads, s.head_dim)
        q, k = gemma_norm(q, self.w(p + "q_norm.weight"), self.eps), gemma_norm(k, self.w(p + "k_norm.weight"), self.eps)
        ang = torch.arange(T, dtype=torch.float32)[:, None] * self._freqs[i][None, :]
        cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = s.num_heads // s.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        pos = torch.arange(T)
        allowed = pos[None, :] <= pos[:, None]
        if s.window:
            allowed &= pos[None, :] > pos[:, None] - s.window
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
        ).transpose(1, 2)  # [B, T, heads, D]
        gate = torch.sigmoid(x @ self.w(p + "g_proj.weight").t())
        out = (out * gate[..., None]).reshape(B, T, -1)
        return out @ self.w(p + "o_proj.weight").t()

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        s, p, c = self.specs[i], f"model.layers.{i}.", self.cfg
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        scores = torch.sigmoid(flat @ self.w(p + "moe.gate.weight").t())
        ids = (scores + self.w(p + "moe.router_bias")).topk(c["moe_top_k"], dim=-1).indices
        weights = scores.gather(1, ids)
        weights = weights / weights.sum(-1, keepdim=True) * c["moe_router_scaling_factor"]
        self.last_load[i] = torch.bincount(ids.flatten(), minlength=c["moe_num_experts"]).float()
        out = torch.zeros_like(flat)
        gw, uw, dw = (self.w(p + f"moe.{n}_proj.weight") for n in ("gate", "up", "down"))
        for e in range(c["moe_num_experts"]):
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            if tok.numel():
                y = swiglu(flat[tok], gw[e], uw[e], dw[e], s.swiglu_limit)
                out = out.index_add(0, tok, (y * weights[tok, slot, None]).to(out.dtype))
        shared = swiglu(flat, *(self.w(p + f"share_expert.{n}_proj.weight") for n in ("gate", "up", "down")),
                        s.swiglu_limit_shared)
        return (out + shared).view(B, T, H)

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p, s = f"model.layers.{i}.", self.specs[i]
        h = x + self.attention(i, gemma_norm(x, self.w(p + "input_layernorm.weight"), self.eps))
        normed = gemma_norm(h, self.w(p + "post_attention_layernorm.weight"), self.eps)
        if s.is_moe:
            return h + self.moe(i, normed)
        mw = (self.w(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        return h + swiglu(normed, *mw, s.swiglu_limit_shared)

    def trunk(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> the main model's last hidden state before the final norm [B, T, H]."""
        x = self.w("model.embed_tokens.weight")[ids]
        for i in range(self.n):
            x = self.layer(i, x)
        return x

    def main_head(self, x: torch.Tensor) -> torch.Tensor:
        return gemma_norm(x, self.w("model.norm.weight"), self.eps) @ self.w("lm_head.weight").t()

    def mtp_states(self, ids: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        """Chained MTP hidden states: layer k reads token t+1+k and layer k-1's state (the trunk's for k=0)."""
        emb, out, h = self.w("model.embed_tokens.weight"), [], x
        for k in range(self.m):
            i, T = self.n + k, ids.shape[1] - 1 - k
            p = f"model.layers.{i}."
            e = gemma_norm(emb[ids[:, 1 + k: 1 + k + T]], self.w(p + "enorm.weight"), self.eps)
            z = torch.cat([e, gemma_norm(h[:, :T], self.w(p + "hnorm.weight"), self.eps)], dim=-1)
            h = self.layer(i, z @ self.w(p + "eh_proj.weight").t())
            out.append(h)
        return out

    def mtp_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{self.n + k}.shared_head."
        return gemma_norm(h, self.w(p + "norm.weight"), self.eps) @ self.w(p + "output.weight").t()

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids [B, T] -> (main logits [B, T, V], per MTP layer k logits [B, T-1-k, V] for token t+2+k)."""
        x = self.trunk(ids)
        return self.main_head(x), [self.mtp_head(k, h) for k, h in enumerate(self.mtp_states(ids, x))]

    @torch.no_grad()
    def update_router_bias(self, rate: float, layers=None) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        for i, load in self.last_load.items():
            if layers is None or i in layers:
                bias = self.w(f"model.layers.{i}.moe.router_bias")
                bias += rate * torch.sign(load.mean() - load)

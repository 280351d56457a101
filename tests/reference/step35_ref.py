"""A plain-PyTorch Step-3.5 forward, written from docs/the spec (step35-architecture.md), gpt-fast style.

This is the oracle of the parity tests: it imports neither SGLang nor our package's model code, reads
the same config.json + model.safetensors, and spells out every block's math in a few lines. It
recomputes the whole sequence on every call (no KV cache): slow but impossible to get a cache bug in,
and fast enough at tiny sizes. Per-layer settings are resolved here again from the raw config dict,
independently of `sglang_step35.config`, so a bug there cannot hide in both sides.

Knobs that model *other* implementations, used to show that a comparison can fail:
- `window`: keys a sliding layer sees, INCLUDING the current one (spec: key_pos > q_pos - window).
  Default: config `sliding_window`; `None` turns the window off; `sliding_window + 1` is what SGLang's
  built-in model computes (it passes `sliding_window` as SGLang's "keys before the query" size).
- `routed_clamp` / `shared_clamp`: False drops the SwiGLU limit of routed / shared experts (SGLang's
  built-in CPU MoE path drops the routed one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

_CONFIG_WINDOW = object()  # sentinel: use the config's sliding_window


# --- rotary ------------------------------------------------------------------------------------------
def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """Plain RoPE frequencies 1 / theta^(2j / rotary_dim), j = 0 .. rotary_dim/2 - 1 (fp64)."""
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3 frequency scaling: long wavelengths (> original_ctx / low_freq_factor) are slowed down
    `factor` times, short ones (< original_ctx / high_freq_factor) kept, and the band between is a
    linear blend in 1/wavelength-space: smooth = (original_ctx / wavelen - low) / (high - low)."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    out = torch.empty_like(inv_freq)
    for j, (f, w) in enumerate(zip(inv_freq.tolist(), wavelen.tolist())):
        if w < old_ctx / high:  # high frequency: untouched
            out[j] = f
        elif w > old_ctx / low:  # low frequency: interpolated by `factor`
            out[j] = f / factor
        else:
            smooth = (old_ctx / w - low) / (high - low)
            out[j] = (1 - smooth) * f / factor + smooth * f
    return out


def apply_neox_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]: rotate the first 2*len(inv_freq) dims NeoX style (first half / second half
    of that slice are the pair), leave the rest of each head untouched."""
    rot = 2 * inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # [T, rot/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # broadcast over heads
    xr = x[..., :rot].to(torch.float64)
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


# --- the model ---------------------------------------------------------------------------------------
class Step35Reference:
    """Step-3.5 causal LM (+ its MTP layers) from a checkpoint directory."""

    def __init__(
        self,
        ckpt_dir,
        dtype: torch.dtype = torch.float32,
        window=_CONFIG_WINDOW,
        routed_clamp: bool = True,
        shared_clamp: bool = True,
        weights: Optional[dict] = None,
    ):
        from safetensors.torch import load_file

        ckpt_dir = Path(ckpt_dir)
        self.cfg = json.loads((ckpt_dir / "config.json").read_text())
        raw = weights if weights is not None else load_file(str(ckpt_dir / "model.safetensors"))
        # Checkpoint values (bf16) upcast once; the router bias is fp32 in the checkpoint and the
        # router runs in fp32 regardless of `dtype` (need_fp32_gate).
        self.w = {k: (v.float() if k.endswith(("router_bias", "moe.gate.weight")) else v.to(dtype)) for k, v in raw.items()}
        self.dtype = dtype
        # "fp32" math (scores, softmax, SwiGLU, expert sums) runs in fp64 when the reference does.
        self.acc = torch.promote_types(dtype, torch.float32)
        c = self.cfg
        self.n_layers = int(c["num_hidden_layers"])
        self.n_mtp = int(c.get("num_nextn_predict_layers") or 0)
        self.eps = float(c["rms_norm_eps"])
        self.window = c.get("sliding_window") if window is _CONFIG_WINDOW else window
        self.routed_clamp, self.shared_clamp = routed_clamp, shared_clamp
        moe = c.get("moe_layers_enum")
        if isinstance(moe, str):
            self.moe_layers = {int(s) for s in moe.split(",") if s.strip()}
        elif moe is None:
            self.moe_layers = set(range(self.n_layers))
        else:
            self.moe_layers = {int(s) for s in moe}

    # ---- per-layer settings, straight from the config lists ----
    def _per_layer(self, key: str, i: int, default):
        v = self.cfg.get(key, default)
        if isinstance(v, list):
            v = v[i]
        return default if v is None else v

    def is_sliding(self, i: int) -> bool:
        return self.cfg["layer_types"][i] == "sliding_attention"

    def heads(self, i: int) -> tuple[int, int, int]:
        """(query heads, kv heads, head_dim) of layer i; sliding layers use attention_other_setting."""
        c = self.cfg
        other = c.get("attention_other_setting") or {}
        if self.is_sliding(i) and other:
            return (int(other.get("num_attention_heads", c["num_attention_heads"])),
                    int(other.get("num_attention_groups", c["num_attention_groups"])),
                    int(other.get("head_dim", c["head_dim"])))
        return int(c["num_attention_heads"]), int(c["num_attention_groups"]), int(c["head_dim"])

    def inv_freq(self, i: int) -> torch.Tensor:
        head_dim = self.heads(i)[2]
        rotary_dim = int(head_dim * float(self._per_layer("partial_rotary_factors", i, 1.0)))
        f = rope_inv_freq(rotary_dim, float(self._per_layer("rope_theta", i, 10000.0)))
        scaling = self.cfg.get("rope_scaling")
        if scaling and self.cfg["layer_types"][i] in (self.cfg.get("yarn_only_types") or []):
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "llama3":
                raise NotImplementedError(f"reference implements llama3 rope scaling only, config has {kind!r}")
            f = llama3_inv_freq(f, scaling)
        return f

    # ---- blocks ----
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gemma RMSNorm over the last dim: x / rms(x) * (1 + w), computed in (at least) fp32."""
        xf = x.to(self.acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + w.to(self.acc))).to(x.dtype)

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x is the normed layer input [T, H]; returns o_proj(gate * softmax(qk^T/sqrt(d) + mask) v)."""
        p, w = f"model.layers.{i}.self_attn.", self.w
        T = x.shape[0]
        nh, nkv, d = self.heads(i)
        q = (x @ w[p + "q_proj.weight"].t()).view(T, nh, d)
        k = (x @ w[p + "k_proj.weight"].t()).view(T, nkv, d)
        v = (x @ w[p + "v_proj.weight"].t()).view(T, nkv, d)
        q, k = self.rms_norm(q, w[p + "q_norm.weight"]), self.rms_norm(k, w[p + "k_norm.weight"])  # per head
        f = self.inv_freq(i)
        q, k = apply_neox_rope(q, positions, f), apply_neox_rope(k, positions, f)
        # GQA: query head h reads kv group h // (nh / nkv).
        k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q.to(self.acc), k.to(self.acc)) * d**-0.5
        qp, kp = positions[:, None], positions[None, :]
        allowed = kp <= qp
        if self.is_sliding(i) and self.window is not None:
            allowed = allowed & (kp > qp - self.window)  # the last `window` keys, current one included
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", probs, v.to(self.acc)).to(x.dtype)  # [T, nh, d]
        if self.cfg.get("use_head_wise_attn_gate", True):
            gate = torch.sigmoid((x @ w[p + "g_proj.weight"].t()).to(self.acc))  # one scalar per query head
            out = (out.to(self.acc) * gate[:, :, None]).to(x.dtype)
        return out.reshape(T, nh * d) @ w[p + "o_proj.weight"].t()

    def swiglu(self, x, gate_w, up_w, down_w, limit: float) -> torch.Tensor:
        """down(act * up), act = silu(gate); with limit L > 0: act = min(act, L), up = clamp(up, ±L)."""
        g, u = (x @ gate_w.t()).to(self.acc), (x @ up_w.t()).to(self.acc)
        act = F.silu(g)
        if limit and limit > 0:
            act = act.clamp(max=limit)  # from above only
            u = u.clamp(-limit, limit)
        return (act * u).to(x.dtype) @ down_w.t()

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Sigmoid router (fp32), biased top-k selection, unbiased renormalised weights * scaling,
        routed experts with the per-layer clamp, plus the always-on shared expert."""
        p, w, c = f"model.layers.{i}.", self.w, self.cfg
        logits = x.float() @ w[p + "moe.gate.weight"].t()
        scores = torch.sigmoid(logits)
        select = scores + w[p + "moe.router_bias"] if c.get("use_moe_router_bias", True) else scores
        ids = select.topk(int(c["moe_top_k"]), dim=-1).indices  # [T, k]
        weights = scores.gather(1, ids)
        if c.get("norm_expert_weight", True):
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights * float(c.get("moe_router_scaling_factor") or 1.0)
        limit = float(self._per_layer("swiglu_limits", i, 0.0)) if self.routed_clamp else 0.0
        out = torch.zeros(x.shape[0], x.shape[1], dtype=self.acc)
        for e in ids.unique().tolist():  # each chosen expert once, on the tokens that picked it
            tok, slot = (ids == e).nonzero(as_tuple=True)
            y = self.swiglu(x[tok], w[p + "moe.gate_proj.weight"][e], w[p + "moe.up_proj.weight"][e],
                            w[p + "moe.down_proj.weight"][e], limit)
            out.index_add_(0, tok, weights[tok, slot, None].to(self.acc) * y.to(self.acc))
        shared_limit = float(self._per_layer("swiglu_limits_shared", i, 0.0)) if self.shared_clamp else 0.0
        shared = self.swiglu(x, w[p + "share_expert.gate_proj.weight"], w[p + "share_expert.up_proj.weight"],
                             w[p + "share_expert.down_proj.weight"], shared_limit)
        return (out + shared.to(self.acc)).to(x.dtype)

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i < self.n_layers and i in self.moe_layers:
            return self.moe(i, x)
        p, w = f"model.layers.{i}.mlp.", self.w  # dense layers and the MTP layers' FFN
        limit = float(self._per_layer("swiglu_limits_shared", i, 0.0)) if self.shared_clamp else 0.0
        return self.swiglu(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], limit)

    def decoder_layer(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """h = x + Attn(norm_in(x)); y = h + FFN(norm_post(h))."""
        p = f"model.layers.{i}."
        h = x + self.attention(i, self.rms_norm(x, self.w[p + "input_layernorm.weight"]), positions)
        return h + self.ffn(i, self.rms_norm(h, self.w[p + "post_attention_layernorm.weight"]))

    # ---- whole model ----
    def embed(self, tokens: Sequence[int]) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"][torch.as_tensor(list(tokens), dtype=torch.long)]

    @torch.no_grad()
    def hidden_states(self, tokens: Sequence[int]) -> torch.Tensor:
        """Last main layer's output [T, H], before the final norm (what MTP layer 0 consumes)."""
        x = self.embed(tokens)
        positions = torch.arange(len(tokens))
        for i in range(self.n_layers):
            x = self.decoder_layer(i, x, positions)
        return x

    @torch.no_grad()
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """[T, V] fp32 next-token logits at every position."""
        h = self.rms_norm(self.hidden_states(tokens), self.w["model.norm.weight"])
        return (h @ self.w["lm_head.weight"].t()).to(self.acc)

    def logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        """[T, V] fp32 log-probabilities of the token after each position."""
        return torch.log_softmax(self.logits(tokens), dim=-1)

    def greedy_generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Argmax decoding (full recompute per step); returns only the new tokens."""
        seq = list(prompt)
        for _ in range(max_new_tokens):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(prompt):]

    # ---- MTP ----
    @torch.no_grad()
    def mtp_layer(self, k: int, h_prev: torch.Tensor, next_tokens: Sequence[int], positions: torch.Tensor):
        """MTP layer k (weights at model.layers.{num_hidden_layers + k}): z = eh_proj([enorm(embed(next));
        hnorm(h_prev)]) -> one decoder layer -> (logits [T, V] fp32 from shared_head, hidden [T, H] before
        the head norm, which MTP layer k+1 consumes)."""
        i = self.n_layers + k
        p, w = f"model.layers.{i}.", self.w
        e = self.rms_norm(self.embed(next_tokens), w[p + "enorm.weight"])
        h = self.rms_norm(h_prev.to(self.dtype), w[p + "hnorm.weight"])
        z = torch.cat([e, h], dim=-1) @ w[p + "eh_proj.weight"].t()
        out = self.decoder_layer(i, z, positions)
        logits = self.rms_norm(out, w[p + "shared_head.norm.weight"]) @ w[p + "shared_head.output.weight"].t()
        return logits.float(), out

    @torch.no_grad()
    def mtp_chain_logits(self, tokens: Sequence[int]) -> list[torch.Tensor]:
        """Chain-style MTP over a known sequence: layer 0 reads the target's pre-norm hidden state at
        position t and token t+1; layer k reads layer k-1's hidden state and token t+1+k. Returns, per
        layer k, logits [T-1-k, V] predicting token t+2+k."""
        h = self.hidden_states(tokens)
        out = []
        for k in range(self.n_mtp):
            n = len(tokens) - 1 - k
            if n <= 0:
                break
            logits, h = self.mtp_layer(k, h[:n], tokens[1 + k:1 + k + n], torch.arange(n))
            out.append(logits)
        return out

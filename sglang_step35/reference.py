"""The plain Step-3.5 model: one gpt-fast-style PyTorch forward, written from the spec.

The oracle of the parity tests, the forward of the trainable model (`training/model.py`) and the
expert math of the EP reference (tests/reference/ep_reference.py). It imports neither SGLang nor
the rest of this package (loadable by path where only torch is installed) and resolves each layer's
settings again from the raw config dict, so a bug in `sglang_step35.config` cannot hide in both
sides of a comparison. No KV cache: every call recomputes the whole sequence (slow, but it cannot
have a cache bug). Blocks take [..., T, H] (a batch dimension or none) and positions [T].

Knobs, some of which model *other* implementations (to show that a comparison can fail):
- `window`: keys a sliding layer sees, INCLUDING the current one (spec: key_pos > q_pos - window).
  Default: config `sliding_window`; `None` turns the window off; `sliding_window + 1` is what SGLang's
  built-in model computes (it passes `sliding_window` as SGLang's "keys before the query" size).
- `routed_clamp` / `shared_clamp`: False drops the SwiGLU limit of routed / shared experts (SGLang's
  built-in CPU MoE path drops the routed one).
- `dtype` (activations; "fp32" math runs in fp64 when dtype is fp64), `weights` (a name -> tensor
  dict instead of the directory's model.safetensors), `device`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

_CONFIG_WINDOW = object()  # sentinel: use the config's sliding_window
_FP32_TENSORS = ("router_bias", "moe.gate.weight")  # the router runs in fp32 whatever the dtype


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
    """x [..., T, heads, D]: rotate the first 2*len(inv_freq) dims NeoX style (first half / second
    half of that slice are the pair), in fp64; leave the rest of each head untouched."""
    rot = 2 * inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(positions.device)[None, :]  # [T, rot/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # broadcast over heads
    xr = x[..., :rot].to(torch.float64)
    x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    return torch.cat([rotated, x[..., rot:]], dim=-1)


# --- the MoE math (also the EP reference's) ----------------------------------------------------------
def swiglu(x, gate_w, up_w, down_w, limit: float = 0.0) -> torch.Tensor:
    """down(act * up), act = silu(gate), in (at least) fp32; with limit L > 0: act = min(act, L) (from
    above only) and up = clamp(up, ±L). Weights are [I, H], [I, H], [H, I]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    act, up = F.silu((x @ gate_w.t()).to(acc)), (x @ up_w.t()).to(acc)
    if limit and limit > 0:
        act, up = act.clamp(max=limit), up.clamp(-limit, limit)
    return (act * up).to(x.dtype) @ down_w.t()


def route(x, router_w, bias: Optional[torch.Tensor], top_k: int, scaling: float = 1.0, renormalize: bool = True):
    """Step's router on x [N, H]: sigmoid scores (in at least fp32), top-k of `scores + bias` (bias
    selects only), the chosen *unbiased* scores renormalised, times `scaling`. Returns (ids, weights)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    scores = torch.sigmoid(x.to(ct) @ router_w.t().to(ct))
    ids = (scores if bias is None else scores + bias.to(ct)).topk(top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return ids, weights * scaling


def routed_experts(x, gate, up, down, ids, weights, limit: float = 0.0, experts=None) -> torch.Tensor:
    """Sum of weight * expert(x) over each token's chosen experts that are in `experts` (all when None),
    experts stacked on dim 0; each expert runs once, on its tokens. Accumulated in (at least) fp32."""
    acc = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    for e in ids.unique().tolist() if experts is None else experts:
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel():
            y = swiglu(x[tok], gate[e], up[e], down[e], limit)
            out.index_add_(0, tok, weights[tok, slot, None].to(acc) * y.to(acc))
    return out


# --- the model ---------------------------------------------------------------------------------------
class Step35Reference:
    """Step-3.5 causal LM (+ its MTP layers) from a checkpoint directory (see the module notes)."""

    def __init__(self, ckpt_dir, dtype: torch.dtype = torch.float32, window=_CONFIG_WINDOW,
                 routed_clamp: bool = True, shared_clamp: bool = True, weights: Optional[dict] = None,
                 device=None):
        ckpt_dir = Path(ckpt_dir)
        if weights is None:
            from safetensors.torch import load_file

            weights = load_file(str(ckpt_dir / "model.safetensors"))
        # Cast once: checkpoint values (bf16) up, the router (fp32 in the checkpoint) kept in fp32.
        w = {k: v.to(device=device, dtype=torch.float32 if k.endswith(_FP32_TENSORS) else dtype)
             for k, v in weights.items()}
        self.setup(json.loads((ckpt_dir / "config.json").read_text()), w, dtype, window, routed_clamp, shared_clamp)

    def setup(self, cfg: dict, w: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
              window=_CONFIG_WINDOW, routed_clamp: bool = True, shared_clamp: bool = True) -> None:
        """Config dict + checkpoint-named tensors `w` (used as they are: a subclass may pass live
        parameters)."""
        self.cfg, self.w, self.dtype = cfg, w, dtype
        self.acc = torch.promote_types(dtype, torch.float32)  # softmax, SwiGLU, expert sums, norms
        self.n_layers = int(cfg["num_hidden_layers"])
        self.n_mtp = int(cfg.get("num_nextn_predict_layers") or 0)
        self.eps = float(cfg["rms_norm_eps"])
        self.window = cfg.get("sliding_window") if window is _CONFIG_WINDOW else window
        self.routed_clamp, self.shared_clamp = routed_clamp, shared_clamp
        moe = cfg.get("moe_layers_enum")
        if isinstance(moe, str):
            self.moe_layers = {int(s) for s in moe.split(",") if s.strip()}
        else:
            self.moe_layers = set(range(self.n_layers)) if moe is None else {int(s) for s in moe}
        self._inv_freq: dict[int, torch.Tensor] = {}

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
        """Layer i's rope frequencies (fp64): partial rotary, per-layer theta, llama3 scaling on the
        config's `yarn_only_types` (the full-attention layers)."""
        if i not in self._inv_freq:
            rotary_dim = int(self.heads(i)[2] * float(self._per_layer("partial_rotary_factors", i, 1.0)))
            f = rope_inv_freq(rotary_dim, float(self._per_layer("rope_theta", i, 10000.0)))
            scaling = self.cfg.get("rope_scaling")
            if scaling and self.cfg["layer_types"][i] in (self.cfg.get("yarn_only_types") or []):
                kind = scaling.get("rope_type", scaling.get("type"))
                if kind != "llama3":
                    raise NotImplementedError(f"reference implements llama3 rope scaling only, config has {kind!r}")
                f = llama3_inv_freq(f, scaling)
            self._inv_freq[i] = f
        return self._inv_freq[i]

    # ---- blocks ----
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Gemma RMSNorm over the last dim: x / rms(x) * (1 + w), computed in (at least) fp32."""
        xf = x.to(self.acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + w.to(self.acc))).to(x.dtype)

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x is the normed layer input [..., T, H]; returns o_proj(gate * softmax(qk^T/sqrt(d) + mask) v)."""
        p, w = f"model.layers.{i}.self_attn.", self.w
        *lead, T, _ = x.shape
        nh, nkv, d = self.heads(i)
        q = (x @ w[p + "q_proj.weight"].t()).view(*lead, T, nh, d)
        k = (x @ w[p + "k_proj.weight"].t()).view(*lead, T, nkv, d)
        v = (x @ w[p + "v_proj.weight"].t()).view(*lead, T, nkv, d)
        q, k = self.rms_norm(q, w[p + "q_norm.weight"]), self.rms_norm(k, w[p + "k_norm.weight"])  # per head
        f = self.inv_freq(i)
        q, k = apply_neox_rope(q, positions, f), apply_neox_rope(k, positions, f)
        # GQA: query head h reads kv group h // (nh / nkv).
        k, v = k.repeat_interleave(nh // nkv, dim=-2), v.repeat_interleave(nh // nkv, dim=-2)
        scores = torch.einsum("...qhd,...khd->...hqk", q.to(self.acc), k.to(self.acc)) * d**-0.5
        qp, kp = positions[:, None], positions[None, :]
        allowed = kp <= qp
        if self.is_sliding(i) and self.window is not None:
            allowed = allowed & (kp > qp - self.window)  # the last `window` keys, current one included
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out = torch.einsum("...hqk,...khd->...qhd", probs, v.to(self.acc)).to(x.dtype)  # [..., T, nh, d]
        if self.cfg.get("use_head_wise_attn_gate", True):
            gate = torch.sigmoid((x @ w[p + "g_proj.weight"].t()).to(self.acc))  # one scalar per query head
            out = (out.to(self.acc) * gate[..., None]).to(x.dtype)
        return out.reshape(*lead, T, nh * d) @ w[p + "o_proj.weight"].t()

    def route(self, i: int, x: torch.Tensor):
        """MoE layer i's router on x [N, H] (fp32): (expert ids, weights) [N, top_k]."""
        c, p = self.cfg, f"model.layers.{i}.moe."
        bias = self.w[p + "router_bias"] if c.get("use_moe_router_bias", True) else None
        return route(x.float(), self.w[p + "gate.weight"], bias, int(c["moe_top_k"]),
                     float(c.get("moe_router_scaling_factor") or 1.0), bool(c.get("norm_expert_weight", True)))

    def moe(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Routed experts (biased top-k, per-layer clamp) plus the always-on shared expert."""
        p, w = f"model.layers.{i}.", self.w
        flat = x.reshape(-1, x.shape[-1])
        ids, weights = self.route(i, flat)
        limit = float(self._per_layer("swiglu_limits", i, 0.0)) if self.routed_clamp else 0.0
        out = routed_experts(flat, w[p + "moe.gate_proj.weight"], w[p + "moe.up_proj.weight"],
                             w[p + "moe.down_proj.weight"], ids, weights, limit)
        shared_limit = float(self._per_layer("swiglu_limits_shared", i, 0.0)) if self.shared_clamp else 0.0
        shared = swiglu(flat, w[p + "share_expert.gate_proj.weight"], w[p + "share_expert.up_proj.weight"],
                        w[p + "share_expert.down_proj.weight"], shared_limit)
        return (out + shared.to(self.acc)).to(x.dtype).view(x.shape)

    def ffn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if i < self.n_layers and i in self.moe_layers:
            return self.moe(i, x)
        p, w = f"model.layers.{i}.mlp.", self.w  # dense layers and the MTP layers' FFN
        limit = float(self._per_layer("swiglu_limits_shared", i, 0.0)) if self.shared_clamp else 0.0
        return swiglu(x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"], limit)

    def decoder_layer(self, i: int, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """h = x + Attn(norm_in(x)); y = h + FFN(norm_post(h))."""
        p = f"model.layers.{i}."
        h = x + self.attention(i, self.rms_norm(x, self.w[p + "input_layernorm.weight"]), positions)
        return h + self.ffn(i, self.rms_norm(h, self.w[p + "post_attention_layernorm.weight"]))

    # ---- whole model, batched: ids [B, T] or [T]; gradients flow (training uses these) ----
    def _ids(self, tokens) -> torch.Tensor:
        tokens = tokens if isinstance(tokens, torch.Tensor) else list(tokens)
        return torch.as_tensor(tokens, dtype=torch.long, device=self.w["model.embed_tokens.weight"].device)

    def embed(self, tokens) -> torch.Tensor:
        return self.w["model.embed_tokens.weight"][self._ids(tokens)]

    def trunk(self, tokens) -> torch.Tensor:
        """Last main layer's output [..., T, H], before the final norm (what MTP layer 0 consumes)."""
        x = self.embed(tokens)
        positions = torch.arange(x.shape[-2], device=x.device)
        for i in range(self.n_layers):
            x = self.decoder_layer(i, x, positions)
        return x

    def main_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, self.w["model.norm.weight"]) @ self.w["lm_head.weight"].t()

    def mtp_states(self, tokens, x: torch.Tensor) -> list[torch.Tensor]:
        """Chain-style MTP over a known sequence: layer k (checkpoint layer num_hidden_layers + k) reads
        token t+1+k and layer k-1's pre-head-norm state at t (the trunk's `x` for k = 0):
        z = eh_proj([enorm(embed(token)); hnorm(h)]) -> one decoder layer. Returns each layer's state."""
        ids, out, h = self._ids(tokens), [], x
        for k in range(self.n_mtp):
            T = ids.shape[-1] - 1 - k
            if T <= 0:
                break
            p = f"model.layers.{self.n_layers + k}."
            e = self.rms_norm(self.embed(ids[..., 1 + k: 1 + k + T]), self.w[p + "enorm.weight"])
            z = torch.cat([e, self.rms_norm(h[..., :T, :].to(self.dtype), self.w[p + "hnorm.weight"])], dim=-1)
            h = self.decoder_layer(self.n_layers + k, z @ self.w[p + "eh_proj.weight"].t(), torch.arange(T, device=z.device))
            out.append(h)
        return out

    def mtp_head(self, k: int, h: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{self.n_layers + k}.shared_head."
        return self.rms_norm(h, self.w[p + "norm.weight"]) @ self.w[p + "output.weight"].t()

    def forward(self, tokens) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main logits [..., T, V], per MTP layer k logits [..., T-1-k, V] predicting token t+2+k)."""
        x = self.trunk(tokens)
        return self.main_head(x), [self.mtp_head(k, h) for k, h in enumerate(self.mtp_states(tokens, x))]

    # ---- the oracle's API: no gradients, fp32 (fp64 when the reference is) results ----
    @torch.no_grad()
    def hidden_states(self, tokens: Sequence[int]) -> torch.Tensor:
        return self.trunk(tokens)

    @torch.no_grad()
    def logits(self, tokens: Sequence[int]) -> torch.Tensor:
        """[..., T, V] next-token logits at every position."""
        return self.main_head(self.trunk(tokens)).to(self.acc)

    def logprobs(self, tokens: Sequence[int]) -> torch.Tensor:
        """[..., T, V] log-probabilities of the token after each position."""
        return torch.log_softmax(self.logits(tokens), dim=-1)

    def greedy_generate(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """Argmax decoding (full recompute per step); returns only the new tokens."""
        seq = list(prompt)
        for _ in range(max_new_tokens):
            seq.append(int(self.logits(seq)[-1].argmax()))
        return seq[len(prompt):]

    @torch.no_grad()
    def mtp_chain_logits(self, tokens) -> list[torch.Tensor]:
        """Per MTP layer k, fp32 logits [..., T-1-k, V] predicting token t+2+k (see `mtp_states`)."""
        x = self.trunk(tokens)
        return [self.mtp_head(k, h).float() for k, h in enumerate(self.mtp_states(tokens, x))]

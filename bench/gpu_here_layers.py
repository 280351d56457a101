"""`layers` step of bench/gpu_check_here.py: one decoder layer of each kind at real width (dense on
layer 0, MoE on layer 3, clamped MoE on layer 44: Step-3.5-Flash's per-layer settings from its config),
decoding in bf16 the way our layer does on a GPU (Gemma RMSNorm, fused QKV, per-head q/k norm, NeoX
partial RoPE with llama3 scaling on full layers, KV written to the cache then SGLang's Triton decode
attention with the triton backend's window rail, our Triton head gate, our router + SGLang's fused MoE
on this EP4 rank's 72 experts, our SwiGLU clamp on the shared expert / dense MLP), against the fp32
plain-PyTorch reference (sglang_step35/reference.py, loaded by path) over the whole sequence, with
other ranks' experts zeroed there (this rank's partial sum, before the EP all-reduce). The decode step
is captured and replayed as a CUDA graph (a host sync or an allocation outside the pool fails the
capture, which is reported); decode batch 1/16/64 timings."""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_here_common import ROOT, act_dtype, capture, max_rel_err, median_seconds, reps, sync

TOL = 5e-2  # bf16 activations through ~10 roundings vs fp32, relative to the largest output element
EP_SIZE, EP_RANK = 4, 0
NEAR_TIE = 2e-3  # k-th vs (k+1)-th biased score: closer than bf16 noise in the logits
LAYERS = {"dense": 0, "moe": 3, "moe_clamped": 44}


def load_reference():
    name = "gpu_here_step35_ref"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "sglang_step35" / "reference.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def make_weights(cfg, i, spec, device, g):
    """Checkpoint-named weights of layer i, bf16-representable fp32 (both sides read the same values)."""
    H = int(cfg["hidden_size"])
    hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim

    def lin(out, inp, *lead):
        return (torch.randn(*lead, out, inp, device=device, generator=g) / inp**0.5).bfloat16().float()

    p = f"model.layers.{i}."
    w = {p + "input_layernorm.weight": lin(1, 1, H)[..., 0, 0] * 0.1,
         p + "post_attention_layernorm.weight": lin(1, 1, H)[..., 0, 0] * 0.1}
    a = p + "self_attn."
    w.update({a + "q_proj.weight": lin(hq * d, H), a + "k_proj.weight": lin(hkv * d, H), a + "v_proj.weight": lin(hkv * d, H),
              a + "o_proj.weight": lin(H, hq * d), a + "g_proj.weight": lin(hq, H),
              a + "q_norm.weight": lin(1, 1, d)[..., 0, 0] * 0.1, a + "k_norm.weight": lin(1, 1, d)[..., 0, 0] * 0.1})
    if spec.is_moe:
        E, inter, sh = int(cfg["moe_num_experts"]), int(cfg["moe_intermediate_size"]), int(cfg["share_expert_dim"])
        n_local = E // EP_SIZE
        lo = EP_RANK * n_local
        m = p + "moe."
        down = torch.zeros(E, H, inter, device=device)  # other ranks' experts contribute nothing here
        down[lo:lo + n_local] = lin(H, inter, n_local)
        def gate_up():
            t = torch.zeros(E, inter, H, device=device)
            t[lo:lo + n_local] = lin(inter, H, n_local) * 8  # std 8 (exact in bf16): the clamps (7, 16) act
            return t
        bias = torch.zeros(E, device=device)
        bias[lo:lo + n_local] = 0.2  # this rank gets a good share of the picks
        w.update({m + "gate.weight": lin(E, H), m + "router_bias": bias, m + "gate_proj.weight": gate_up(),
                  m + "up_proj.weight": gate_up(), m + "down_proj.weight": down,
                  p + "share_expert.gate_proj.weight": lin(sh, H) * 8, p + "share_expert.up_proj.weight": lin(sh, H) * 8,
                  p + "share_expert.down_proj.weight": lin(H, sh)})
    else:
        inter = int(cfg["intermediate_size"])
        w.update({p + "mlp.gate_proj.weight": lin(inter, H), p + "mlp.up_proj.weight": lin(inter, H),
                  p + "mlp.down_proj.weight": lin(H, inter)})
    return w


class Bf16Layer:
    """Our decoder layer's GPU math in bf16 with a paged KV cache (page size 1)."""

    def __init__(self, cfg, i, spec, w, ref, sgl, device, n_slots):
        from sglang_step35.attention.window import runner_sliding_window_size

        self.cfg, self.spec, self.sgl, self.device = cfg, spec, sgl, device
        self.impl = "cuda"  # our Triton kernels; on CPU tensors they run in the interpreter
        p = f"model.layers.{i}."
        self.dt = dt = act_dtype(device)
        b = {k[len(p):]: v.to(dt) for k, v in w.items() if not k.endswith(("router_bias", "moe.gate.weight"))}
        self.b = b
        a = "self_attn."
        self.wqkv = torch.cat([b[a + "q_proj.weight"], b[a + "k_proj.weight"], b[a + "v_proj.weight"]])
        self.eps = float(cfg["rms_norm_eps"])
        self.inv_freq = ref.inv_freq(i).float().to(device)
        self.window = runner_sliding_window_size("triton", int(cfg["sliding_window"])) if spec.sliding else None
        hkv, d = spec.num_kv_heads, spec.head_dim
        self.k_cache = torch.zeros(n_slots, hkv, d, device=device, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        if spec.is_moe:
            E = int(cfg["moe_num_experts"])
            self.n_local = E // EP_SIZE
            lo = EP_RANK * self.n_local
            sl = slice(lo, lo + self.n_local)
            self.w13 = torch.cat([b["moe.gate_proj.weight"][sl], b["moe.up_proj.weight"][sl]], dim=1).contiguous()
            self.w2 = b["moe.down_proj.weight"][sl].contiguous()
            self.gate = w[p + "moe.gate.weight"].float()
            self.bias = w[p + "moe.router_bias"].float()
            self.s13 = torch.cat([b["share_expert.gate_proj.weight"], b["share_expert.up_proj.weight"]])
        else:
            self.m13 = torch.cat([b["mlp.gate_proj.weight"], b["mlp.up_proj.weight"]])

    def norm(self, x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + w.float())).to(x.dtype)

    def rope(self, x, pos):
        rot = 2 * self.inv_freq.numel()
        ang = pos.float()[:, None] * self.inv_freq[None, :]
        cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
        xr = x[..., :rot].float()
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        return torch.cat([torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype), x[..., rot:]], -1)

    def qkv(self, xn, pos):
        hq, hkv, d = self.spec.num_heads, self.spec.num_kv_heads, self.spec.head_dim
        qkv = F.linear(xn, self.wqkv)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
        q = self.norm(q.reshape(-1, hq, d), self.b["self_attn.q_norm.weight"])
        k = self.norm(k.reshape(-1, hkv, d), self.b["self_attn.k_norm.weight"])
        return self.rope(q, pos), self.rope(k, pos), v.reshape(-1, hkv, d)

    def fill(self, x_ctx, slots):
        """Prefill the cache with the context's keys/values (positions 0..L-1)."""
        _, k, v = self.qkv(self.norm(x_ctx, self.b["input_layernorm.weight"]), torch.arange(len(slots), device=self.device))
        self.k_cache[slots] = k
        self.v_cache[slots] = v

    def ffn(self, h):
        from sglang_step35 import ops

        if not self.spec.is_moe:
            return F.linear(ops.swiglu_clamp(F.linear(h, self.m13), self.spec.swiglu_limit_shared, impl=self.impl),
                            self.b["mlp.down_proj.weight"])
        c = self.cfg
        logits = F.linear(h.float(), self.gate)
        tw, ids = ops.sigmoid_topk_route(logits, self.bias, int(c["moe_top_k"]), float(c["moe_router_scaling_factor"]),
                                         impl=self.impl)
        local = ids - EP_RANK * self.n_local
        local = torch.where((local >= 0) & (local < self.n_local), local, -1).to(torch.int32)
        lim = self.spec.swiglu_limit or None
        routed = self.sgl["fused_moe"](h, self.w13, self.w2, self.sgl["StandardTopKOutput"](tw, local, logits),
                                       self.sgl["MoeRunnerConfig"](inplace=False, gemm1_clamp_limit=lim))
        sh = ops.swiglu_clamp(F.linear(h, self.s13), self.spec.swiglu_limit_shared, impl=self.impl)
        return routed + F.linear(sh, self.b["share_expert.down_proj.weight"])

    def decode_fn(self, x, pos, out_loc, ctx_slots):
        """A no-argument decode step over static buffers (what a CUDA graph replays); returns it and
        the output buffer. ctx_slots[i]: the slots of request i's context, its new token at out_loc[i]."""
        from sglang_step35 import ops

        spec = self.spec
        hq, d = spec.num_heads, spec.head_dim
        seqs = [torch.cat([s, out_loc[i:i + 1]]) for i, s in enumerate(ctx_slots)]
        keep = [s[-self.window:] if self.window else s for s in seqs]
        indptr = torch.tensor([0] + [sum(len(k) for k in keep[:i + 1]) for i in range(len(keep))],
                              dtype=torch.int32, device=self.device)
        indices = torch.cat(keep).long()
        splits = 8
        b = x.shape[0]
        logits_buf = torch.empty(b, hq, splits, d, device=self.device, dtype=torch.float32)
        lse = torch.empty(b, hq, splits, device=self.device, dtype=torch.float32)
        nsplit = torch.tensor([min(splits, len(k)) for k in keep], dtype=torch.int32, device=self.device)
        o = torch.empty(b, hq, d, device=self.device, dtype=self.dt)
        out = torch.empty_like(x)

        def step():
            xn = self.norm(x, self.b["input_layernorm.weight"])
            q, k, v = self.qkv(xn, pos)
            self.k_cache.index_copy_(0, out_loc, k)
            self.v_cache.index_copy_(0, out_loc, v)
            self.sgl["decode"].decode_attention_fwd(q, self.k_cache, self.v_cache, o, indptr, indices, logits_buf, lse,
                                                    nsplit, splits, d**-0.5, 1.0, 1.0, enable_lean=False)
            gl = F.linear(xn, self.b["self_attn.g_proj.weight"])
            att = F.linear(ops.head_gate(o.reshape(b, hq * d), gl, hq, impl=self.impl), self.b["self_attn.o_proj.weight"])
            h = x + att
            out.copy_(h + self.ffn(self.norm(h, self.b["post_attention_layernorm.weight"])))
        return step, out


def run(cfg: dict, device: str, tiny: bool, sgl: dict) -> dict:
    from sglang_step35.config import layer_spec

    refmod = load_reference()
    H = int(cfg["hidden_size"])
    W = int(cfg["sliding_window"])
    ctx_lens = [3, W + 2, 2 * W + 5] if tiny else [37, W - 1, 600, 1000]
    time_batches, time_ctx = ([2], 2 * W) if tiny else ([1, 16, 64], 1024)
    n_slots = max(time_batches) * (time_ctx + 1) + sum(ctx_lens) + len(ctx_lens) + 8
    checks, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        for kind, i in LAYERS.items():
            spec = layer_spec(cfg, i)
            g = torch.Generator(device=device).manual_seed(10 + i)
            prev = torch.get_default_device() if hasattr(torch, "get_default_device") else None
            torch.set_default_device(device)  # the reference allocates without naming a device
            try:
                w = make_weights(cfg, i, spec, device, g)
                ref = refmod.Step35Reference(tmp, dtype=torch.float32, weights=w)
            finally:
                torch.set_default_device(prev)
            layer = Bf16Layer(cfg, i, spec, w, ref, sgl, device, n_slots)
            # --- correctness: several requests, each with its own context
            xs = [torch.randn(n + 1, H, device=device, generator=g).to(act_dtype(device)) for n in ctx_lens]
            perm = torch.randperm(n_slots, device=device, generator=g)
            ctx_slots, at = [], 0
            for n in ctx_lens:
                ctx_slots.append(perm[at:at + n])
                at += n
            out_loc = perm[at:at + len(ctx_lens)].contiguous()
            for xseq, s in zip(xs, ctx_slots):
                layer.fill(xseq[:-1], s)
            x = torch.stack([xseq[-1] for xseq in xs])
            pos = torch.tensor(ctx_lens, device=device)
            step, out = layer.decode_fn(x, pos, out_loc, ctx_slots)
            step()
            worst, flips = 0.0, 0
            for r, xseq in enumerate(xs):
                torch.set_default_device(device)
                try:
                    p = f"model.layers.{i}."
                    xf = xseq.float()
                    positions = torch.arange(xf.shape[0])
                    h = xf + ref.attention(i, ref.rms_norm(xf, ref.w[p + "input_layernorm.weight"]), positions)
                    hn = ref.rms_norm(h, ref.w[p + "post_attention_layernorm.weight"])
                    y = (h + ref.ffn(i, hn))[-1]
                finally:
                    torch.set_default_device(prev)
                if spec.is_moe:  # a near-tie that bf16 rounding may route differently is no kernel error
                    sel = torch.sigmoid(hn[-1] @ ref.w[p + "moe.gate.weight"].t()) + layer.bias
                    top = sel.topk(int(cfg["moe_top_k"]) + 1).values
                    if float(top[-2] - top[-1]) < NEAR_TIE:
                        flips += 1
                        continue
                worst = max(worst, max_rel_err(out[r] - x[r].float(), y - xseq[-1].float()))
            checks.append({"check": f"{kind} layer {i} ({spec.num_heads} heads, {'sliding' if spec.sliding else 'full'}, "
                           f"clamp {spec.swiglu_limit:g}/{spec.swiglu_limit_shared:g}) bf16 decode vs fp32 reference, "
                           f"{len(ctx_lens)} requests", "ok": worst <= TOL and flips <= 1, "value": worst, "limit": TOL,
                           "router_near_ties_skipped": flips})
            # --- CUDA graph capture and replay, decode timings
            for b in time_batches:
                xb = torch.randn(b, H, device=device, generator=g).to(act_dtype(device))
                cs = [perm[k * time_ctx:(k + 1) * time_ctx] for k in range(b)]
                loc = perm[b * time_ctx:b * time_ctx + b].contiguous()
                stepb, outb = layer.decode_fn(xb, torch.full((b,), time_ctx, device=device), loc, cs)
                run_, how = capture(stepb, device)
                if how == "cuda graph":
                    stepb()
                    eager = outb.clone()
                    run_()
                    sync(device)
                    same = max_rel_err(outb, eager)
                    checks.append({"check": f"{kind} layer decode batch {b}: graph replay == eager", "ok": same <= 1e-2,
                                   "value": same, "limit": 1e-2})
                sec = median_seconds(run_, device, reps(device))
                rows.append({"layer": i, "kind": kind, "batch": b, "context": time_ctx, "time_us": sec * 1e6, "timed_as": how})
            step = stepb = run_ = out = outb = None  # the closures hold the layer: free it before the next
            del layer, ref, w
            if device == "cuda":
                torch.cuda.empty_cache()
    sync(device)
    return {"checks": checks, "timings": rows}

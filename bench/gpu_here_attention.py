"""`attention` step of bench/gpu_check_here.py: SGLang's Triton decode and extend attention kernels
called as SGLang's triton backend calls them for our layers (sglang_step35/attention/window.py):
full layers 64 query heads, sliding layers 96, 8 KV heads, head_dim 128; on sliding layers the
layer value S = radix_sliding_window_size("triton", W) for extend and the runner's window rail of
R = runner_sliding_window_size("triton", W) keys for decode (triton_backend.update_sliding_window_buffer:
the last min(len, R) slots, offsets = len - that), so each query must see exactly W = 512 keys.
Several requests of different lengths per batch, KV in scattered page-size-1 slots, the split
buffers sized by the layer's own head count; output vs an fp32 reference with the window mask."""

from __future__ import annotations

import torch

from gpu_here_common import act_dtype, capture, copy_bandwidth, max_rel_err, median_seconds, reps, sync

TOL = 2e-2  # bf16 q/k/v and output, fp32 softmax in the kernel


def _rails(lens, slots_of, runner_window):
    """kv_indptr, kv_indices (int64), offsets of the last min(len, R) keys of each request (R None: all)."""
    starts = [max(0, n - runner_window) if runner_window else 0 for n in lens]
    idx = [slots_of[i][s:n] for i, (s, n) in enumerate(zip(starts, lens))]
    dev = slots_of[0].device
    indptr = torch.tensor([0] + [sum(len(x) for x in idx[:i + 1]) for i in range(len(idx))], dtype=torch.int32, device=dev)
    indices = torch.cat(idx).long() if idx else torch.empty(0, dtype=torch.long, device=dev)
    return indptr, indices, torch.tensor(starts, dtype=torch.int32, device=dev)


def reference(q, k_all, v_all, q_pos, window, scale):
    """q [M, Hq, D] at positions q_pos; k_all/v_all [L, Hkv, D] positions 0..L-1; fp32."""
    hq, hkv = q.shape[1], k_all.shape[1]
    k = k_all.float().repeat_interleave(hq // hkv, 1)
    v = v_all.float().repeat_interleave(hq // hkv, 1)
    s = torch.einsum("mhd,lhd->hml", q.float(), k) * scale
    kp = torch.arange(k_all.shape[0], device=q.device)[None, :]
    allowed = kp <= q_pos[:, None]
    if window:
        allowed &= kp > q_pos[:, None] - window
    p = s.masked_fill(~allowed[None], float("-inf")).softmax(-1)
    return torch.einsum("hml,lhd->mhd", p, v)


def run(cfg: dict, device: str, tiny: bool, sgl: dict) -> dict:
    from sglang_step35.attention.window import (
        keys_seen,
        radix_sliding_window_size,
        runner_sliding_window_size,
    )
    from sglang_step35.config import layer_spec

    decode_fwd, extend_fwd = sgl["decode"].decode_attention_fwd, sgl["extend"].extend_attention_fwd
    W = int(cfg["sliding_window"])
    S, R = radix_sliding_window_size("triton", W), runner_sliding_window_size("triton", W)
    g = torch.Generator(device=device).manual_seed(2)
    dt = act_dtype(device)
    checks = [{"check": "triton layer value sees W keys (window.py)", "ok": keys_seen("triton", S) == W,
               "value": keys_seen("triton", S), "limit": W}]
    rows = []
    bw = copy_bandwidth(device)
    if tiny:
        dec_lens, ext = [1, W - 1, W, W + 1, 2 * W + 3], [(0, 3), (2 * W, 2)]
        time_batches, time_len = [2], 2 * W
    else:
        dec_lens, ext = [1, 100, W - 1, W, W + 1, 700, 1500, 4000], [(0, 64), (300, 200), (1200, 100)]
        time_batches, time_len = [1, 16, 64], 4096
    for name, spec in (("full", layer_spec(cfg, 0)), ("sliding", layer_spec(cfg, 1))):
        hq, hkv, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
        window = W if spec.sliding else None
        scale = d**-0.5
        max_len = max(max(dec_lens), max(p + e for p, e in ext), time_len)
        n_slots = 64 * time_len + 4 * max_len + 8
        k_buf = torch.randn(n_slots, hkv, d, device=device, generator=g).to(dt)
        v_buf = torch.randn(n_slots, hkv, d, device=device, generator=g).to(dt)

        def slots(lens):
            perm = torch.randperm(n_slots, device=device, generator=g)
            out, at = [], 0
            for n in lens:
                out.append(perm[at:at + n])
                at += n
            return out

        # --- decode: one new token per request, its key already in the cache (as SGLang writes it first)
        def decode_call(lens):
            sl = slots(lens)
            b = len(lens)
            indptr, indices, _ = _rails(lens, sl, R if spec.sliding else None)
            splits = 8
            q = torch.randn(b, hq, d, device=device, generator=g).to(dt)
            o = torch.zeros(b, hq, d, device=device, dtype=dt)
            logits = torch.empty(b, hq, splits, d, device=device, dtype=torch.float32)  # sized by THIS layer's heads
            lse = torch.empty(b, hq, splits, device=device, dtype=torch.float32)
            nsplit = torch.tensor([min(splits, max(1, n)) for n in lens], dtype=torch.int32, device=device)

            def fn():
                decode_fwd(q, k_buf, v_buf, o, indptr, indices, logits, lse, nsplit, splits, scale, 1.0, 1.0,
                           enable_lean=False)
            return fn, q, o, sl

        fn, q, o, sl = decode_call(dec_lens)
        fn()
        worst = 0.0
        for i, n in enumerate(dec_lens):
            ref = reference(q[i:i + 1], k_buf[sl[i]], v_buf[sl[i]], torch.tensor([n - 1], device=device), window, scale)
            worst = max(worst, max_rel_err(o[i:i + 1], ref))
        checks.append({"check": f"decode {name} ({hq} heads, {len(dec_lens)} requests, lens {dec_lens}) vs fp32 "
                       f"{'W=' + str(W) + ' window' if window else 'causal'}", "ok": worst <= TOL, "value": worst,
                       "limit": TOL})
        if spec.sliding:  # the same output against one key more / less: the window check has teeth
            n = dec_lens[-1]
            for w_other in (W - 1, W + 1):
                ref = reference(q[-1:], k_buf[sl[-1]], v_buf[sl[-1]], torch.tensor([n - 1], device=device), w_other, scale)
                off = max_rel_err(o[-1:], ref)
                checks.append({"check": f"decode sliding differs from a {w_other}-key window (keys seen = {W})",
                               "ok": off > TOL, "value": off, "limit": TOL})
        for b in time_batches:
            fn, *_ = decode_call([time_len] * b)
            run_, how = capture(fn, device)
            sec = median_seconds(run_, device, reps(device))
            keys = min(time_len, R) if spec.sliding else time_len
            nbytes = 2 * b * keys * hkv * d * 2
            rows.append({"kernel": f"decode_{name}", "batch": b, "keys": keys, "bytes": nbytes, "time_us": sec * 1e6,
                         "roofline_us": nbytes / bw * 1e6, "efficiency": nbytes / bw / sec, "timed_as": how})

        # --- extend: prefix in the cache, new tokens' k/v passed alongside (and written to the cache)
        sl = slots([p + e for p, e in ext])
        prefix_lens = [p for p, _ in ext]
        indptr, indices, offsets = _rails(prefix_lens, [s[:p] for s, p in zip(sl, prefix_lens)],
                                          R if spec.sliding else None)
        ext_rows = [s[p:p + e] for s, (p, e) in zip(sl, ext)]
        flat = torch.cat(ext_rows)
        q = torch.randn(flat.numel(), hq, d, device=device, generator=g).to(dt)
        o = torch.zeros_like(q)
        qo = torch.tensor([0] + [sum(e for _, e in ext[:i + 1]) for i in range(len(ext))], dtype=torch.int32, device=device)
        extend_fwd(q, k_buf[flat].contiguous(), v_buf[flat].contiguous(), o, k_buf, v_buf, qo, indptr, indices, None,
                   True, None, max(e for _, e in ext), 1.0, 1.0, sm_scale=scale,
                   sliding_window_size=S if spec.sliding else -1, window_kv_offsets=offsets if spec.sliding else None)
        worst = 0.0
        for i, (p, e) in enumerate(ext):
            rows_q = slice(int(qo[i]), int(qo[i + 1]))
            ref = reference(q[rows_q], k_buf[sl[i]], v_buf[sl[i]], torch.arange(p, p + e, device=device), window, scale)
            worst = max(worst, max_rel_err(o[rows_q], ref))
        checks.append({"check": f"extend {name} ({hq} heads, prefix/extend {ext}) vs fp32", "ok": worst <= TOL,
                       "value": worst, "limit": TOL})
        k_buf = v_buf = None
    sync(device)
    return {"checks": checks, "timings": rows, "copy_gbps": bw / 1e9,
            "setup": {"window": W, "layer_value": S, "runner_value": R}}

"""Pure-torch implementations of the `sgl_kernel` CPU ops SGLang 0.5.23 calls on a GPU-less machine.

Signatures follow the call sites in SGLang (the op names are SGLang's). Each op mutates its output
arguments in place, like the C++ originals, and is tested in tests/test_cpu_ops.py against a plain
per-element reference.
"""

from __future__ import annotations

import ctypes
from typing import Optional

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For request i: req_to_token[req_pool_indices[i], start[i]:end[i]] = next slice of out_cache_loc.

    Called by sglang/srt/mem_cache/allocation.py for every decode/extend allocation on CPU.
    """
    del pool_len  # implied by req_to_token.shape[1]; kept for SGLang's call signature
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    pt = 0
    for row, s, e in zip(rows, starts, ends):
        n = e - s
        if n > 0:
            req_to_token[row, s:e] = out_cache_loc[pt : pt + n].to(req_to_token.dtype)
        pt += n


def _bytes_view(ptr: int, nbytes: int) -> torch.Tensor:
    # The op receives raw buffer addresses (one per KV layer buffer), as the C++ kernel does.
    buf = (ctypes.c_uint8 * nbytes).from_address(ptr)
    return torch.frombuffer(buf, dtype=torch.uint8)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer b (address data_ptrs[b], row size strides[b] bytes): row tgt[j] = row src[j].

    Safe when sources and targets overlap (all sources are read before any write), like SGLang's
    Triton kernel; used by speculative decoding to move accepted tokens' KV.
    """
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64)
    src = src_loc.to(torch.int64)
    rows = int(max(tgt.max().item(), src.max().item())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        view = _bytes_view(int(ptr), rows * int(stride)).view(rows, int(stride))
        view[tgt] = view[src].clone()




# --------------------------------------------------------------------------------------------------
# Speculative decoding (EAGLE / multi-layer EAGLE = Step-3.5 MTP) on CPU.
#
# SGLang 0.5.23 runs EAGLE on CPU only with its `intel_amx` attention backend (the draft backend
# factory refuses torch_native; torch_native cannot do TARGET_VERIFY), which calls the two attention
# ops below, and calls the bookkeeping ops that follow from sglang/kernels/ops/speculative/*.py.
# Semantics follow SGLang's Triton versions of the same kernels. Each is tested against a per-element
# reference in tests/test_cpu_ops_spec.py.
# --------------------------------------------------------------------------------------------------


def _attend(
    q: torch.Tensor,  # [M, Hq, D] query rows of one request
    keys: torch.Tensor,  # [L, Hkv, D]
    values: torch.Tensor,  # [L, Hkv, Dv]
    visible: torch.Tensor,  # [M, L] bool
    sm_scale: float,
    logit_cap: float,
    sink: Optional[torch.Tensor],  # [Hq] or None
) -> torch.Tensor:
    """softmax(q k^T * scale) v in fp32 for the query rows of one request -> [M, Hq, Dv]."""
    hq, hkv = q.shape[1], keys.shape[1]
    group = hq // hkv
    k = keys.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = values.float().repeat_interleave(group, dim=1)
    s = torch.einsum("mhd,lhd->hml", q.float(), k) * sm_scale  # [Hq, M, L]
    if logit_cap and logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    s = s.masked_fill(~visible.unsqueeze(0), float("-inf"))
    if sink is not None:
        # Attention sinks: an extra per-head logit that takes probability mass but has no value.
        s = torch.cat([s, sink.float().view(hq, 1, 1).expand(hq, s.shape[1], 1)], dim=-1)
        p = torch.softmax(s, dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    return torch.einsum("hml,lhd->mhd", p, v)


def _window_visible(k_pos: torch.Tensor, q_pos, window: int) -> torch.Tensor:
    # `window` counts the query's own key (SGLang passes layer.sliding_window_size + 1); <= 0: none.
    vis = k_pos <= q_pos
    if window > 0:
        vis &= k_pos > q_pos - window
    return vis


def extend_attention_cpu(
    q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, key_scale, value_scale,
    req_to_token, req_pool_indices, seq_lens, extend_seq_lens, extend_start_loc, max_len_extend,
    sm_scale, logit_cap, is_cross_attention=False, sliding_window_size=0, encoder_lens=None,  # noqa: ARG001 (the C++ op signature; no encoder-decoder models here)
    sinks=None, tree_mask=None, is_causal=True,
) -> None:
    """Prefill / draft-extend / target-verify attention (IntelAMXAttnBackend.forward_extend).

    Request i: queries q_extend[start_i : start_i + ext_i] at positions prefix_i.., prefix_i =
    seq_i - ext_i. Keys: the prefix from the KV pool (k_buffer[req_to_token[req_i, :prefix_i]]),
    then the extend keys k_extend. `tree_mask` (QLEN_ONLY, [bs, ext, ext] flattened) restricts which
    extend keys each extend query sees (EAGLE trees); the prefix stays visible.
    """
    del max_len_extend  # a tiling hint for the C++ kernel
    if is_cross_attention:
        raise NotImplementedError("extend_attention_cpu (sglang-step35): cross attention is not supported")
    dv = o_extend.shape[-1]
    rows = req_pool_indices.tolist()
    seqs = seq_lens.tolist()
    exts = extend_seq_lens.tolist()
    starts = extend_start_loc.tolist()
    mask_off = 0
    for b, (row, seq, ext, start) in enumerate(zip(rows, seqs, exts, starts)):
        prefix = seq - ext
        locs = req_to_token[row, :prefix].to(torch.int64)
        kp = k_buffer[locs].float() * key_scale if prefix else k_buffer[:0].float()
        vp = v_buffer[locs].float() * value_scale if prefix else v_buffer[:0].float()
        keys = torch.cat([kp, k_extend[start:start + ext].float()], dim=0)
        values = torch.cat([vp, v_extend[start:start + ext].float()[..., :dv]], dim=0)
        if ext == 0:
            continue
        if is_causal:
            vis = _window_visible(torch.arange(seq).view(1, -1), torch.arange(prefix, seq).view(-1, 1),
                                  int(sliding_window_size))
        else:
            vis = torch.ones(ext, seq, dtype=torch.bool)
        if tree_mask is not None:
            tm = tree_mask.reshape(-1)[mask_off:mask_off + ext * ext].view(ext, ext).bool()
            mask_off += ext * ext
            vis[:, prefix:] &= tm
        out = _attend(q_extend[start:start + ext], keys, values, vis, sm_scale, logit_cap, sinks)
        o_extend[start:start + ext] = out.to(o_extend.dtype)


def decode_attention_cpu(
    q, k_buffer, v_buffer, key_scale, value_scale, output, key, value, loc, attn_logits,
    req_to_token, req_pool_indices, seq_lens, sm_scale, logit_cap, is_cross_attention=False,
    sliding_window_size=0, encoder_lens=None, sinks=None,  # noqa: ARG001 (the C++ op signature)
) -> None:
    """One new token per request (IntelAMXAttnBackend.forward_decode): writes key/value (when given)
    at `loc` into the pool, then attends over req_to_token[req_i, :seq_i]."""
    del attn_logits  # split-K scratch of the C++ kernel
    if is_cross_attention:
        raise NotImplementedError("decode_attention_cpu (sglang-step35): cross attention is not supported")
    if key is not None and value is not None:
        idx = loc.to(torch.int64)
        k_buffer[idx] = key.view(-1, *k_buffer.shape[1:]).to(k_buffer.dtype)
        v_buffer[idx] = value.view(-1, *v_buffer.shape[1:]).to(v_buffer.dtype)
    for b, (row, seq) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        locs = req_to_token[row, :seq].to(torch.int64)
        keys = k_buffer[locs].float() * key_scale
        values = v_buffer[locs].float() * value_scale
        vis = _window_visible(torch.arange(seq), seq - 1, int(sliding_window_size)).view(1, -1)
        output[b] = _attend(q[b:b + 1], keys, values, vis, sm_scale, logit_cap, sinks)[0].to(output.dtype)


def assign_extend_cache_locs_cpu(
    req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len
) -> None:
    """out_cache_loc = concat_i req_to_token[req_i, start_i:end_i] (the inverse of
    assign_req_to_token_pool_cpu): KV slots of the draft/verify window."""
    del pool_len
    pt = 0
    for row, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        n = e - s
        if n > 0:
            out_cache_loc[pt:pt + n] = req_to_token[row, s:e].to(out_cache_loc.dtype)
        pt += n


def assign_draft_cache_locs_contiguous_cpu(
    req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk, num_cols
) -> None:
    """out_cache_loc[i*topk*num_cols + j] = req_to_token[req_i, seq_i + j], j < topk*num_cols."""
    del pool_len
    n = topk * num_cols
    for i, (row, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
        out_cache_loc[i * n:(i + 1) * n] = req_to_token[row, s:s + n].to(out_cache_loc.dtype)


def rotate_input_ids_cpu(input_ids, extend_start_loc, extend_seq_lens, topk_index, select_index=None) -> None:
    """Per request: shift its window of input_ids left by one and put the newly drafted token at the
    window's last row (or at select_index[i]). Advances MTP step i -> i+1."""
    new_tokens = topk_index.reshape(-1).tolist()
    sel = select_index.tolist() if select_index is not None else None
    for i, (s, n) in enumerate(zip(extend_start_loc.tolist(), extend_seq_lens.tolist())):
        if n <= 0:
            continue
        if n > 1:
            input_ids[s:s + n - 1] = input_ids[s + 1:s + n].clone()
        input_ids[sel[i] if sel is not None else s + n - 1] = new_tokens[i]


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride) -> None:
    """bonus_tokens[i] = accept_tokens[accept_stride * i + accept_lens[i] - 1] (last accepted)."""
    flat = accept_tokens.reshape(-1)
    for i, n in enumerate(accept_lens.tolist()):
        bonus_tokens[i] = flat[accept_stride * i + n - 1]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """Compact the KV slots of accepted tokens: the k-th non-negative entry of accept_index
    (flattened) writes out_cache_loc[accept_index[.]] to accept_out_cache_loc[k]."""
    flat = accept_index.reshape(-1)
    keep = flat[flat >= 0].to(torch.int64)
    accept_out_cache_loc[: keep.numel()] = out_cache_loc[keep].to(accept_out_cache_loc.dtype)


def build_tree_kernel_efficient_cpu(
    parent_list, selected_index, verified_seq_len, tree_mask, positions, retrieve_index,
    retrieve_next_token, retrieve_next_sibling, topk, depth, draft_token_num, tree_mask_mode,
) -> None:
    """EAGLE draft tree -> verify mask, positions and retrieve links (SGLang's
    sgl_build_tree_kernel_efficient_triton, one request at a time). Mask modes: 0 FULL_MASK
    (rows of prefix + draft keys), 1 QLEN_ONLY (draft x draft; what the CPU path uses)."""
    mode = int(tree_mask_mode)
    if mode not in (0, 1):
        raise NotImplementedError(f"build_tree_kernel_efficient_cpu: tree_mask_mode {mode} (bit-packed) unsupported")
    n = draft_token_num
    seqs = verified_seq_len.tolist()
    prefix_sums = [sum(seqs[:b]) for b in range(len(seqs))]
    pl = parent_list.reshape(parent_list.shape[0], -1) if parent_list.dim() > 1 else parent_list.view(1, -1)
    sel = selected_index.tolist()
    pls = pl.tolist()
    flat_mask = tree_mask.view(-1)
    rt, rn, rs = retrieve_index.view(-1), retrieve_next_token.view(-1), retrieve_next_sibling.view(-1)
    pos = positions.view(-1)

    def find(b, token_idx):  # position in selected_index of a drafted token index, or -1
        for pp in range(n - 1):
            if sel[b][pp] == token_idx:
                return pp
        return -1

    for b, seq in enumerate(seqs):
        parents = pls[b] if parent_list.dim() > 1 else pls[0]
        pos[b * n] = seq
        for i in range(n - 1, 0, -1):
            rt[b * n + i] = b * n + i
            parent_tb = sel[b][i - 1] // topk
            if parent_tb == 0:
                parent_position = 0
            else:
                pp = find(b, parents[parent_tb])
                if pp < 0:
                    continue
                parent_position = pp + 1
            nxt = int(rn[b * n + parent_position])
            rn[b * n + parent_position] = i
            if nxt != -1:
                rs[b * n + i] = nxt
        rt[b * n] = b * n
        seq_tree_idx = n * n * b + prefix_sums[b] * n
        for x in range(n):
            if mode == 0:
                base = seq_tree_idx + (seq + n) * x + seq + 1
            else:
                base = n * n * b + n * x + 1
            flat_mask[base - 1] = True
            flat_mask[base:base + n - 1] = False
            if x > 0:
                cur, depth_x = x - 1, 0
                for _ in range(depth):
                    depth_x += 1
                    flat_mask[base + cur] = True
                    parent_tb = sel[b][cur] // topk
                    if parent_tb == 0:
                        break
                    cur = find(b, parents[parent_tb])
                    if cur < 0:
                        break
                pos[b * n + x] = depth_x + seq


def verify_tree_greedy_cpu(
    predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
    retrive_next_sibling, target_predict,
) -> None:
    """Greedy verification of a draft tree (SGLang's verify_tree_greedy_kernel_triton): walk from
    the root, at each level accept the child whose draft token equals the target's argmax at the
    last accepted node; record accepted nodes, their count, and the target token after each."""
    bs, n = candidates.shape
    num_spec = accept_index.shape[1]
    cand, ri = candidates.tolist(), retrive_index.tolist()
    rn, rs = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    tp = target_predict.reshape(-1)
    pred = predicts.view(-1)
    for b in range(bs):
        last = ri[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_spec):
            cur = rn[b][cur]
            target = int(tp[last])
            matched = False
            while cur != -1:
                if cand[b][cur] == target:
                    pred[last] = target
                    accepted += 1
                    accept_index[b, accepted] = ri[b][cur]
                    last = ri[b][cur]
                    matched = True
                    break
                cur = rs[b][cur]
            if not matched:
                break
        accept_token_num[b] = accepted
        pred[last] = tp[last]


OPS = {
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
    # speculative decoding (EAGLE / MTP)
    "extend_attention_cpu": extend_attention_cpu,
    "decode_attention_cpu": decode_attention_cpu,
    "assign_extend_cache_locs_cpu": assign_extend_cache_locs_cpu,
    "assign_draft_cache_locs_contiguous_cpu": assign_draft_cache_locs_contiguous_cpu,
    "rotate_input_ids_cpu": rotate_input_ids_cpu,
    "fill_bonus_tokens_cpu": fill_bonus_tokens_cpu,
    "fill_accept_out_cache_loc_cpu": fill_accept_out_cache_loc_cpu,
    "build_tree_kernel_efficient_cpu": build_tree_kernel_efficient_cpu,
    "verify_tree_greedy_cpu": verify_tree_greedy_cpu,
}

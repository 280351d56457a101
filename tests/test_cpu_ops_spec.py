"""The speculative-decoding (EAGLE / MTP) pure-torch `sgl_kernel` CPU ops, each against a plain
per-element reference written from the semantics of SGLang's Triton kernels."""

import math

import pytest
import torch

from sglang_step35.cpu import kernel_ops as ops, standin


def _ref_attention(q, keys, values, visible, scale, cap=0.0, sink=None):
    """Per query row, per head, per key: scores, softmax, weighted sum (no tensors ops over keys)."""
    hq, d = q.shape
    hkv = keys.shape[1]
    out = torch.zeros(hq, values.shape[-1], dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        scores = []
        for j in range(keys.shape[0]):
            if visible[j]:
                s = float((q[h].double() * keys[j, kh].double()).sum()) * scale
                if cap > 0:
                    s = cap * math.tanh(s / cap)
                scores.append((j, s))
        mx = max([s for _, s in scores] + ([float(sink[h])] if sink is not None else []))
        den = sum(math.exp(s - mx) for _, s in scores) + (math.exp(float(sink[h]) - mx) if sink is not None else 0)
        for j, s in scores:
            out[h] += math.exp(s - mx) / den * values[j, kh].double()
    return out


def _pool(g, size, hkv, d):
    return torch.randn(size, hkv, d, generator=g), torch.randn(size, hkv, d, generator=g)


@pytest.mark.parametrize("window,cap,use_sink", [(0, 0.0, False), (4, 0.0, False), (3, 5.0, True)])
def test_extend_attention_matches_reference_with_prefix_window_cap_and_sinks(window, cap, use_sink):
    g = torch.Generator().manual_seed(1)
    hq, hkv, d = 4, 2, 8
    kb, vb = _pool(g, 64, hkv, d)
    req_to_token = torch.randperm(64, generator=g)[:40].view(2, 20).to(torch.int32)
    req_pool = torch.tensor([1, 0])
    ext = torch.tensor([3, 5], dtype=torch.int32)
    seq = torch.tensor([9, 5])  # request 0: 6 prefix tokens; request 1: none
    start = torch.tensor([0, 3], dtype=torch.int32)
    T = int(ext.sum())
    q, k, v = torch.randn(T, hq, d, generator=g), torch.randn(T, hkv, d, generator=g), torch.randn(T, hkv, d, generator=g)
    sink = torch.randn(hq, generator=g) if use_sink else None
    o = torch.zeros(T, hq, d)
    ops.extend_attention_cpu(q, k, v, o, kb, vb, 1.0, 1.0, req_to_token, req_pool, seq, ext, start, 5,
                             0.3, cap, False, window, None, sink, None, True)
    for b in range(2):
        n, s0, st = int(ext[b]), int(seq[b]), int(start[b])
        prefix = s0 - n
        keys = [kb[int(req_to_token[req_pool[b], j])] for j in range(prefix)] + [k[st + j] for j in range(n)]
        vals = [vb[int(req_to_token[req_pool[b], j])] for j in range(prefix)] + [v[st + j] for j in range(n)]
        keys, vals = torch.stack(keys), torch.stack(vals)
        for i in range(n):
            qp = prefix + i
            vis = [kp <= qp and (window <= 0 or kp > qp - window) for kp in range(s0)]
            ref = _ref_attention(q[st + i], keys, vals, vis, 0.3, cap, sink)
            assert torch.allclose(o[st + i].double(), ref, atol=1e-5), (b, i)


def test_extend_attention_tree_mask_limits_draft_keys_but_not_prefix():
    g = torch.Generator().manual_seed(2)
    hq, hkv, d = 2, 1, 4
    kb, vb = _pool(g, 16, hkv, d)
    req_to_token = torch.arange(16, dtype=torch.int32).view(1, 16)
    ext, prefix = 3, 4
    q, k, v = (torch.randn(ext, h, d, generator=g) for h in (hq, hkv, hkv))
    # QLEN_ONLY tree: draft 1 and 2 are both children of draft 0 (siblings do not see each other)
    tm = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    o = torch.zeros(ext, hq, d)
    ops.extend_attention_cpu(q, k, v, o, kb, vb, 1.0, 1.0, req_to_token, torch.tensor([0]),
                             torch.tensor([prefix + ext]), torch.tensor([ext]), torch.tensor([0]), ext,
                             0.5, 0.0, False, 0, None, None, tm.flatten(), True)
    keys = torch.cat([kb[:prefix], k])
    vals = torch.cat([vb[:prefix], v])
    for i in range(ext):
        vis = [True] * prefix + [bool(tm[i, j]) for j in range(ext)]
        assert torch.allclose(o[i].double(), _ref_attention(q[i], keys, vals, vis, 0.5), atol=1e-5)


def test_decode_attention_writes_new_kv_then_attends_over_window():
    g = torch.Generator().manual_seed(3)
    hq, hkv, d = 4, 2, 8
    kb, vb = _pool(g, 32, hkv, d)
    req_to_token = torch.arange(32, dtype=torch.int32).view(2, 16)
    seq = torch.tensor([7, 12])
    loc = torch.tensor([6, 16 + 11])  # each request's newest slot
    q, knew, vnew = torch.randn(2, hq, d, generator=g), torch.randn(2, hkv, d, generator=g), torch.randn(2, hkv, d, generator=g)
    o = torch.zeros(2, hq, d)
    ops.decode_attention_cpu(q, kb, vb, 1.0, 1.0, o, knew, vnew, loc, None, req_to_token,
                             torch.tensor([0, 1]), seq, 0.25, 0.0, False, 5, None, None)
    assert torch.equal(kb[6], knew[0]) and torch.equal(vb[27], vnew[1])
    for b in range(2):
        s0 = int(seq[b])
        locs = [int(req_to_token[b, j]) for j in range(s0)]
        vis = [kp > s0 - 1 - 5 for kp in range(s0)]
        ref = _ref_attention(q[b], kb[locs], vb[locs], vis, 0.25)
        assert torch.allclose(o[b].double(), ref, atol=1e-5)


def test_assign_extend_and_draft_cache_locs_read_req_to_token_windows():
    req_to_token = torch.arange(100, 160, dtype=torch.int32).view(3, 20)
    reqs, start, end = torch.tensor([2, 0]), torch.tensor([5, 0]), torch.tensor([8, 2])
    out = torch.full((5,), -1, dtype=torch.int64)
    ops.assign_extend_cache_locs_cpu(reqs, req_to_token, start, end, out, 20)
    exp = [int(req_to_token[2, j]) for j in range(5, 8)] + [int(req_to_token[0, j]) for j in range(0, 2)]
    assert out.tolist() == exp
    out2 = torch.full((2 * 3,), -1, dtype=torch.int64)
    ops.assign_draft_cache_locs_contiguous_cpu(torch.tensor([1, 2]), req_to_token, torch.tensor([4, 10]), out2, 20, 1, 3)
    assert out2.tolist() == [int(req_to_token[1, 4 + j]) for j in range(3)] + [int(req_to_token[2, 10 + j]) for j in range(3)]


@pytest.mark.parametrize("with_select", [False, True])
def test_rotate_input_ids_shifts_each_window_and_inserts_the_new_token(with_select):
    ids = torch.arange(10, 20)
    before = ids.tolist()
    starts, lens = torch.tensor([0, 4, 9]), torch.tensor([4, 5, 0])
    new = torch.tensor([[91], [92], [93]])
    sel = torch.tensor([1, 6, 9]) if with_select else None
    ops.rotate_input_ids_cpu(ids, starts, lens, new, sel)
    exp = list(before)
    for i, (s, n) in enumerate(zip(starts.tolist(), lens.tolist())):
        if n == 0:
            continue
        for j in range(s, s + n - 1):
            exp[j] = before[j + 1]
        exp[sel[i] if with_select else s + n - 1] = int(new[i, 0])
    assert ids.tolist() == exp


def test_fill_bonus_tokens_and_accept_out_cache_loc():
    accept_tokens = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4]])
    accept_lens = torch.tensor([2, 4, 1])
    bonus = torch.zeros(3, dtype=torch.int64)
    ops.fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus, 4)
    assert bonus.tolist() == [int(accept_tokens[i, int(accept_lens[i]) - 1]) for i in range(3)]

    accept_index = torch.tensor([[0, 1, -1, -1], [4, -1, -1, -1], [8, 9, 10, -1]])
    out_cache_loc = torch.arange(200, 212)
    acc = torch.full((6,), -7, dtype=torch.int64)
    ops.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, acc)
    exp, k = [-7] * 6, 0
    for x in accept_index.flatten().tolist():
        if x != -1:
            exp[k] = int(out_cache_loc[x])
            k += 1
    assert acc.tolist() == exp


def test_chain_tree_build_and_greedy_verify_accept_the_matching_prefix():
    """topk=1, 3 steps (MTP-3): the tree is a chain; verify accepts drafts while they equal the
    target's argmax at the previous node."""
    bs, n, topk, depth = 2, 4, 1, 3
    seq = torch.tensor([10, 3])
    parent_list = torch.tensor([[-1, 0, 1], [-1, 0, 1]])  # chain parents as SGLang lays them out
    selected = torch.tensor([[0, 1, 2], [0, 1, 2]])
    tree_mask = torch.zeros(bs * n * n, dtype=torch.bool)
    positions = torch.zeros(bs * n, dtype=torch.int64)
    r_idx = torch.full((bs, n), -1, dtype=torch.int64)
    r_next = torch.full((bs, n), -1, dtype=torch.int64)
    r_sib = torch.full((bs, n), -1, dtype=torch.int64)
    ops.build_tree_kernel_efficient_cpu(parent_list, selected, seq, tree_mask, positions, r_idx, r_next, r_sib,
                                        topk, depth, n, 1)
    assert tree_mask.view(bs, n, n).tolist() == [[[j <= i for j in range(n)] for i in range(n)]] * bs
    assert positions.tolist() == [10, 11, 12, 13, 3, 4, 5, 6]
    assert r_idx.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert r_next.tolist() == [[1, 2, 3, -1]] * 2 and r_sib.tolist() == [[-1] * 4] * 2

    candidates = torch.tensor([[50, 7, 8, 9], [60, 1, 2, 3]])  # [bonus, d1, d2, d3]
    target = torch.tensor([[7, 8, 4, 5], [9, 9, 9, 9]])  # req 0 accepts d1, d2 then mismatches
    predicts = torch.full((bs * n,), -1, dtype=torch.int64)
    accept_index = torch.full((bs, n), -1, dtype=torch.int64)
    accept_num = torch.zeros(bs, dtype=torch.int64)
    ops.verify_tree_greedy_cpu(predicts, accept_index, accept_num, candidates, r_idx, r_next, r_sib, target)
    # Reference walk along the chain.
    for b in range(bs):
        acc, last = 0, b * n
        exp_idx = [last]
        for j in range(1, n):
            if int(candidates[b, j]) == int(target.view(-1)[last]):
                acc += 1
                last = b * n + j
                exp_idx.append(last)
            else:
                break
        assert int(accept_num[b]) == acc
        assert accept_index[b].tolist() == exp_idx + [-1] * (n - len(exp_idx))
        for i in exp_idx:
            assert int(predicts[i]) == int(target.view(-1)[i])
    assert accept_num.tolist() == [2, 0]


def test_tree_with_siblings_verify_picks_the_matching_sibling():
    """topk=2, depth 1: two candidate children of the root; the second one matches."""
    n, topk = 3, 2
    parent_list = torch.tensor([[-1]])
    selected = torch.tensor([[0, 1]])
    tree_mask = torch.zeros(n * n, dtype=torch.bool)
    positions = torch.zeros(n, dtype=torch.int64)
    r_idx, r_next, r_sib = (torch.full((1, n), -1, dtype=torch.int64) for _ in range(3))
    ops.build_tree_kernel_efficient_cpu(parent_list, selected, torch.tensor([5]), tree_mask, positions,
                                        r_idx, r_next, r_sib, topk, 1, n, 1)
    assert positions.tolist() == [5, 6, 6]
    assert tree_mask.view(n, n).tolist() == [[True, False, False], [True, True, False], [True, False, True]]
    assert r_next[0, 0] == 1 and r_sib[0, 1] == 2
    predicts = torch.full((n,), -1, dtype=torch.int64)
    accept_index = torch.full((1, 2), -1, dtype=torch.int64)
    accept_num = torch.zeros(1, dtype=torch.int64)
    ops.verify_tree_greedy_cpu(predicts, accept_index, accept_num, torch.tensor([[0, 11, 22]]), r_idx, r_next, r_sib,
                               torch.tensor([[22, 3, 4]]))
    assert accept_num.tolist() == [1] and accept_index.tolist() == [[0, 2]] and predicts.tolist() == [22, -1, 4]


def test_standin_resolves_every_spec_op_to_ours():
    for name in ("extend_attention_cpu", "decode_attention_cpu", "rotate_input_ids_cpu", "verify_tree_greedy_cpu",
                 "build_tree_kernel_efficient_cpu", "fill_bonus_tokens_cpu", "fill_accept_out_cache_loc_cpu",
                 "assign_extend_cache_locs_cpu", "assign_draft_cache_locs_contiguous_cpu"):
        assert standin.resolve(name) is getattr(ops, name)

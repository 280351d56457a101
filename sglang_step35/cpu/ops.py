"""Pure-torch implementations of the `sgl_kernel` CPU ops SGLang 0.5.23 calls on a GPU-less machine.

Signatures follow the call sites in SGLang (the op names are SGLang's). Each op mutates its output
arguments in place, like the C++ originals, and is tested in tests/test_cpu_ops.py against a plain
per-element reference.
"""

from __future__ import annotations

import ctypes

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


OPS = {
    "assign_req_to_token_pool_cpu": assign_req_to_token_pool_cpu,
    "copy_all_layer_kv_cache_cpu": copy_all_layer_kv_cache_cpu,
}

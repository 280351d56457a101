"""The pure-torch `sgl_kernel` CPU ops and the stand-in's name resolution."""

import sys

import pytest
import torch

from sglang_step35.cpu import kernel_ops as ops, standin


def test_assign_req_to_token_pool_matches_reference():
    g = torch.Generator().manual_seed(0)
    pool = torch.zeros(6, 32, dtype=torch.int32)
    reqs = torch.tensor([4, 1, 3])
    start = torch.tensor([0, 5, 9])
    end = torch.tensor([7, 6, 20])
    total = int((end - start).sum())
    out_loc = torch.randint(0, 1000, (total,), generator=g, dtype=torch.int64)
    expected = pool.clone()
    pt = 0
    for r, s, e in zip(reqs.tolist(), start.tolist(), end.tolist()):
        for j in range(s, e):  # element-by-element reference
            expected[r, j] = int(out_loc[pt])
            pt += 1
    ops.assign_req_to_token_pool_cpu(reqs, pool, start, end, out_loc, pool.shape[1])
    assert torch.equal(pool, expected)
    assert pool[0].abs().sum() == 0  # untouched rows stay untouched


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer_even_when_overlapping():
    bufs = [torch.arange(10 * 8, dtype=torch.float32).view(10, 8),
            torch.arange(10 * 3, dtype=torch.bfloat16).view(10, 3) * -1]
    before = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=torch.int64)
    src = torch.tensor([2, 3, 4])
    tgt = torch.tensor([3, 4, 7])  # tgt 3, 4 are also sources: all reads must happen before writes
    ops.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, old in zip(bufs, before):
        exp = old.clone()
        exp[tgt] = old[src]
        assert torch.equal(b, exp)


def test_standin_resolves_ours_refuses_unknown_cpu_ops_and_hides_gpu_ops():
    mod = standin.make_module()
    assert mod.assign_req_to_token_pool_cpu is ops.assign_req_to_token_pool_cpu
    with pytest.raises(NotImplementedError, match="fused_experts_cpu"):
        mod.fused_experts_cpu(torch.zeros(1))
    with pytest.raises(NotImplementedError, match="weight_packed_linear"):
        standin.resolve("weight_packed_linear")()
    # Absent on purpose: it is SGLang's switch for AMX weight packing (no pure-torch version here).
    assert not hasattr(standin._StandInOpNamespace(), "convert_weight_packed")
    # GPU-only ops must look absent: SGLang probes hasattr() before registering fakes for them.
    assert not hasattr(mod, "gptq_marlin_repack")
    ns = standin._StandInOpNamespace()
    assert not hasattr(ns, "fp8_scaled_mm")
    assert ns.assign_req_to_token_pool_cpu is ops.assign_req_to_token_pool_cpu



def test_from_import_of_a_gpu_only_op_is_an_import_error(monkeypatch):
    # SGLang guards optional kernels with `try: from sgl_kernel import X except ImportError`.
    monkeypatch.setitem(sys.modules, "sgl_kernel_standin_probe", standin.make_module())
    from sgl_kernel_standin_probe import assign_req_to_token_pool_cpu  # noqa: F401

    with pytest.raises(ImportError):
        from sgl_kernel_standin_probe import gptq_marlin_repack  # noqa: F401

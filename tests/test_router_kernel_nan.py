"""The fused router's ids are always experts, whatever the logits hold.

Padded rows of a prefill CUDA graph hold garbage (NaN, +-inf), and SGLang reads the ids before it
masks padded rows (recording routed experts, EPLB's logical -> physical remap): an id outside
[0, E) is an out-of-range gather there. The defined behaviour, the same in the Triton kernel and the
torch reference (`ops.sigmoid_topk_route_ref`, a stable descending sort):

- NaN scores rank above every number (torch's sort order), the lowest index first among them;
- +-inf logits are ordinary values (sigmoid 1 and 0);
- equal scores go to the lowest index;
- the k ids of a row are distinct experts in [0, E).

The kernel runs under TRITON_INTERPRET=1 without a GPU (as in tests/test_kernels.py), with both the
NVIDIA and the ROCm launch configs, at Step-3.5-Flash's size (E=288, top-8) and a small one.
"""

from __future__ import annotations

import pytest
import torch

from gpu_contract import interpreted_kernels
from sglang_step35 import ops

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module", autouse=True)
def triton_interpreter():
    yield from interpreted_kernels(("kernels_cuda.router", "_sigmoid_topk_kernel"))


def impls():
    return [("rocm" if torch.version.hip else "cuda")] if ON_GPU else ["cuda", "rocm"]


def garbage_rows(experts: int) -> torch.Tensor:
    """Rows a padded graph slot or an overflowing gate can hold."""
    g = torch.Generator().manual_seed(experts)
    normal = torch.randn(experts, generator=g)
    some_nan = normal.clone()
    some_nan[[1, experts // 2, experts - 1]] = NAN
    infs = normal.clone()
    infs[[0, 3]] = -INF
    infs[[2, experts - 2]] = INF
    mixed = torch.full((experts,), -INF)
    mixed[[4, 5]] = NAN
    mixed[experts - 1] = INF
    return torch.stack([
        torch.full((experts,), NAN),
        some_nan,
        torch.full((experts,), INF),
        torch.full((experts,), -INF),
        infs,
        mixed,
        torch.zeros(experts),
        torch.full((experts,), 3.25),
        normal,
    ])


def assert_ids_are_experts(ids: torch.Tensor, experts: int) -> None:
    assert bool(((ids >= 0) & (ids < experts)).all()), f"ids outside [0, {experts}): {ids.tolist()}"
    for row in ids.tolist():
        assert len(set(row)) == len(row), f"an expert chosen twice in one row: {row}"


@pytest.mark.parametrize("impl", impls())
@pytest.mark.parametrize("experts,top_k", [(288, 8), (13, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_router_ids_stay_in_range_and_match_the_reference(impl, experts, top_k, with_bias):
    logits = garbage_rows(experts).to(DEVICE)
    bias = torch.linspace(-0.5, 0.5, experts, device=DEVICE) if with_bias else None
    w, ids = ops.sigmoid_topk_route(logits, bias, top_k, 2.5, impl=impl)
    w_ref, ids_ref = ops.sigmoid_topk_route_ref(logits, bias, top_k, 2.5)
    assert_ids_are_experts(ids.cpu(), experts)
    assert torch.equal(ids.cpu(), ids_ref.cpu())
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-6, equal_nan=True)
    # Deterministic: the same garbage gives the same ids again.
    assert torch.equal(ops.sigmoid_topk_route(logits, bias, top_k, 2.5, impl=impl)[1], ids)


@pytest.mark.parametrize("impl", impls())
def test_the_defined_order_on_hand_checked_rows(impl):
    logits = torch.tensor([
        [NAN] * 6,  # all NaN: the first k experts
        [0.0, NAN, 5.0, NAN, INF, 1.0],  # NaN first (lowest index first), then +inf, then the rest
        [-INF, -INF, 0.0, -INF, -INF, -INF],  # the one finite, then ties at sigmoid 0: lowest index
        [2.0, 2.0, 2.0, 2.0, 2.0, 2.0],  # equal: lowest index
    ], device=DEVICE)
    ids = ops.sigmoid_topk_route(logits, None, 3, 1.0, impl=impl)[1].cpu().tolist()
    assert ids == [[0, 1, 2], [1, 3, 4], [2, 0, 1], [0, 1, 2]]
    assert ops.sigmoid_topk_route_ref(logits.cpu(), None, 3, 1.0)[1].tolist() == ids


@pytest.mark.parametrize("impl", impls())
def test_a_nan_bias_entry_is_chosen_first_not_out_of_range(impl):
    # A corrupted router bias poisons one expert in every row; ids stay experts and agree with torch.
    bias = torch.zeros(8, device=DEVICE)
    bias[5] = NAN
    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ids = ops.sigmoid_topk_route(logits, bias, 4, 1.0, impl=impl)[1]
    assert_ids_are_experts(ids.cpu(), 8)
    assert torch.equal(ids.cpu(), ops.sigmoid_topk_route_ref(logits.cpu(), bias.cpu(), 4, 1.0)[1])
    assert ids[:, 0].tolist() == [5, 5, 5]

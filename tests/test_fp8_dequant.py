"""fp8.dequantize_block is SGLang's block dequantize (fp8_utils.block_quant_dequant) behind our
shape check, and equals a per-block reference on ragged edge blocks and stacked experts."""

from __future__ import annotations

import pytest
import torch

from sglang_step35 import fp8


def _per_block_reference(q: torch.Tensor, s: torch.Tensor, block, dtype) -> torch.Tensor:
    """Each (i, j) block, cut at the weight's edge, times its own scale: the layout's definition."""
    bn, bk = block
    out = q.float().clone()
    n, k = q.shape[-2:]
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            out[..., i * bn:min((i + 1) * bn, n), j * bk:min((j + 1) * bk, k)] *= s[..., i, j, None, None]
    return out.to(dtype)


@pytest.mark.parametrize(
    "shape, block",
    [((256, 384), (128, 128)), ((200, 300), (128, 128)), ((3, 130, 70), (128, 128)), ((5, 7), (4, 2))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_block_equals_per_block_reference(shape, block, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 3
    q, s = fp8.quantize_block(w, block)
    s = s * torch.rand(s.shape, generator=g).add(0.5)  # distinct scales, so a shifted block shows
    torch.testing.assert_close(fp8.dequantize_block(q, s, dtype, block), _per_block_reference(q, s, block, dtype),
                               atol=0, rtol=0)


def test_dequantize_block_runs_sglangs_helper(monkeypatch):
    from sglang.srt.layers.quantization import fp8_utils

    calls = []
    real = fp8_utils.block_quant_dequant
    monkeypatch.setattr(fp8_utils, "block_quant_dequant", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    q, s = fp8.quantize_block(torch.randn(130, 260))
    fp8.dequantize_block(q, s)
    assert len(calls) == 1 and calls[0][2] == [128, 128]


@pytest.mark.parametrize("bad", [(1, 3), (2, 2), (3, 3), (2, 3, 1)])
def test_misshaped_scale_is_a_value_error(bad):
    """SGLang's helper would crop a too-large grid silently; the loader needs the ValueError."""
    q, _ = fp8.quantize_block(torch.randn(200, 300))  # grid (2, 3)
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        fp8.dequantize_block(q, torch.ones(bad))

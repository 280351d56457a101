"""Per-backend sliding-window table: under each attention backend Step-3.5 may run, a query on a
sliding layer sees exactly ``sliding_window`` keys (its own included), with the RadixAttention value
from :func:`radix_sliding_window_size` and the runner value from :func:`runner_sliding_window_size`.

How each backend is checked (the same split as docs/correctness.md):
- torch_native: SGLang's TorchNativeAttnBackend.forward_extend / forward_decode run on CPU.
- triton: SGLang's Triton extend and decode kernels run on CPU tensors under TRITON_INTERPRET=1,
  fed the window rail built by triton_backend.update_sliding_window_buffer and the layer value the
  way TritonAttnBackend.forward_extend / forward_decode hand them over.
- intel_amx: the CPU kernels this repo installs for sgl_kernel (sglang_step35/cpu/kernel_ops.py) run with
  the ``sliding_window_size + 1`` that IntelAMXAttnBackend passes.
- flashinfer decode: FlashInferIndicesUpdaterDecode.update_sliding_window (SGLang's code) run with
  the kernel planning call captured; the kept KV length is what the decode kernel attends to.
- fa3/fa4, flashinfer prefill, trtllm_mha, aiter: the kernel cannot run here; the test reads the
  window expression out of the installed backend source (so a changed SGLang fails here) and applies
  the kernel's documented convention, itself asserted where the installed package ships it.

Keys are counted by attention weight: all queries and keys are zero (uniform weights over what a
query may see) and the value at key position p is the one-hot vector e_p, so output[:, p] > 0 exactly
for the keys the query attends to.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import types

import pytest
import torch

from sglang_step35.attention import guard_window_conventions
from sglang_step35.attention.window import (
    CONVENTIONS,
    keys_seen,
    radix_sliding_window_size,
    runner_sliding_window_size,
    same_window_convention,
)

SITE = pathlib.Path(importlib.util.find_spec("sglang").origin).parent
W = 4  # sliding_window (HF count); small so every query below is past the window
SEQ = 11  # tokens in the request; head_dim >= SEQ for the one-hot values
PREFIX = 6  # cached tokens before an extend (prefill with a radix-cache hit / chunked prefill)
HEAD_DIM = 16
TODAY = W - 1  # what Step35Attention passes for every backend before this change


@pytest.fixture(scope="module", autouse=True)
def sglang_on_cpu():
    """The backends import sgl_kernel; on a GPU-less machine the plugin installs its CPU stand-in."""
    from sglang_step35.plugin import register

    register()


def _expected(pos: int, window: int = W) -> set[int]:
    return set(range(max(0, pos - window + 1), pos + 1))


def _one_hot_values(n: int, heads: int) -> torch.Tensor:
    v = torch.zeros(n, heads, HEAD_DIM)
    v[torch.arange(n), :, torch.arange(n)] = 1.0
    return v


def _seen(out_row: torch.Tensor) -> set[int]:
    # out_row: [heads, head_dim]; every head must agree (GQA: 2 query heads per KV head below).
    sets = {frozenset(torch.nonzero(h > 0).flatten().tolist()) for h in out_row}
    assert len(sets) == 1, sets
    return set(next(iter(sets)))


def _src(obj) -> str:
    return inspect.getsource(obj)


def _method_src(module_file: str, cls: str, method: str) -> str:
    """Source of ``cls.method`` in an installed SGLang file, read without importing it (the GPU
    backends import CUDA-only sgl_kernel ops at module level)."""
    path = SITE / module_file
    text = path.read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return ast.get_source_segment(text, item)
    raise AssertionError(f"{cls}.{method} not found in {path}")


def _fn_src(module_file: str, name: str) -> str:
    text = (SITE / module_file).read_text()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(text, node)
    raise AssertionError(f"{name} not found in {module_file}")


# --- the policy table itself ----------------------------------------------------------------------
def test_every_allowed_backend_has_a_convention():
    from sglang_step35.attention.select import WINDOW_CAPABLE

    # select.py may hand Step-3.5 any of these; each needs a window value.
    assert set(WINDOW_CAPABLE) == set(CONVENTIONS)


def test_values_table():
    # The table docs/correctness.md states; aiter differs from the rest by one, flashinfer needs R = W-1.
    table = {b: (radix_sliding_window_size(b, 512), runner_sliding_window_size(b, 512)) for b in CONVENTIONS}
    assert table == {
        "torch_native": (511, 512),
        "triton": (511, 512),
        "flashinfer": (511, 511),
        "fa3": (511, 512),
        "fa4": (511, 512),
        "trtllm_mha": (511, 512),
        "aiter": (512, 512),
        "intel_amx": (511, 512),
        "intel_xpu": (511, 512),
        "ascend": (511, 512),
    }


@pytest.mark.parametrize("bad", ["flex_attention", "wave", "nonsense"])
def test_unknown_backend_is_refused(bad):
    with pytest.raises(ValueError, match="no known sliding-window convention"):
        radix_sliding_window_size(bad, 512)


# --- torch_native: SGLang's backend on CPU ----------------------------------------------------------
class _Pool:
    """The two KV-pool calls TorchNativeAttnBackend makes (slot == position, one request)."""

    def __init__(self, n, kv_heads):
        self.k = torch.zeros(n, kv_heads, HEAD_DIM)
        self.v = torch.zeros(n, kv_heads, HEAD_DIM)

    def set_kv_buffer(self, layer, loc, k, v, *args, **kwargs):
        idx = loc.loc.long()
        self.k[idx] = k.view(-1, *self.k.shape[1:])
        self.v[idx] = v.view(-1, *self.v.shape[1:])

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v


def _layer(value, heads=2, kv_heads=1):
    from sglang.srt.layers.radix_attention import RadixAttention

    return RadixAttention(heads, HEAD_DIM, 1.0, num_kv_heads=kv_heads, layer_id=0, sliding_window_size=value)


def _torch_native_seen(value: int) -> tuple[list[set[int]], set[int]]:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    heads, kv_heads = 2, 1
    layer = _layer(value, heads, kv_heads)
    pool = _Pool(SEQ, kv_heads)
    values = _one_hot_values(SEQ, kv_heads)
    pool.v[:PREFIX] = values[:PREFIX]  # the cached prefix
    runner = types.SimpleNamespace(
        device="cpu",
        req_to_token_pool=types.SimpleNamespace(req_to_token=torch.arange(SEQ).view(1, -1)),
        token_to_kv_pool=pool,
    )
    backend = TorchNativeAttnBackend(runner)
    ext = SEQ - PREFIX
    fb = types.SimpleNamespace(
        out_cache_loc=torch.arange(PREFIX, SEQ),
        req_pool_indices=torch.tensor([0]),
        seq_lens=torch.tensor([SEQ]),
        extend_prefix_lens=torch.tensor([PREFIX]),
        extend_seq_lens=torch.tensor([ext]),
        encoder_lens=None,
    )
    backend.init_forward_metadata(fb)
    q = torch.zeros(ext, heads * HEAD_DIM)
    k = torch.zeros(ext, kv_heads * HEAD_DIM)
    out = backend.forward_extend(q, k, values[PREFIX:].reshape(ext, -1), layer, fb)
    extend = [_seen(row.view(heads, HEAD_DIM)) for row in out]
    # Decode the next token (position SEQ-1 again, against the full cache), as a new request step.
    fb_dec = types.SimpleNamespace(
        out_cache_loc=torch.tensor([SEQ - 1]),
        req_pool_indices=torch.tensor([0]),
        seq_lens=torch.tensor([SEQ]),
        encoder_lens=None,
    )
    backend.init_forward_metadata(fb_dec)
    out = backend.forward_decode(
        torch.zeros(1, heads * HEAD_DIM), torch.zeros(1, kv_heads * HEAD_DIM), values[SEQ - 1 :].reshape(1, -1),
        layer, fb_dec,
    )
    return extend, _seen(out[0].view(heads, HEAD_DIM))


def test_torch_native_runs_window_keys():
    extend, decode = _torch_native_seen(radix_sliding_window_size("torch_native", W))
    assert extend == [_expected(p) for p in range(PREFIX, SEQ)]
    assert decode == _expected(SEQ - 1)
    # The check can fail: one more in the layer value is one more key.
    extend, decode = _torch_native_seen(W)
    assert len(decode) == W + 1


# --- triton: SGLang's Triton kernels under the interpreter --------------------------------------------
@pytest.fixture(scope="module")
def triton_kernels():
    if torch.cuda.is_available():
        pytest.skip("this module runs the Triton kernels interpreted on CPU tensors")
    from gpu_contract import ensure_interpreted, interpreted_triton_language

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    with interpreted_triton_language():
        for kernel in ("_fwd_kernel_stage1", "_fwd_grouped_kernel_stage1", "_fwd_kernel_stage2"):
            ensure_interpreted("sglang.kernels.ops.attention.decode_attention", kernel)
        ensure_interpreted("sglang.kernels.ops.attention.extend_attention", "_fwd_kernel")
        dec = importlib.import_module("sglang.kernels.ops.attention.decode_attention")
        ext = importlib.import_module("sglang.kernels.ops.attention.extend_attention")
        yield ext.extend_attention_fwd, dec.decode_attention_fwd
    mp.undo()


class _IdentityTranslator:
    """KV-index translator of one request whose slot == position: what pack_read_stream writes
    (req_to_token[req, start : start + len] per request, back to back)."""

    window_kv_kind = "window"

    def __init__(self, req_to_token):
        self.req_to_token = req_to_token

    def pack_read_stream(self, plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx, kind, token_mapping):
        for i, (r, n, s) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist(), kv_start_idx.tolist())):
            out[int(indptr[i]) : int(indptr[i]) + n] = self.req_to_token[r, s : s + n]
        return True


def _window_rail(runner_value: int, lens: torch.Tensor):
    from sglang.srt.layers.attention.triton_backend import update_sliding_window_buffer

    req_to_token = torch.arange(SEQ).view(1, -1)
    indptr, indices, _, offsets = update_sliding_window_buffer(
        torch.zeros(2, dtype=torch.int32), _IdentityTranslator(req_to_token), None, torch.tensor([0]),
        runner_value, lens, 1, device="cpu", token_to_kv_pool=None,
    )
    return indptr, indices, offsets


def _triton_seen(kernels, layer_value: int, runner_value: int) -> tuple[list[set[int]], set[int]]:
    extend_attention_fwd, decode_attention_fwd = kernels
    heads, kv_heads = 2, 1
    values = _one_hot_values(SEQ, kv_heads)
    k_buf = torch.zeros(SEQ, kv_heads, HEAD_DIM)
    v_buf = values.clone()
    ext = SEQ - PREFIX
    # TritonAttnBackend.forward_extend on a sliding layer: kv_indptr/kv_indices = the window rail
    # over the prefix (init_forward_metadata: update_sliding_window_buffer(..., extend_prefix_lens)),
    # sliding_window_size = layer.sliding_window_size.
    indptr, indices, offsets = _window_rail(runner_value, torch.tensor([PREFIX]))
    o = torch.zeros(ext, heads, HEAD_DIM)
    extend_attention_fwd(
        torch.zeros(ext, heads, HEAD_DIM), k_buf[PREFIX:].clone(), v_buf[PREFIX:].clone(), o, k_buf, v_buf,
        torch.tensor([0, ext], dtype=torch.int32), indptr, indices, None, True, None, ext, 1.0, 1.0, 1.0,
        sliding_window_size=layer_value, window_kv_offsets=offsets,
    )
    extend = [_seen(row) for row in o]
    # forward_decode: kv_indptr/kv_indices = the window rail over seq_lens (the new token included);
    # the layer value only selects that rail.
    indptr, indices, _ = _window_rail(runner_value, torch.tensor([SEQ]))
    splits = 2
    o = torch.zeros(1, heads, HEAD_DIM)
    decode_attention_fwd(
        torch.zeros(1, heads, HEAD_DIM), k_buf, v_buf, o, indptr, indices,
        torch.empty(1, heads, splits, HEAD_DIM), torch.empty(1, heads, splits), torch.tensor([splits], dtype=torch.int32),
        splits, 1.0, 1.0, 1.0, enable_lean=False,
    )
    return extend, _seen(o[0])


def test_triton_runs_window_keys(triton_kernels):
    extend, decode = _triton_seen(
        triton_kernels, radix_sliding_window_size("triton", W), runner_sliding_window_size("triton", W)
    )
    assert extend == [_expected(p) for p in range(PREFIX, SEQ)]
    assert decode == _expected(SEQ - 1)


def test_triton_decode_follows_the_runner_value_not_the_layer(triton_kernels):
    # SGLang's usual model convention (get_attention_sliding_window_size() = W-1, as gemma/gpt-oss
    # do) would leave triton decode one key short: the runner value must stay W for triton.
    _, decode = _triton_seen(triton_kernels, W - 1, W - 1)
    assert decode == _expected(SEQ - 1, W - 1)


@pytest.mark.sglang_pin
def test_triton_backend_hands_these_values_to_its_kernels():
    from sglang.srt.layers.attention import triton_backend as tb

    ext_src = _src(tb.TritonAttnBackend.forward_extend)
    assert "-1 if bidirectional_extend else layer.sliding_window_size" in ext_src
    assert "kv_indices = self.forward_metadata.window_kv_indices" in ext_src
    assert "torch.minimum(\n        seq_lens,\n        torch.tensor(sliding_window_size)," in _src(tb.update_sliding_window_buffer)
    assert "self.sliding_window_size = model_runner.sliding_window_size" in _src(tb.TritonAttnBackend.__init__)


# --- intel_amx: the CPU kernels this repo installs, with the value the backend passes ---------------
def _amx_seen(layer_value: int) -> tuple[list[set[int]], set[int]]:
    from sglang_step35.cpu import kernel_ops as ops

    heads, kv_heads = 2, 1
    values = _one_hot_values(SEQ, kv_heads)
    k_buf = torch.zeros(SEQ, kv_heads, HEAD_DIM)
    v_buf = values.clone()
    ext = SEQ - PREFIX
    req_to_token = torch.arange(SEQ).view(1, -1)
    o = torch.zeros(ext, heads, HEAD_DIM)
    # IntelAMXAttnBackend.forward_extend / forward_decode pass layer.sliding_window_size + 1.
    ops.extend_attention_cpu(
        torch.zeros(ext, heads, HEAD_DIM), k_buf[PREFIX:], v_buf[PREFIX:], o, k_buf, v_buf, 1.0, 1.0,
        req_to_token, torch.tensor([0]), torch.tensor([SEQ]), torch.tensor([ext]), torch.tensor([0]), ext,
        1.0, 0.0, False, layer_value + 1,
    )
    extend = [_seen(row) for row in o]
    o = torch.zeros(1, heads, HEAD_DIM)
    ops.decode_attention_cpu(
        torch.zeros(1, heads, HEAD_DIM), k_buf, v_buf, 1.0, 1.0, o, None, None, torch.tensor([SEQ - 1]), None,
        req_to_token, torch.tensor([0]), torch.tensor([SEQ]), 1.0, 0.0, False, layer_value + 1,
    )
    return extend, _seen(o[0])


@pytest.mark.sglang_pin
def test_intel_amx_runs_window_keys():
    from sglang.srt.layers.attention.intel_amx_backend import IntelAMXAttnBackend

    for method in (IntelAMXAttnBackend.forward_extend, IntelAMXAttnBackend.forward_decode):
        assert "layer.sliding_window_size + 1," in _src(method)
    extend, decode = _amx_seen(radix_sliding_window_size("intel_amx", W))
    assert extend == [_expected(p) for p in range(PREFIX, SEQ)]
    assert decode == _expected(SEQ - 1)


# --- flashinfer: decode planning run, prefill through its mask contract --------------------------------
def _flashinfer_decode_kv_len(runner_value: int, seq_len: int) -> int:
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferIndicesUpdaterDecode

    captured = []

    def call_begin_forward(wrapper, paged_kernel_lens, *args, **kwargs):
        captured.append((wrapper, paged_kernel_lens.clone()))

    fake = types.SimpleNamespace(
        sliding_window_size=runner_value, call_begin_forward=call_begin_forward, _swa_kv_pool=None,
        kv_indptr=[torch.zeros(2, dtype=torch.int32)] * 2,
    )
    FlashInferIndicesUpdaterDecode.update_sliding_window(
        fake, torch.tensor([seq_len]), torch.tensor([seq_len]), seq_len, ["swa", "full"], None, None,
        plan=None, req_pool_indices=torch.tensor([0]),
    )
    (wrapper, lens), _ = captured
    assert wrapper == "swa"
    return int(lens[0])


@pytest.mark.sglang_pin
def test_flashinfer_decode_attends_runner_plus_one():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

    # Decode passes no window to the kernel: it attends the whole planned KV list.
    assert "window_left" not in _src(FlashInferAttnBackend.forward_decode)
    seq = 600
    ours = _flashinfer_decode_kv_len(runner_sliding_window_size("flashinfer", 512), seq)
    assert ours == 512
    # SGLang's default for Step3p5 (no get_attention_sliding_window_size: R = config.sliding_window)
    # gives 513 keys whatever the layer value: the model must supply R = W-1 under flashinfer.
    assert _flashinfer_decode_kv_len(512, seq) == 513


@pytest.mark.sglang_pin
def test_flashinfer_prefill_contract():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend, FlashInferIndicesUpdaterPrefill

    src = _src(FlashInferAttnBackend.forward_extend)
    assert "window_left=(\n                    layer.sliding_window_size" in src
    assert "window_left=swa_window_left" in src
    # Plan-time window_left and the ragged-prefix mask use the runner value, hence R must equal S.
    assert "sliding_window_size\n                    if (wrapper_id == 0 and not use_ragged" in _src(
        FlashInferIndicesUpdaterPrefill.update_sliding_window
    )
    variants = pathlib.Path(importlib.util.find_spec("flashinfer").origin).parent / (
        "data/include/flashinfer/attention/variants.cuh"
    )
    # FlashInfer keeps kv_idx >= (kv_len - qo_len + qo_idx) - window_left: window_left + 1 keys.
    assert "mask &= (kv_idx + qo_len + window_left >= kv_len + qo_idx);" in variants.read_text()
    s = radix_sliding_window_size("flashinfer", W)
    q_abs, kv_len, qo_len = SEQ - 1, SEQ, SEQ - PREFIX
    kept = [kv for kv in range(kv_len) if kv + qo_len + s >= kv_len + (q_abs - PREFIX) and kv <= q_abs]
    assert set(kept) == _expected(q_abs)
    assert runner_sliding_window_size("flashinfer", W) == s


# --- fa3 / fa4: window tuple from the backend source, flash-attn's documented window --------------------
@pytest.mark.sglang_pin
def test_flash_attention_contract():
    fa = "srt/layers/attention/flashattention_backend.py"
    assert "(layer.sliding_window_size, 0 if causal else layer.sliding_window_size)" in _method_src(
        fa, "FlashAttentionBackend", "forward_extend"
    )
    assert "window_size = (layer.sliding_window_size, 0)" in _method_src(fa, "FlashAttentionBackend", "forward_decode")
    doc = (SITE / "kernels/ops/attention/flash_attention.py").read_text()
    assert "[i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]] inclusive" in doc
    for backend in ("fa3", "fa4"):
        left = radix_sliding_window_size(backend, W)
        q = SEQ - 1  # seqlen_k == seqlen_q: query i is key position i
        assert set(range(q - left, q + 0 + 1)) == _expected(q)
        assert keys_seen(backend, TODAY) == W  # today's W-1 is right for flash-attn


# --- trtllm_mha: window_left on every call, window_left + 1 in the launcher ------------------------------
@pytest.mark.sglang_pin
def test_trtllm_mha_contract():
    for method in ("forward_extend", "forward_decode"):
        src = _method_src("srt/layers/attention/trtllm_mha_backend.py", "TRTLLMHAAttnBackend", method)
        assert "window_left=layer.sliding_window_size" in src
        assert "window_left=layer.sliding_window_size -" not in src and "window_left=layer.sliding_window_size +" not in src
    launcher = pathlib.Path(importlib.util.find_spec("flashinfer").origin).parent / (
        "data/csrc/trtllm_fmha_kernel_launcher.cu"
    )
    assert "window_left == -1 ? INT_MAX : window_left + 1;" in launcher.read_text()
    assert radix_sliding_window_size("trtllm_mha", W) + 1 == W


# --- aiter: (S - 1, 0) into unified_attention, which adds one --------------------------------------------
@pytest.mark.sglang_pin
def test_aiter_contract():
    def aiter(method):
        return _method_src("srt/layers/attention/aiter_backend.py", "AiterAttnBackend", method)

    assert "uni_window = (layer.sliding_window_size - 1, 0)" in aiter("_forward_extend_unified")
    assert "window_size = (layer.sliding_window_size - 1, 0)" in aiter("forward_decode")
    assert "de_window = (layer.sliding_window_size - 1, 0)" in aiter("forward_extend")
    # AITER's unified_attention (aiter/ops/triton/attention/unified_attention.py, not installed here):
    #   SLIDING_WINDOW = 1 + window_size[0]; the kernel keeps (context_len + query_pos - seq_offset) < SLIDING_WINDOW,
    # i.e. SLIDING_WINDOW keys including the query's own.
    def unified_keys(layer_value):
        window_size = (layer_value - 1, 0)
        sliding_window = 1 + window_size[0]
        q = SEQ - 1
        return {k for k in range(q + 1) if q - k < sliding_window}

    assert unified_keys(radix_sliding_window_size("aiter", W)) == _expected(SEQ - 1)
    # Today's W-1 leaves AITER one key short.
    assert unified_keys(TODAY) == _expected(SEQ - 1, W - 1)


# --- the launch guard: one window value for prefill and decode -----------------------------------------
def test_mixed_conventions_are_refused():
    with pytest.raises(ValueError, match="--prefill-attention-backend aiter and --decode-attention-backend triton"):
        guard_window_conventions("aiter", "aiter", "triton", env={})
    with pytest.raises(ValueError, match="read Step-3.5's sliding window differently"):
        guard_window_conventions("triton", "triton", "flashinfer", env={})  # R = W against R = W-1
    assert not same_window_convention("aiter", "fa3")


@pytest.mark.parametrize(
    "prefill,decode", [("fa3", "flashinfer"), ("fa4", "trtllm_mha"), ("triton", "fa3"), ("flashinfer", "trtllm_mha")]
)
def test_same_convention_mixes_pass(prefill, decode):
    guard_window_conventions(None, prefill, decode, env={})
    assert radix_sliding_window_size(prefill, W) == radix_sliding_window_size(decode, W)


def test_guard_falls_back_to_attention_backend_and_skips_full_attention_models():
    guard_window_conventions("aiter", None, None, env={})
    with pytest.raises(ValueError):
        guard_window_conventions("triton", "aiter", None, env={})  # decode falls back to triton
    guard_window_conventions("triton", "aiter", None, has_sliding_layers=False, env={})


@pytest.mark.parametrize(
    "env,topk,match",
    [
        ({"SGLANG_AITER_KV_CACHE_LAYOUT": "vectorized_5d"}, None, "vectorized_5d"),
        ({"SGLANG_AITER_UNIFIED_VERIFY": "0"}, None, "SGLANG_AITER_UNIFIED_VERIFY=0"),
        ({}, 2, "--speculative-eagle-topk 2"),
    ],
)
def test_aiter_paths_off_the_unified_kernel_are_refused(env, topk, match):
    with pytest.raises(ValueError, match=match):
        guard_window_conventions("aiter", env=env, speculative_eagle_topk=topk)
    guard_window_conventions("triton", env=env, speculative_eagle_topk=topk)  # not an aiter matter


@pytest.mark.sglang_pin
def test_aiter_refusals_match_its_source():
    src = _method_src("srt/layers/attention/aiter_backend.py", "AiterAttnBackend", "forward_extend")
    # CK prefill (and the 5D path that reuses its window tuple) reads S as flash-attn's left window.
    assert "window_size = (layer.sliding_window_size, -1)" in src
    assert "window_size=window_size" in _fn_src("srt/layers/attention/aiter_utils.py", "forward_extend_vectorized_5d")
    # Target verify off the unified kernel: extend_attention_fwd with no sliding_window_size.
    verify = src[src.index("self._reject_target_verify_cross_layer_kv(k, v)") :]
    verify = verify[: verify.index("return o.view")]
    assert "self.extend_attention_fwd(" in verify and "sliding_window_size" not in verify
    assert "and self.topk == 1" in _method_src("srt/layers/attention/aiter_backend.py", "AiterAttnBackend", "__init__")



# --- what the model reads at construction ------------------------------------------------------------
def _publish(monkeypatch, prefill, decode, draft=None):
    import sglang.srt.runtime_context as rc

    monkeypatch.setattr(rc, "attention_backends", lambda: (prefill, decode))
    monkeypatch.setattr(rc, "get_spec", lambda: types.SimpleNamespace(speculative_draft_attention_backend=draft))


def test_model_values_follow_the_configured_backends(monkeypatch):
    from sglang_step35.attention.window import model_radix_sliding_window_size, model_runner_sliding_window_size

    _publish(monkeypatch, "aiter", "aiter")
    assert model_radix_sliding_window_size(512) == 512
    _publish(monkeypatch, "fa3", "fa3", draft="triton")
    assert (model_radix_sliding_window_size(512), model_runner_sliding_window_size(512)) == (511, 512)
    _publish(monkeypatch, "flashinfer", "flashinfer")
    assert model_runner_sliding_window_size(512) == 511
    _publish(monkeypatch, "fa3", "flashinfer")
    assert model_runner_sliding_window_size(512) == 511  # fa3 takes flashinfer's R
    _publish(monkeypatch, "aiter", "triton")
    with pytest.raises(ValueError, match="different layer values"):
        model_radix_sliding_window_size(512)
    _publish(monkeypatch, "aiter", "aiter", draft="triton")
    assert model_radix_sliding_window_size(512, draft=True) == 511


def test_model_values_outside_a_server_use_the_cpu_default():
    from sglang_step35.attention.window import configured_backends, model_radix_sliding_window_size

    # This pytest process never published SGLang's config.
    assert configured_backends() == ("torch_native", "torch_native")
    assert model_radix_sliding_window_size(512) == 511

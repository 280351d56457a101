"""Sliding-window sizes per SGLang 0.5.23 attention backend, for Step-3.5's sliding layers.

Step-3.5's ``config.sliding_window`` = W counts the HF way: a query at position i sees exactly W
keys, its own included (positions i-W+1 .. i). SGLang has two knobs, and every backend reads them
with its own convention:

* the per-layer value ``RadixAttention(sliding_window_size=S)`` (``layer.sliding_window_size``),
  which the backends turn into a kernel mask;
* the runner-wide value ``model_runner.sliding_window_size`` = R. SGLang takes it from
  ``model.get_attention_sliding_window_size()`` when the model class defines one, else, for a
  hybrid-SWA architecture such as Step3p5ForCausalLM, from ``config.sliding_window`` (= W)
  (load_model_utils.py ``resolve_sliding_window_size``). Some backends trim the KV list they hand
  the kernel to the last R or R+1 tokens, and the SWA pool keeps R+1 keys per request
  (mem_cache/common.py ``free_swa_out_of_window_slots``: evicts below ``pre_len - R``).

:func:`radix_sliding_window_size` gives S and :func:`runner_sliding_window_size` gives R such that
a query sees exactly W keys on every prefill/decode path of that backend. The per-backend readings
below were taken from the installed 0.5.23 sources (``sglang/srt/layers/attention/*_backend.py``
and the kernels they call); tests/test_attention_window.py checks each one, running the kernel on
CPU where it can and otherwise calling the backend's code with the kernel captured.

SGLang's built-in Step3p5 (sglang/srt/models/step3p5.py, ``self.sliding_window =
config.sliding_window`` handed to RadixAttention) passes S = W and defines no
``get_attention_sliding_window_size`` (R = W): W+1 keys on fa3/fa4/flashinfer/trtllm_mha/triton
prefill, W on aiter. It is used here as an oracle for where the knobs are, not for their values.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WindowConvention:
    """How one backend turns S (layer) and R (runner) into keys seen by a query.

    ``keys_over_radix``: keys seen = S + keys_over_radix. ``runner``: the R the backend needs,
    as an offset from W (None: R only sizes the SWA pool, and SGLang's default R = W keeps W+1 >=
    W keys, enough). ``source``: file and line of the code that fixes the convention.
    """

    keys_over_radix: int
    runner_offset: int | None
    source: str


# FlashAttention's window_size=(left, right): "Query at position i will only attend to keys between
# [i + seqlen_k - seqlen_q - window_size[0], i + seqlen_k - seqlen_q + window_size[1]] inclusive"
# (sglang/kernels/ops/attention/flash_attention.py docstring of flash_attn_with_kvcache; the FA4
# cute mask computes col_limit_left = row + causal_row_offset - window_size_left,
# flash_attn/cute/mask.py, and fa4_sm120/flash_fwd.py n_idx_left = m + seqlen_delta - left).
# With right=0: left+1 keys.
_FA_SOURCE = (
    "flashattention_backend.py forward_extend: window_size = (layer.sliding_window_size, 0 if causal "
    "else ...); forward_decode: window_size = (layer.sliding_window_size, 0) -> flash-attn keeps keys "
    "[i-left, i]: S+1 keys"
)

CONVENTIONS: dict[str, WindowConvention] = {
    # torch_native_backend.py _make_sliding_window_mask:
    #   return (k_pos <= q_pos) & (k_pos >= q_pos - sliding_window_size)   -> S+1 keys, both paths.
    "torch_native": WindowConvention(
        1, None, "torch_native_backend.py: (k_pos <= q_pos) & (k_pos >= q_pos - sliding_window_size)"
    ),
    # triton_backend.py: extend passes sliding_window_size=layer.sliding_window_size to
    # extend_attention_fwd, whose mask keeps q_id <= kv_id + SLIDING_WINDOW_SIZE
    # (kernels/ops/attention/extend_attention.py, "Add mask where q_id <= kv_id + sliding_window_size")
    # -> S+1 keys, the prefix clipped to its last R tokens. Decode ignores S (it only selects the
    # window rail): update_sliding_window_buffer builds
    #   window_kv_lens = torch.minimum(seq_lens, torch.tensor(sliding_window_size))
    # with the runner's R, seq_lens counting the new token -> R keys. So R must be W.
    "triton": WindowConvention(
        1,
        0,
        "triton_backend.py: extend mask q_id <= kv_id + layer.sliding_window_size (S+1 keys); decode "
        "window_kv_lens = torch.minimum(seq_lens, model_runner.sliding_window_size) (R keys)",
    ),
    # flashinfer_backend.py: prefill passes window_left=layer.sliding_window_size; FlashInfer's mask
    # keeps kv_idx + qo_len + window_left >= kv_len + qo_idx
    # (flashinfer/data/include/flashinfer/attention/variants.cuh:89) -> S+1 keys. But decode passes
    # no window: FlashInferIndicesUpdaterDecode.update_sliding_window trims the list to
    #   torch.clamp(seq_lens, max=self.sliding_window_size + 1)
    # with the runner's R -> R+1 keys; the ragged-prefix custom mask (_build_swa_prefix_custom_mask:
    # k_abs >= q_abs - window) and the plan-time window_left also use R. So R must equal S = W-1:
    # the model class must define get_attention_sliding_window_size() returning W-1.
    "flashinfer": WindowConvention(
        1,
        -1,
        "flashinfer_backend.py: window_left=layer.sliding_window_size (flashinfer variants.cuh:89 "
        "kv_idx + qo_len + window_left >= kv_len + qo_idx: S+1 keys); decode list "
        "torch.clamp(seq_lens, max=self.sliding_window_size + 1) (R+1 keys)",
    ),
    "fa3": WindowConvention(1, None, _FA_SOURCE),
    # fa4 is the same FlashAttentionBackend (fa_impl_ver=4), same window tuple.
    "fa4": WindowConvention(1, None, _FA_SOURCE),
    # trtllm_mha_backend.py: every trtllm_batch_{decode,context}_with_kv_cache call passes
    # window_left=layer.sliding_window_size; flashinfer csrc/trtllm_fmha_kernel_launcher.cu:262
    #   runner_params.mAttentionWindowSize = window_left == -1 ? INT_MAX : window_left + 1;
    # -> S+1 keys.
    "trtllm_mha": WindowConvention(
        1,
        None,
        "trtllm_mha_backend.py: window_left=layer.sliding_window_size; trtllm_fmha_kernel_launcher.cu:262 "
        "mAttentionWindowSize = window_left + 1",
    ),
    # aiter_backend.py, unified-attention paths (extend, decode, target verify, draft extend):
    #   uni_window = (layer.sliding_window_size - 1, 0)  /  de_window = (layer.sliding_window_size - 1, 0)
    # and AITER's unified_attention sets SLIDING_WINDOW = 1 + window_size[0], masking
    # (context_len + query_pos - seq_offset) < SLIDING_WINDOW (aiter/ops/triton/attention/
    # unified_attention.py and its kernel) -> S keys. The unified path is the one our selection
    # forces (SGLANG_USE_AITER_UNIFIED_ATTN=1, and always with the hybrid SWA pool); the paths that
    # read S differently are refused by guard_window_conventions (select.py).
    "aiter": WindowConvention(
        0,
        None,
        "aiter_backend.py: uni_window/de_window = (layer.sliding_window_size - 1, 0); aiter "
        "unified_attention SLIDING_WINDOW = 1 + window_size[0] (keys q-k < SLIDING_WINDOW)",
    ),
    # intel_amx_backend.py forward_extend/forward_decode pass layer.sliding_window_size + 1 to
    # extend_attention_cpu / decode_attention_cpu, i.e. the kernels take a window that counts the
    # query's own key (sglang_step35/cpu/kernel_ops.py _window_visible: k_pos > q_pos - window) -> S+1 keys.
    "intel_amx": WindowConvention(
        1, None, "intel_amx_backend.py: layer.sliding_window_size + 1 handed to the CPU kernels (own key counted)"
    ),
    # xpu_backend.py passes window_size=(sliding_window_size, 0) to its flash-attn kernel and itself
    # reasons "kv length <= left window + 1" -> S+1 keys (same convention as FA; not run here).
    "intel_xpu": WindowConvention(
        1, None, "xpu_backend.py: window_size=(layer.sliding_window_size, 0), flash-attn convention"
    ),
    # npu ascend_backend.py: npu_fused_infer_attention_score(sparse_mode=4, pre_tokens=
    # layer.sliding_window_size, next_tokens=0): the band [q - pre_tokens, q] -> S+1 keys
    # (torch_npu's documented band; not run here).
    "ascend": WindowConvention(
        1, None, "ascend_backend.py: pre_tokens=layer.sliding_window_size, next_tokens=0, sparse_mode=4"
    ),
}


def _convention(backend: str) -> WindowConvention:
    try:
        return CONVENTIONS[backend]
    except KeyError:
        raise ValueError(
            f"attention backend {backend!r}: no known sliding-window convention in SGLang 0.5.23; "
            f"Step-3.5's sliding layers need one of: {', '.join(sorted(CONVENTIONS))}"
        ) from None


def _check_window(window: int) -> None:
    if int(window) < 1:
        raise ValueError(f"sliding window must count at least the query's own key, got {window}")


def radix_sliding_window_size(backend: str, window: int) -> int:
    """``RadixAttention(sliding_window_size=...)`` for which a query sees exactly ``window`` keys
    (its own included) under ``backend``. Raises ValueError for a backend with no known convention."""
    _check_window(window)
    return int(window) - _convention(backend).keys_over_radix


def runner_sliding_window_size(backend: str, window: int) -> int:
    """What ``model.get_attention_sliding_window_size()`` must return under ``backend``
    (SGLang's model_runner.sliding_window_size). Without that method SGLang uses
    ``config.sliding_window`` = ``window``, which is what every backend but flashinfer needs."""
    _check_window(window)
    offset = _convention(backend).runner_offset
    return int(window) + (0 if offset is None else offset)


def keys_seen(backend: str, radix_value: int) -> int:
    """Keys a query sees under ``backend`` for a layer value ``radix_value`` (>= 0)."""
    return int(radix_value) + _convention(backend).keys_over_radix


def same_window_convention(a: str, b: str) -> bool:
    """True when one RadixAttention value and one runner value serve both backends (a model has one
    of each per layer, whichever backend runs the forward). A backend whose runner_offset is None
    works with R = W or W-1 (both keep >= W keys in the SWA pool), so only triton (R = W) against
    flashinfer (R = W-1) conflict on R."""
    ca, cb = _convention(a), _convention(b)
    if ca.keys_over_radix != cb.keys_over_radix:
        return False
    return ca.runner_offset is None or cb.runner_offset is None or ca.runner_offset == cb.runner_offset


# --- what the model reads at construction --------------------------------------------------------
# Outside a server (no published SGLang config, e.g. a model built directly in a unit test) there is
# no backend to ask; the CPU default, torch_native, is what those runs use.
_UNPUBLISHED_DEFAULT = "torch_native"


def configured_backends(draft: bool = False) -> tuple[str, str]:
    """(prefill, decode) attention backends in effect, as SGLang resolved them (exec.kernel, split
    flags falling back to --attention-backend). ``draft``: the MTP draft model, whose runner uses
    --speculative-draft-attention-backend when set."""
    from sglang.srt.runtime_context import attention_backends, get_spec

    try:
        prefill, decode = attention_backends()
    except ValueError:  # "config namespace 'exec' not published": not inside a server
        return _UNPUBLISHED_DEFAULT, _UNPUBLISHED_DEFAULT
    if draft:
        try:
            own = get_spec().speculative_draft_attention_backend
        except ValueError:
            own = None
        if own:
            return own, own
    return prefill or _UNPUBLISHED_DEFAULT, decode or prefill or _UNPUBLISHED_DEFAULT


def _one_value(values: dict[str, int], what: str) -> int:
    if len(set(values.values())) > 1:
        raise ValueError(
            f"prefill/decode attention backends need different {what} for Step-3.5's sliding layers "
            f"({values}); use one backend for both (select.guard_window_conventions refuses this at launch)"
        )
    return next(iter(values.values()))


def model_radix_sliding_window_size(window: int, draft: bool = False) -> int:
    """RadixAttention(sliding_window_size=...) for a sliding layer of the model being built."""
    return _one_value({b: radix_sliding_window_size(b, window) for b in configured_backends(draft)}, "layer values")


def model_runner_sliding_window_size(window: int, draft: bool = False) -> int:
    """What the model's get_attention_sliding_window_size() should return (SGLang's
    model_runner.sliding_window_size) for the backends in effect."""
    values = {b: runner_sliding_window_size(b, window) for b in configured_backends(draft)}
    # A backend with no runner requirement accepts the other's R (same_window_convention).
    strict = {b: v for b, v in values.items() if _convention(b).runner_offset is not None}
    return _one_value(strict, "runner values") if strict else int(window)

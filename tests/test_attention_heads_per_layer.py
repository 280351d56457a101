"""Per-layer query heads reach SGLang: the 96-head sliding and MTP layers of Step-3.5-Flash run
correctly under the attention backends that size their state from one head count.

SGLang 0.5.23's triton backend sizes its decode buffers (`attn_logits`, `attn_lse`, and the CUDA-graph
copies) and flashinfer plans its wrappers (`num_qo_heads`) from
`ModelConfig.get_max_num_attention_heads()`, which is `num_attention_heads` (the full layers' 64)
unless the HF config has `num_attention_heads_per_layer`. Our config derives that list, so both see 96.

- triton: SGLang's own attention test harness (`sglang.test.kits.attention_unittest`: its mock model
  runner, forward batch and torch reference) with the `ModelConfig` of the real Step-3.5-Flash
  config.json (read through the registered plugin) in place of its tiny config; the real
  `TritonAttnBackend` sizes its buffers from it and SGLang's decode kernel runs under
  TRITON_INTERPRET=1 on a 96-head layer for several requests. Before the fix the buffers hold 64 heads
  per request: request b's heads 64..95 land in request b+1's rows and the last request's past the
  buffer (the test stops before that write, on the buffer shape, so the process is never corrupted).
- flashinfer: the kernel cannot run here; its decode and prefill updaters (SGLang's classes) are
  built from the same runner and must plan for the 96-head layers.
- `num_attention_heads` stays 64: fa3 and others read it for the full layers.
"""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import pytest
import torch

from sglang_step35.config import SLIDING, attention_heads_per_layer, read_config

SLIDING_HEADS, FULL_HEADS, KV_HEADS, HEAD_DIM = 96, 64, 8, 128


@pytest.fixture(scope="module")
def flash_model_config(tmp_path_factory):
    """SGLang's ModelConfig of the shipped Step-3.5-Flash config.json, as a launch reads it."""
    from sglang_step35.plugin import register

    register()
    from sglang.srt.configs.model_config import ModelConfig

    d = tmp_path_factory.mktemp("flash")
    (d / "config.json").write_text(json.dumps(read_config()))
    return ModelConfig(str(d), dtype="float32")


def test_config_exposes_per_layer_heads_and_keeps_the_full_layers_value(flash_model_config):
    cfg = flash_model_config.hf_text_config
    types = cfg.layer_types
    assert len(cfg.num_attention_heads_per_layer) == len(types) == 48  # 45 main + 3 MTP
    assert cfg.num_attention_heads_per_layer == [SLIDING_HEADS if t == SLIDING else FULL_HEADS for t in types]
    assert cfg.num_attention_heads_per_layer[45:] == [SLIDING_HEADS] * 3  # the MTP layers
    assert flash_model_config.get_max_num_attention_heads() == SLIDING_HEADS
    # fa3 (flashattention_backend) and the tensor-core choice read these for the full layers.
    assert cfg.num_attention_heads == flash_model_config.num_attention_heads == FULL_HEADS
    assert flash_model_config.get_num_attention_heads(4) == FULL_HEADS // 4
    # Derived, never written back into a saved config.json.
    assert "num_attention_heads_per_layer" not in cfg.to_dict()


def test_a_stated_per_layer_list_must_agree_with_the_layers():
    from sglang_step35.config import Step35Config, Step35ConfigError

    raw = read_config()
    heads = attention_heads_per_layer(raw)
    assert Step35Config(**raw, num_attention_heads_per_layer=heads).num_attention_heads_per_layer == heads
    with pytest.raises(Step35ConfigError, match="num_attention_heads_per_layer"):
        Step35Config(**raw, num_attention_heads_per_layer=[64] * len(heads))


@pytest.fixture(scope="module", autouse=True)
def _undo_the_kits_import_time_override():
    """Importing SGLang's attention kit enters `get_parallel().override(attn_tp_size=1, ...)` at module
    level and never leaves it (sglang/test/kits/attention_unittest/attention_methods/dense_attention.py),
    so every later test in the process would see attention-TP width 1 whatever its tp_size. Leave it
    after this module's tests."""
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    yield
    da._parallel_override.__exit__(None, None, None)


@pytest.fixture(autouse=True)
def _restore_published_server_args(monkeypatch):
    """SGLang's attention kit (MockModelRunner) publishes its server args for the test and never
    restores them; undo that, so later tests in the process see its own state (no published config)."""
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    runners = []
    init = da.MockModelRunner.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        runners.append(self)

    monkeypatch.setattr(da.MockModelRunner, "__init__", recording)
    yield
    for runner in reversed(runners):
        runner._server_args_override.restore()


def _runner(case, model_config):
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    return da.MockModelRunner(
        case=case, model_config=model_config, dtype=torch.float32, device="cpu", max_context_len=16,
        head_dim=HEAD_DIM,
    )


@pytest.fixture(scope="module")
def interpreted_decode_kernels():
    if torch.cuda.is_available():
        pytest.skip("runs SGLang's Triton decode kernel interpreted on CPU tensors")
    from gpu_contract import ensure_interpreted, interpreted_triton_language

    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    with interpreted_triton_language():
        for kernel in ("_fwd_kernel_stage1", "_fwd_grouped_kernel_stage1", "_fwd_kernel_stage2"):
            ensure_interpreted("sglang.kernels.ops.attention.decode_attention", kernel)
        # The decode metadata kernels, imported by name into the modules that launch them.
        from sglang.srt.layers.attention import triton_backend
        from sglang.srt.mem_cache import kv_index_translator

        for module, kernel, user in (
            ("sglang.kernels.ops.attention.kv_indices", "create_flashinfer_kv_indices_triton", kv_index_translator),
            ("sglang.kernels.ops.attention.metadata", "get_num_kv_splits_triton", triton_backend),
        ):
            ensure_interpreted(module, kernel)
            mp.setattr(user, kernel, getattr(importlib.import_module(module), kernel))
        yield
    mp.undo()


def test_triton_decode_of_a_96_head_layer_matches_the_reference(flash_model_config, interpreted_decode_kernels):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    case = da.DenseAttentionCase(
        name="step35_96_head_decode", backend="triton", forward_mode=ForwardMode.DECODE,
        num_heads=SLIDING_HEADS, num_kv_heads=KV_HEADS, page_size=1, prefix_lens=(3, 6, 2),
    )
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        # The harness's only model description is its tiny config: hand it the real one instead.
        mp.setattr(da, "TinyModelConfig", lambda **_: flash_model_config)
        fixture = da.build_dense_attention_fixture(
            None, case, head_dim=HEAD_DIM, max_context_len=16, dtype=torch.float32, device="cpu"
        )
    backend = fixture.backend
    assert type(backend).__name__ == "TritonAttnBackend"
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        backend.init_forward_metadata(fixture.forward_batch)
        rows = backend.forward_metadata.attn_logits.shape[1]
        # The decode kernel writes each request's 96 heads at the buffers' row stride.
        assert rows >= SLIDING_HEADS and backend.forward_metadata.attn_lse.shape[1] == rows, (
            f"TritonAttnBackend sized its decode buffers for {rows} heads per request; the "
            f"{SLIDING_HEADS}-head layer would write into the next request's rows and past the buffer"
        )
        out = fixture.actual_module(fixture.input_hidden, fixture.forward_batch)
    want = da.expected_dense_fixture_output(fixture)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_flashinfer_plans_the_96_head_layers(flash_model_config):
    from sglang.srt.layers.attention import flashinfer_backend as fib
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.test.kits.attention_unittest.attention_methods import dense_attention as da

    case = da.DenseAttentionCase(
        name="step35_flashinfer_plan", backend="flashinfer", forward_mode=ForwardMode.DECODE,
        num_heads=SLIDING_HEADS, num_kv_heads=KV_HEADS, page_size=1, prefix_lens=(3,),
    )
    runner = _runner(case, flash_model_config)
    # What the updaters read from FlashInferAttnBackend (its constructor needs a GPU).
    attn_backend = SimpleNamespace(
        flashinfer_kv_cache_dtype=torch.bfloat16, kv_indptr=[], kv_last_page_len=None, qo_indptr=[],
        _swa_kv_pool=None, prefill_wrapper_ragged=None, dispatch_reason=fib.WrapperDispatch.SLIDING_WINDOW,
    )
    decode = fib.FlashInferIndicesUpdaterDecode(runner, attn_backend)
    prefill = fib.FlashInferIndicesUpdaterPrefill(runner, attn_backend)
    assert decode.num_qo_heads == prefill.num_qo_heads == SLIDING_HEADS
    assert decode.num_kv_heads == KV_HEADS

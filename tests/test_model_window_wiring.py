"""Our model classes pass each attention backend the sliding-window values that give exactly
`sliding_window` keys (the per-backend table is attention/window.py, tested in test_attention_window.py).

Built under a published SGLang config naming the backend, as inside a server: every sliding layer's
RadixAttention value and the runner-level value (get_attention_sliding_window_size) must be the
backend's, for the target model and for the MTP draft (which follows
--speculative-draft-attention-backend when set).
"""

from __future__ import annotations

import json

import pytest

from sglang_step35.attention.window import keys_seen, radix_sliding_window_size, runner_sliding_window_size
from sglang_step35.config import SLIDING
from sglang_step35.tiny import write_tiny_checkpoint
import gpu_contract

BACKENDS = ["torch_native", "triton", "flashinfer", "fa3", "aiter"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from sglang_step35.config import Step35Config

    gpu_contract.sglang_world_of_one()
    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("window"), seed=0)
    return Step35Config(**json.loads((ckpt / "config.json").read_text()))


def _sliding_values(model_layers, cfg, indices) -> set[int]:
    return {layer.self_attn.attn.sliding_window_size for layer, i in zip(model_layers, indices)
            if cfg.layer_types[i] == SLIDING}


@pytest.mark.parametrize("backend", BACKENDS)
def test_target_model_layers_and_runner_get_the_backends_values(cfg, backend):
    from sglang.srt.runtime_context import get_context

    from sglang_step35.models.step3p5 import Step3p5ForCausalLM

    W = int(cfg.sliding_window)
    with get_context().override_server_args(device="cpu", attention_backend=backend):
        model = Step3p5ForCausalLM(cfg)
    values = _sliding_values(model.model.layers, cfg, range(cfg.num_hidden_layers))
    assert values == {radix_sliding_window_size(backend, W)}
    assert keys_seen(backend, values.pop()) == W
    full = [layer.self_attn.attn.sliding_window_size for i, layer in enumerate(model.model.layers)
            if cfg.layer_types[i] != SLIDING]
    assert full and set(full) == {-1}
    assert model.get_attention_sliding_window_size() == runner_sliding_window_size(backend, W)


def test_aiter_and_flashinfer_values_differ_from_the_fa3_convention(cfg):
    # Teeth for the table above: today's single value (W - 1 everywhere, runner W) is wrong for these.
    W = int(cfg.sliding_window)
    assert radix_sliding_window_size("aiter", W) == W
    assert runner_sliding_window_size("flashinfer", W) == W - 1
    assert radix_sliding_window_size("fa3", W) == W - 1


def test_mtp_draft_follows_the_draft_attention_backend(cfg):
    from sglang.srt.runtime_context import get_context

    from sglang_step35.models.step3p5_mtp import Step3p5MTP

    W = int(cfg.sliding_window)
    with get_context().override_server_args(device="cpu", attention_backend="triton",
                                            speculative_draft_attention_backend="aiter"):
        mtp = Step3p5MTP(cfg, draft_model_idx=0)
    assert mtp.layer.self_attn.attn.sliding_window_size == radix_sliding_window_size("aiter", W) == W
    assert mtp.get_attention_sliding_window_size() == runner_sliding_window_size("aiter", W)

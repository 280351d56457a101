"""The MTP draft's attention backend at launch: `--speculative-draft-attention-backend` is judged by
the same window rule as the target's backends (sglang_step35.served.check_draft_attention, called by
launch.apply_server_policy), so a backend that ignores the window stops the launch, not the scheduler."""

from __future__ import annotations

import pytest

from sglang_step35.tiny import write_tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("served-draft-attention"), seed=3)


def _launch(ckpt, monkeypatch, draft_backend):
    """apply_server_policy on a real ServerArgs with MTP-3, on a faked Hopper (what SGLang's
    resolve_once runs it on)."""
    from sglang.srt.server_args import ServerArgs

    from sglang_step35 import launch, platform

    monkeypatch.setattr(platform, "forced", platform.Platform("nvidia", compute_capability=(9, 0)))
    args = ServerArgs(model_path=str(ckpt), speculative_algorithm="EAGLE", speculative_num_steps=3,
                      speculative_eagle_topk=1, speculative_num_draft_tokens=4,
                      speculative_draft_attention_backend=draft_backend)
    launch.apply_server_policy(args)
    return args


@pytest.mark.parametrize("backend", ["flex_attention", "flashmla"])
def test_window_ignoring_draft_backend_is_refused_at_launch(ckpt, monkeypatch, backend):
    with pytest.raises(ValueError, match=rf"--speculative-draft-attention-backend {backend} cannot serve the "
                                         r"sliding-window layers of Step-3.5's MTP draft .*fa3"):
        _launch(ckpt, monkeypatch, backend)


@pytest.mark.parametrize("backend", ["triton", "flashinfer", "fa3"])
def test_window_capable_draft_backend_launches(ckpt, monkeypatch, backend):
    assert _launch(ckpt, monkeypatch, backend).speculative_draft_attention_backend == backend


def test_draft_backend_matters_only_with_speculative_decoding(ckpt, monkeypatch):
    from sglang.srt.server_args import ServerArgs

    from sglang_step35 import served

    served.check_draft_attention(ServerArgs(model_path=str(ckpt), speculative_draft_attention_backend="flex_attention"),
                                 {"layer_types": ["sliding_attention"] * 4, "num_hidden_layers": 2})

"""Shared fixtures: tiny checkpoints and `sglang serve` processes (one per configuration per session)."""

from __future__ import annotations

import os

import pytest

from sglang_step35.tiny import TRAINED_TINY_DIR, write_tiny_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The default tiny checkpoint (seed 0)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-seed0"), seed=0)


@pytest.fixture(scope="session")
def trained_dir():
    """The embedded trained tiny checkpoint (`step35 tiny OUT --trained`): writes GSM8K solutions and tool calls."""
    return TRAINED_TINY_DIR


@pytest.fixture(scope="session")
def served_trained(trained_dir):
    """The trained checkpoint behind plain `sglang serve --device cpu` with the step3p5 parsers."""
    from sglang_step35.server import SGLangServer

    server = SGLangServer(
        str(trained_dir),
        ["--device", "cpu", "--reasoning-parser", "step3p5", "--tool-call-parser", "step3p5",
         # lets tests force the model's output text (sglang_step35.forced_output) to drive the parsers
         "--enable-custom-logit-processor"],
    )
    server.start()
    yield server
    server.stop()

"""The plain Step-3.5 model in the package (`sglang_step35.reference`): reachable without SGLang and
without tests/ on sys.path (bench/gpu_check.py imports it so), batched as training runs it, and on the
device its weights are on."""

import subprocess
import sys
from pathlib import Path

import torch

from sglang_step35.reference import Step35Reference

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [(37 * i + 11) % 1000 + 20 for i in range(40)]  # 40 > 2x the tiny sliding window (16)


def test_importable_without_sglang_or_the_test_tree():
    code = ("import sys; import sglang_step35.reference, sglang_step35.served_logprobs; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'reference') "
            "or m == 'sglang_step35.config'); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_batched_forward_is_each_sequence_alone(tiny_dir):
    ref = Step35Reference(tiny_dir)
    other = TOKENS[::-1]
    logits, mtp = ref.forward(torch.tensor([TOKENS, other]))
    assert logits.shape[:2] == (2, len(TOKENS)) and len(mtp) == ref.n_mtp
    for row, seq in enumerate([TOKENS, other]):
        torch.testing.assert_close(logits[row], ref.logits(seq), atol=1e-5, rtol=1e-5)
        for k, theirs in enumerate(ref.mtp_chain_logits(seq)):
            torch.testing.assert_close(mtp[k][row], theirs, atol=1e-5, rtol=1e-5)


def test_weights_and_results_on_the_requested_device(tiny_dir):
    ref = Step35Reference(tiny_dir, device="meta")
    assert all(t.device.type == "meta" for t in ref.w.values())
    assert 0 not in ref.moe_layers  # routing is data-dependent: a meta tensor cannot route
    x = ref.embed(TOKENS[:8])  # the token ids are put on the weights' device
    y = ref.decoder_layer(0, x, torch.arange(8, device="meta"))  # rope and masks follow the positions
    assert x.device.type == y.device.type == ref.main_head(y).device.type == "meta"

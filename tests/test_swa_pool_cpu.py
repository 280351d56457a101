"""Sliding layers read the right KV under memory pressure on CPU (hybrid SWA pool + torch_native).

SGLang 0.5.23's torch_native backend writes a sliding layer's KV at the SWA pool's slots but reads
it back through `req_to_token`, i.e. at *full-pool* slots. The two allocators hand out the same
slots only until the SWA pool starts freeing out-of-window tokens; after that, sliding layers read
other tokens' KV (or index past the SWA pool and crash the scheduler). The plugin therefore turns
the hybrid pool off for torch_native on CPU. This test loads a small KV budget
with concurrent long requests and checks every output token against the plain-PyTorch reference.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from reference import Step35Reference
from sglang_step35.server import SGLangServer

pytestmark = pytest.mark.server

N_REQ, PROMPT_LEN, NEW = 6, 48, 40  # 6 x 88 tokens > 0.8 x 512: the SWA pool must free


def _greedy(server, ids):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}
    return requests.post(server.base_url + "/generate", json=body, timeout=600).json()["output_ids"]


def test_concurrent_requests_past_the_window_match_the_reference(tiny_dir):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(20, 900, (PROMPT_LEN,), generator=g).tolist() for _ in range(N_REQ)]
    server = SGLangServer(str(tiny_dir), ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "512"])
    with server:
        with ThreadPoolExecutor(N_REQ) as pool:
            outs = list(pool.map(lambda p: _greedy(server, p), prompts))
            outs2 = list(pool.map(lambda p: _greedy(server, p), prompts))  # second wave on a reused pool
        log = server.log_text()
    ref = Step35Reference(tiny_dir, dtype=torch.float32)
    for p, out, out2 in zip(prompts, outs, outs2):
        expected = ref.greedy_generate(p, NEW)
        assert out == expected and out2 == expected
    assert "Use sliding window memory pool" not in log

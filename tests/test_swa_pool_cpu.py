"""SGLang's hybrid SWA KV pool on CPU (torch_native attention), under SWA-pool pressure.

SGLang 0.5.23's torch_native backend writes a sliding layer's KV at the SWA pool's slots but reads
it back through `req_to_token`, i.e. at *full-pool* slots. The two allocators hand out the same
slots only until the SWA pool frees out-of-window tokens or is smaller than the full pool; after
that sliding layers read other tokens' KV, or index past the SWA pool and crash the scheduler. The
plugin translates those reads (sglang_step35/cpu/swa_attention.py) and leaves the hybrid pool on,
as on GPUs.

The scenario: concurrent requests sharing a long prefix (radix-cache hits, SWA radix tombstones),
each decoding far past window + SGLang's SWA eviction interval (out-of-window slots freed mid-
request), with an SWA pool a quarter of the full pool's size, far smaller than the requests hold
together (admission and retraction under SWA pressure); a second wave of half the requests reuses the
pool. Every output
token equals the plain-PyTorch reference's greedy choice and every request completes. The server is
the session's shared tiny fp32 one (conftest `served_tiny`, whose pools are sized for this test).
"""

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from conftest import TINY_FP32_FULL_TOKENS, TINY_FP32_SWA_RATIO
from reference import Step35Reference

pytestmark = pytest.mark.server

# Window 16 (tiny checkpoint); SGLang frees out-of-window SWA slots every 128 decoded tokens
# (SGLANG_SWA_EVICTION_INTERVAL), so 160 new tokens cross it. 8 x 280 tokens in flight need ~1,100
# SWA slots before eviction; the pool has 512.
N_REQ, PREFIX, SUFFIX, NEW = 8, 96, 24, 160
FULL_TOKENS, SWA_RATIO = TINY_FP32_FULL_TOKENS, TINY_FP32_SWA_RATIO


def _greedy(server, ids):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW, "temperature": 0, "ignore_eos": True}}
    r = requests.post(server.base_url + "/generate", json=body, timeout=900)
    r.raise_for_status()
    return r.json()["output_ids"]


def test_concurrent_requests_past_the_window_on_a_small_swa_pool_match_the_reference(tiny_dir, served_tiny):
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(20, 900, (PREFIX,), generator=g).tolist()
    prompts = [prefix + torch.randint(20, 900, (SUFFIX,), generator=g).tolist() for _ in range(N_REQ)]
    server = served_tiny
    with ThreadPoolExecutor(N_REQ) as pool:
        outs = list(pool.map(lambda p: _greedy(server, p), prompts))
        # A second wave on the reused pool (half the requests: pool reuse, not pressure, is its point;
        # its prompts are all cached prefixes now).
        outs2 = list(pool.map(lambda p: _greedy(server, p), prompts[::2]))
    log = server.log_text()
    # The hybrid pool really ran, at the small size asked for.
    pools = re.search(r"Use sliding window memory pool\. full_layer_tokens=(\d+), swa_layer_tokens=(\d+)", log)
    assert pools, "SGLang did not build the hybrid SWA pool"
    assert int(pools.group(2)) == int(int(pools.group(1)) * SWA_RATIO)
    ref = Step35Reference(tiny_dir, dtype=torch.float32)
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert len(out) == NEW, f"request {i}: {len(out)} tokens"
        if i % 2 == 0:
            assert outs2[i // 2] == out, f"request {i}: the second wave differs from the first"
        # Teacher-forced greedy check (one reference forward per request instead of NEW): every
        # served token is the reference's argmax after the prompt and the tokens served before it.
        expected = ref.logits(p + out)[len(p) - 1:-1].argmax(-1).tolist()
        first = next((k for k, (a, b) in enumerate(zip(out, expected)) if a != b), None)
        assert first is None, f"request {i}: token {first} is {out[first]}, the reference's greedy choice is {expected[first]}"

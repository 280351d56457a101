"""``reasoning_effort`` and ``chat_template_kwargs.thinking_budget`` through ``sglang serve`` on
the trained tiny model, with the official ``openai`` client: no processor string from the
client and no ``--enable-custom-logit-processor`` on the server.

The session's MTP-3 server (``served_trained_mtp3``: custom logit processors are never applied to MTP
verification, which is why the budget is a grammar object; the effort mapping set through
``SGLANG_STEP35_REASONING_EFFORT_BUDGETS``); the plain-decoding path runs on the shared
``served_trained`` server.
"""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from openai import OpenAI
from transformers import AutoTokenizer

from conftest import REASONING_EFFORT_BUDGETS
from sglang_step35.training.data import read_gsm8k
from test_parsers_e2e import _collect

pytestmark = pytest.mark.server

MAPPING = REASONING_EFFORT_BUDGETS


def _ask(server, stream=False, **kw):
    client = OpenAI(base_url=server.base_url + "/v1", api_key="none")
    request = dict(model="tiny", messages=[{"role": "user", "content": read_gsm8k("test")[0]["question"]}],
                   max_tokens=256, temperature=0, **kw)
    if stream:
        return _collect(client.chat.completions.create(stream=True, **request))
    r = client.chat.completions.create(**request)
    msg = r.choices[0].message
    return {"reasoning": msg.model_extra.get("reasoning_content") or "", "content": msg.content or "",
            "finish_reason": r.choices[0].finish_reason}


def _n_tokens(trained_dir, text):
    return len(AutoTokenizer.from_pretrained(str(trained_dir)).encode(text, add_special_tokens=False))


def _assert_capped(trained_dir, free, capped, budget):
    # At most the budget, cut from the model's own reasoning, then an answer that ends by itself.
    assert _n_tokens(trained_dir, capped["reasoning"]) <= budget, capped
    assert free["reasoning"].startswith(capped["reasoning"])
    assert capped["content"].strip() and "</think>" not in capped["content"], capped
    assert capped["finish_reason"] == "stop"


def _ask_all(server, requests_kw: list[dict]) -> list[dict]:
    """Every request in flight at once (the server batches them: one decode loop instead of one per
    request on this 2-core machine); greedy fp32 decoding gives each the tokens it gets alone
    (tests/test_mtp.py checks batched MTP output against the reference)."""
    with ThreadPoolExecutor(len(requests_kw)) as pool:
        return list(pool.map(lambda kw: _ask(server, **kw), requests_kw))


def test_effort_and_thinking_budget_cap_reasoning_with_mtp(served_trained_mtp3, trained_dir):
    info = requests.get(served_trained_mtp3.base_url + "/get_server_info", timeout=30).json()
    assert info["speculative_algorithm"] == "EAGLE" and not info["enable_custom_logit_processor"]
    cases = [({"reasoning_effort": "low"}, MAPPING["low"]),
             ({"extra_body": {"chat_template_kwargs": {"thinking_budget": 16}}}, 16),
             # SGLang's numeric effort, scaled by the default "numeric" budget (8192): 0.002 -> 16.
             ({"extra_body": {"reasoning_effort": 0.002}}, 16)]
    free, high, *answers = _ask_all(served_trained_mtp3, [{}, {"reasoning_effort": "high"}]
                                    + [dict(kw, stream=stream) for kw, _ in cases for stream in (False, True)])
    assert _n_tokens(trained_dir, free["reasoning"]) > max(MAPPING.values()) + 8
    # An uncapped tier changes nothing: the same output as no field.
    assert high == free
    for (kw, budget), capped, streamed in zip(cases, answers[0::2], answers[1::2]):
        _assert_capped(trained_dir, free, capped, budget)
        assert (streamed["reasoning"], streamed["content"]) == (capped["reasoning"], capped["content"]), kw
        assert streamed["finish_reason"] == "stop"


def test_bad_thinking_budget_is_refused_by_name(served_trained_mtp3):
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs.thinking_budget must be an integer"):
        _ask(served_trained_mtp3, extra_body={"chat_template_kwargs": {"thinking_budget": "many"}})


def test_thinking_budget_without_mtp(served_trained, trained_dir):
    budget = {"extra_body": {"chat_template_kwargs": {"thinking_budget": 8}}}
    free, capped, streamed = _ask_all(served_trained, [{}, budget, dict(budget, stream=True)])
    _assert_capped(trained_dir, free, capped, 8)
    assert (streamed["reasoning"], streamed["content"]) == (capped["reasoning"], capped["content"])

"""The embedded trained tiny checkpoint really reasons and calls tools through plain `sglang serve`.

No forced output here: the text is what the model writes (greedy), split by our step3p5 reasoning
parser and parsed by our tool-call parser. Prompts are ones the model never trained on: GSM8K test
questions and the held-out tool requests (cities, people and numbers absent from the training calls).
"""

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from sglang_step35.tiny import TRAINED_FILES, TRAINED_TINY_DIR
from sglang_step35.training.data import TOOLS, read_gsm8k, tool_prompts
from sglang_step35.training.train import TRAINED_SPEC

HASH_LINE = re.compile(r"^#### *-?[\d,.]+\s*$", re.M)


def _client(server):
    return OpenAI(base_url=server.base_url + "/v1", api_key="none")


def test_embedded_checkpoint_is_the_recipe_output_and_small():
    cfg = json.loads((TRAINED_TINY_DIR / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_nextn_predict_layers"]) == (TRAINED_SPEC.hidden_size, 3)
    # What it learned is shown by what it writes (the served tests below), not by its committed log.
    assert sum((TRAINED_TINY_DIR / f).stat().st_size for f in TRAINED_FILES) < 20e6


@pytest.mark.server
def test_gsm8k_answers_close_reasoning_and_end_in_hash_line(served_trained):
    rows = read_gsm8k("test")[:10]

    def ask(row):
        return _client(served_trained).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": row["question"]}], max_tokens=384,
            temperature=0).choices[0].message

    good = 0
    with ThreadPoolExecutor(len(rows)) as pool:  # one batch on the server, as a client fleet sends them
        for msg in pool.map(ask, rows):
            reasoning = (msg.model_extra or {}).get("reasoning_content") or ""
            good += bool(reasoning.strip()) and "</think>" not in (msg.content or "") \
                and bool(HASH_LINE.search(msg.content or ""))
    assert good >= 9, f"{good}/10 answers closed the think block and gave a #### line"


@pytest.mark.server
def test_held_out_tool_prompts_give_parsed_calls(served_trained):
    prompts = tool_prompts(held_out=True)[:12]

    def ask(p):
        return _client(served_trained).chat.completions.create(
            model="tiny", messages=p.messages, tools=TOOLS, max_tokens=96, temperature=0)

    names = []
    with ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(ask, prompts))
    for p, r in zip(prompts, responses):
        msg = r.choices[0].message
        assert msg.tool_calls, f"no parsed call for {p.messages[0]['content']!r}: {msg.content!r}"
        assert r.choices[0].finish_reason == "tool_calls"
        json.loads(msg.tool_calls[0].function.arguments)  # arguments are valid JSON
        assert "<tool_call>" not in (msg.content or "")
        names.append(msg.tool_calls[0].function.name)
    assert sum(n == p.tool for n, p in zip(names, prompts)) >= 11, names


@pytest.mark.server
def test_tool_call_stream_equals_non_stream(served_trained):
    p = tool_prompts(held_out=True)[0]
    kw = dict(model="tiny", messages=p.messages, tools=TOOLS, max_tokens=96, temperature=0)
    msg = _client(served_trained).chat.completions.create(**kw).choices[0].message
    reasoning, name, args = "", "", ""
    for chunk in _client(served_trained).chat.completions.create(**kw, stream=True):
        if chunk.choices:
            d = chunk.choices[0].delta
            reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            for tc in d.tool_calls or []:
                name += (tc.function and tc.function.name) or ""
                args += (tc.function and tc.function.arguments) or ""
    assert reasoning == msg.model_extra["reasoning_content"]
    assert name == msg.tool_calls[0].function.name
    assert json.loads(args) == json.loads(msg.tool_calls[0].function.arguments)


@pytest.mark.server
def test_trained_mtp_layers_get_drafts_accepted_without_changing_output(trained_dir, served_trained_mtp3):
    """MTP-3 on the trained checkpoint (fp32): every greedy token is plain greedy decoding's — the fp32
    reference's argmax, teacher-forced (tests/test_mtp.py does the same on every accept path) — and the
    trained MTP layers' drafts are accepted (random MTP layers: length ~1.0)."""
    import requests

    from reference import Step35Reference
    from reference.serving import reference_greedy_ties
    from sglang_step35.mtp_check import mtp_acceptance
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trained_dir))
    texts = [tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                     add_generation_prompt=True) for r in read_gsm8k("test")[20:22]]
    prompts = [tok(t)["input_ids"] for t in texts]  # ids, so the reference reads what the server decodes after
    outs = []
    for p in prompts:
        r = requests.post(served_trained_mtp3.base_url + "/generate", timeout=600, json={
            "input_ids": p, "sampling_params": {"max_new_tokens": 96, "temperature": 0}})
        r.raise_for_status()
        outs.append(r.json())
    ref = Step35Reference(trained_dir)
    ties = sum(reference_greedy_ties(ref, p, o["output_ids"], 1e-3) for p, o in zip(prompts, outs))
    assert ties <= 4, f"{ties} near-tied positions"
    hist: list[int] = []
    for o in outs:
        for k, c in enumerate(o["meta_info"]["spec_correct_drafts_histogram"]):
            hist += [0] * (k + 1 - len(hist))
            hist[k] += c
    accept = mtp_acceptance({"spec_correct_drafts_histogram": hist})["accept_length"]
    print(f"trained MTP-3: accept length {accept:.2f} (histogram {hist})")
    assert accept >= 1.6, hist

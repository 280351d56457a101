"""step3p5 parsers end to end through `sglang serve` and the official `openai` client.

These tests FORCE the served model's output tokens with SGLang's custom-logit-processor hook
(tests/reference/forced_output.py), to pin exact edge cases (text before a call, a forgotten `</think>`):
the text is chosen by the test, everything after sampling — detokenization, reasoning split,
tool-call parsing, streaming — is real. tests/test_trained_model.py covers what the trained model
writes by itself; so do the forced-tool-choice tests here, which check what the model writes under
the grammar SGLang builds from our structural tag.
"""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI
from transformers import AutoTokenizer

from reference.forced_output import ForcedTokens
from sglang_step35.training.data import TOOLS as TRAINED_TOOLS
from sglang_step35.training.data import tool_prompts

pytestmark = pytest.mark.server

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["location"]},
    },
}]
OUTPUT = ("The user wants Beijing's weather; call the tool.\n</think>\n\nLet me look that up.\n"
          "<tool_call>\n<function=get_weather>\n<parameter=location>\nBeijing\n</parameter>\n"
          "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")


def _request(served_trained, trained_dir, text, max_tokens=None, **kw):
    tok = AutoTokenizer.from_pretrained(str(trained_dir))
    forced = tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    client = OpenAI(base_url=served_trained.base_url + "/v1", api_key="none")
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Weather in Beijing for 3 days?"}],
        max_tokens=max_tokens or len(forced) + 4, temperature=0,
        extra_body={"custom_logit_processor": ForcedTokens.to_str(), "custom_params": {"forced_ids": forced}},
        **kw)


def _collect(stream):
    """A streamed chat completion as the client assembles it."""
    out = {"reasoning": "", "content": "", "names": [], "args": {}, "finish_reason": None}
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        d = choice.delta
        out["reasoning"] += (d.model_extra or {}).get("reasoning_content") or ""
        out["content"] += d.content or ""
        for tc in d.tool_calls or []:
            if tc.function and tc.function.name:
                out["names"].append(tc.function.name)
            if tc.function and tc.function.arguments:
                out["args"][tc.index] = out["args"].get(tc.index, "") + tc.function.arguments
        out["finish_reason"] = choice.finish_reason or out["finish_reason"]
    return out


def test_tool_call_and_reasoning_non_stream(served_trained, trained_dir):
    r = _request(served_trained, trained_dir, OUTPUT, tools=TOOLS)
    msg = r.choices[0].message
    assert msg.model_extra["reasoning_content"] == "The user wants Beijing's weather; call the tool."
    assert "Let me look that up." in (msg.content or "")
    assert "<tool_call>" not in (msg.content or "")
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    assert json.loads(msg.tool_calls[0].function.arguments) == {"location": "Beijing", "days": 3}
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_call_and_reasoning_stream_equals_non_stream(served_trained, trained_dir):
    stream = _request(served_trained, trained_dir, OUTPUT, tools=TOOLS, stream=True)
    reasoning, content, names, args = "", "", [], ""
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += (d.model_extra or {}).get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.function and tc.function.name:
                names.append(tc.function.name)
            if tc.function and tc.function.arguments:
                args += tc.function.arguments
    assert reasoning == "The user wants Beijing's weather; call the tool."
    assert "Let me look that up." in content and "<tool_call>" not in content
    assert names == ["get_weather"]
    assert json.loads(args) == {"location": "Beijing", "days": 3}


def test_forgotten_think_close_still_yields_the_tool_call(served_trained, trained_dir):
    # sglang #38892: a tool call after reasoning with no </think> must not vanish into reasoning.
    text = OUTPUT.replace("\n</think>\n\nLet me look that up.", "")
    msg = _request(served_trained, trained_dir, text, tools=TOOLS).choices[0].message
    assert [c.function.name for c in msg.tool_calls] == ["get_weather"]
    assert msg.model_extra["reasoning_content"].startswith("The user wants")


def test_call_cut_off_by_max_tokens_is_returned_as_generated(served_trained, trained_dir):
    # OpenAI's behaviour: finish_reason stays "length" and the arguments are what the model
    # wrote so far, not closed into a call that a client would execute.
    tok = AutoTokenizer.from_pretrained(str(trained_dir))
    ids = tok.encode(OUTPUT, add_special_tokens=False)
    head = "<parameter=location>\n"
    # The first cut that leaves part of "Beijing" written.
    n = next(k for k in range(len(ids)) if head in tok.decode(ids[:k]) and tok.decode(ids[:k]).split(head)[1])
    value = tok.decode(ids[:n]).split(head)[1]
    assert "Beijing".startswith(value) and value != "Beijing"
    arguments = '{"location": "' + value

    r = _request(served_trained, trained_dir, OUTPUT, max_tokens=n, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "length"
    assert [(c.function.name, c.function.arguments) for c in msg.tool_calls] == [("get_weather", arguments)]
    assert msg.model_extra["reasoning_content"] == "The user wants Beijing's weather; call the tool."

    s = _collect(_request(served_trained, trained_dir, OUTPUT, max_tokens=n, tools=TOOLS, stream=True))
    assert s["finish_reason"] == "length"
    assert (s["names"], s["args"]) == (["get_weather"], {0: arguments})
    assert (s["reasoning"], s["content"]) == (msg.model_extra["reasoning_content"], msg.content or "")


MARKUP = ("<tool_call>", "</tool_call>", "<function", "</function>", "<parameter", "</parameter>",
          "<think>", "</think>")


@pytest.mark.parametrize("named", [False, True], ids=["required", "named"])
def test_forced_tool_choice_with_reasoning_gives_calls_and_clean_content(served_trained, named):
    # The trained model's own output (greedy) under the grammar of our structural tag. A run
    # before the fix showed "</think>" and "<parameter=" in content: the lenient parse split
    # string values the grammar had written, and xgrammar's "required" tag let the model go on
    # after its call.
    client = OpenAI(base_url=served_trained.base_url + "/v1", api_key="none")
    prompts = tool_prompts(held_out=True)[:3]

    def kwargs(p):
        choice = {"type": "function", "function": {"name": p.tool}} if named else "required"
        return dict(model="tiny", messages=p.messages, tools=TRAINED_TOOLS, tool_choice=choice,
                    max_tokens=160, temperature=0)

    # All six requests (each prompt plain and streamed) in flight at once: the server decodes them
    # in one batch, each under its own grammar.
    with ThreadPoolExecutor(2 * len(prompts)) as pool:
        plain = [pool.submit(client.chat.completions.create, **kwargs(p)) for p in prompts]
        streamed = [pool.submit(lambda p: _collect(client.chat.completions.create(stream=True, **kwargs(p))), p)
                    for p in prompts]
        answers = [(p, f.result(), g.result()) for p, f, g in zip(prompts, plain, streamed)]
    for p, r, s in answers:
        msg = r.choices[0].message
        reasoning = msg.model_extra.get("reasoning_content") or ""
        calls = [(c.function.name, c.function.arguments) for c in msg.tool_calls or []]
        assert reasoning.strip() and "</think>" not in reasoning, reasoning
        assert calls, (reasoning, msg.content)
        if named:
            assert {name for name, _ in calls} == {p.tool}
        assert not any(tag in (msg.content or "") for tag in MARKUP), msg.content
        assert (s["reasoning"], s["content"]) == (reasoning, msg.content or "")
        assert (s["names"], [s["args"][i] for i in sorted(s["args"])]) == ([n for n, _ in calls], [a for _, a in calls])
        assert s["finish_reason"] == r.choices[0].finish_reason


@pytest.mark.parametrize("budget", [8, 32])
def test_reasoning_budget_caps_reasoning_and_the_answer_follows(served_trained, trained_dir, budget):
    from sglang_step35.reasoning_budget import Step35ReasoningBudget
    from sglang_step35.training.data import read_gsm8k

    tok = AutoTokenizer.from_pretrained(str(trained_dir))
    client = OpenAI(base_url=served_trained.base_url + "/v1", api_key="none")
    kw = dict(model="tiny", messages=[{"role": "user", "content": read_gsm8k("test")[0]["question"]}],
              max_tokens=256, temperature=0)
    capped = dict(kw, extra_body={"custom_logit_processor": Step35ReasoningBudget.to_str(),
                                  "custom_params": {"thinking_budget": budget}})
    with ThreadPoolExecutor(3) as pool:  # one batch on the server
        free_f = pool.submit(client.chat.completions.create, **kw)
        r_f = pool.submit(client.chat.completions.create, **capped)
        s_f = pool.submit(lambda: _collect(client.chat.completions.create(stream=True, **capped)))
        free, r, s = free_f.result().choices[0].message, r_f.result(), s_f.result()
    assert len(tok.encode(free.model_extra["reasoning_content"], add_special_tokens=False)) > budget + 8
    msg = r.choices[0].message
    reasoning = msg.model_extra["reasoning_content"] or ""
    assert len(tok.encode(reasoning, add_special_tokens=False)) <= budget
    assert free.model_extra["reasoning_content"].startswith(reasoning)
    assert (msg.content or "").strip() and "</think>" not in msg.content
    assert r.choices[0].finish_reason == "stop"  # the answer ended by itself, within max_tokens
    assert (s["reasoning"], s["content"]) == (reasoning, msg.content)

"""Reasoning budget (sglang_step35.reasoning_budget) driven step by step as SGLang's sampler
calls it, with the trained tiny checkpoint's tokenizer; the output goes through SGLang's
``ReasoningParser("step3p5")`` in both modes. tests/test_parsers_e2e.py runs it through
``sglang serve``.
"""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
from sglang_step35.reasoning_budget import Step35ReasoningBudget
from sglang_step35.tiny import TRAINED_TINY_DIR
from test_parsers_public_api import reasoning_modes, registered  # noqa: F401  (fixture)

TOK = AutoTokenizer.from_pretrained(str(TRAINED_TINY_DIR))
CLOSE = TOK.convert_tokens_to_ids("</think>")
END = TOK.convert_tokens_to_ids("<|im_end|>")
PROMPT = TOK.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
REASONING = "I add two and two. Then I check it again, and again, and again, and once more.\nStill checking"
ANSWER = "The answer is 4.\n#### 4"
NEWLINE = TOK.encode("\n", add_special_tokens=False)


def generate(budget, reasoning=REASONING, lag=False, prompt=PROMPT, params=None, max_steps=200, rethink=False):
    """Greedy decoding of a scripted model that reasons (``reasoning`` and, if it closes the
    block itself, ``</think>``) and, once the block is closed, writes ANSWER and stops.

    ``lag``: req.output_ids trails the sampler by one token, as under SGLang's overlap scheduler.
    ``rethink``: after the first ``</think>`` the model writes ``reasoning`` again instead.
    """
    want_reasoning = TOK.encode(reasoning, add_special_tokens=False)
    want_answer = TOK.encode(ANSWER, add_special_tokens=False) + [END]
    out = []
    req = SimpleNamespace(origin_input_ids=TOK.encode(prompt, add_special_tokens=False), output_ids=[], tokenizer=TOK)
    params = {"thinking_budget": budget} if params is None else params
    params = {**params, "__req__": req}
    processor = CustomLogitProcessor.from_str(Step35ReasoningBudget.to_str())
    for _ in range(max_steps):
        if CLOSE in out:
            tail = out[out.index(CLOSE) + 1:]
            while tail[:1] == NEWLINE:
                tail = tail[1:]  # the model answers whether or not a newline came first
            after = want_reasoning + want_answer if rethink else want_answer
            want = after[min(len(tail), len(after) - 1)]
        else:
            want = want_reasoning[len(out)] if len(out) < len(want_reasoning) else END
        logits = torch.zeros(1, len(TOK))
        logits[0, want] = 5.0
        token = int(processor(logits, [params]).argmax(-1))
        out.append(token)
        req.output_ids = out[:-1] if lag else list(out)
        if token == END:
            break
    return out[:-1] if out[-1] == END else out


def reasoning_tokens(out):
    return out[: out.index(CLOSE)] if CLOSE in out else out


@pytest.mark.parametrize("lag", [False, True], ids=["no_lag", "overlap_lag"])
@pytest.mark.parametrize("budget", [0, 1, 5, 17])
def test_budget_closes_reasoning_then_the_answer_follows(budget, lag):
    out = generate(budget, lag=lag)
    want = TOK.encode(REASONING, add_special_tokens=False)
    assert out[:budget] == want[:budget]
    # N reasoning tokens, the template's "\n</think>\n" (the first newline skipped if the N-th
    # token was one), then the model's own answer.
    # The prompt ends in "<think>\n"; under the lag the N-th token is not known yet when the
    # budget runs out, so a newline is forced whatever it was.
    last_is_newline = (TOK.decode(want[:budget]) if budget else PROMPT).endswith("\n")
    newline_forced = not (last_is_newline and (not lag or budget == 0))
    forced = TOK.encode(("\n" if newline_forced else "") + "</think>\n", add_special_tokens=False)
    assert out[budget:budget + len(forced)] == forced
    reasoning = TOK.decode(want[:budget])
    non, stream = reasoning_modes(TOK.decode(out))
    assert non == stream == (reasoning if newline_forced else reasoning.removesuffix("\n"), ANSWER)
    assert len(reasoning_tokens(out)) <= budget + 1  # the "\n" before </think> is format


def test_newline_as_last_budget_token_is_not_doubled():
    text = TOK.decode(TOK.encode(REASONING, add_special_tokens=False))
    ids = TOK.encode(text, add_special_tokens=False)
    n = next(i + 1 for i, t in enumerate(ids) if TOK.decode([t]) == "\n")
    out = generate(n)
    assert TOK.decode(out[n - 1:n + 2]) == "\n</think>\n"
    assert reasoning_modes(TOK.decode(out))[0][0] == TOK.decode(ids[:n - 1])


def test_model_that_closes_within_budget_is_untouched():
    free = generate(None, reasoning="Short.\n</think>")
    assert generate(50, reasoning="Short.\n</think>") == free
    assert TOK.decode(free) == "Short.\n</think>" + ANSWER
    assert reasoning_modes(TOK.decode(free))[0] == ("Short.", ANSWER)


@pytest.mark.parametrize("params", [{}, {"thinking_budget": -1}, {"thinking_budget": "5"},
                                    {"thinking_budget": True}, {"thinking_budget": 2.0}])
def test_no_or_invalid_budget_changes_nothing(params):
    assert generate(None, params=params) == TOK.encode(REASONING, add_special_tokens=False)


def test_model_that_opens_the_block_itself_is_counted_from_its_tag():
    # A prompt that did not open <think>: the model's own tag is not reasoning.
    prompt = PROMPT.removesuffix("<think>\n")
    out = generate(4, reasoning="<think>" + REASONING, prompt=prompt)
    want = TOK.encode("<think>" + REASONING, add_special_tokens=False)
    assert out[:5] == want[:5] and TOK.decode(out[5:8]).startswith("\n</think>")


def test_reasoning_already_closed_in_the_prompt_is_left_alone():
    # continue_final_message after a finished think block: the output is the answer.
    prompt = PROMPT + "Done.\n</think>\n"
    assert generate(0, prompt=prompt) == TOK.encode(REASONING, add_special_tokens=False)


def test_a_second_close_after_the_forced_one_is_banned():
    # The tiny model, stopped after 0 tokens, writes its reasoning into the answer and then
    # closes the block again; that "</think>" would end up in content.
    out = generate(0, reasoning=REASONING + "\n</think>", rethink=True)
    assert TOK.decode(out).startswith("</think>\n" + REASONING)  # the newline is ours
    assert out.count(CLOSE) == 1
    assert "</think>" not in reasoning_modes(TOK.decode(out))[0][1]

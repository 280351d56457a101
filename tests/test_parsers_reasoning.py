"""Step-3.5 reasoning detector: exact splits, chunking invariance, no lost characters."""

import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parser_corpus import build_corpus, reasoning_stream, split_at
from sglang_step35.parsers.reasoning import Step35ReasoningDetector

CORPUS = build_corpus(seed=1)
# tests/fuzz_parsers.py raises the example count through this variable.
HYP = settings(
    max_examples=int(os.environ.get("SGLANG_STEP35_PARSER_CASES", "150")),
    deadline=None,
    database=None if "SGLANG_STEP35_PARSER_CASES" in os.environ else settings.default.database,
    suppress_health_check=list(HealthCheck),
)

# Declarative statement of the split, independent of the scanner: leading <think> tags,
# each with any whitespace before it, are dropped; reasoning runs to the first </think> (minus one newline on each side of
# it) or to the first <tool_call> (which starts the content); without either it all is
# reasoning.
SPEC = re.compile(r"((?:\s*<think>)*)(.*?)(?:\n?</think>\n?(.*)|(<tool_call>.*)|)", re.S)


def spec_split(text):
    m = SPEC.fullmatch(text)
    return m.group(2), m.group(3) or m.group(4) or ""


def non_stream(text, **kw):
    r = Step35ReasoningDetector(**kw).detect_and_parse(text)
    return r.reasoning_text, r.normal_text


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("<think>Plan.</think>Answer.", "Plan.", "Answer."),
        ("Plan.\n</think>\nAnswer.", "Plan.", "Answer."),  # template opened <think>
        ("<think>\nPlan.\n\n</think>\n\nAnswer.", "\nPlan.\n", "\nAnswer."),  # one newline each side
        ("<think><think>Plan.</think>A", "Plan.", "A"),
        # The prompt did not open the block: the model's own <think> after whitespace.
        ("\n<think>Plan.</think>A", "Plan.", "A"),
        (" \n\t<think>\nPlan.\n</think>\nA", "\nPlan.", "A"),
        ("\n\n<think> \n<think>Plan.</think>A", "Plan.", "A"),
        ("  Plan.</think>A", "  Plan.", "A"),  # whitespace without a <think> is reasoning text
        ("\n", "\n", ""),
        ("Plan. <think> inside</think>A", "Plan. <think> inside", "A"),
        ("Plan.</think>A</think>B", "Plan.", "A</think>B"),  # only the first </think> ends it
        ("Still thinking", "Still thinking", ""),  # truncated: all reasoning
        ("", "", ""),
        ("</think>", "", ""),
        ("Plan.\n<tool_call>\n<function=f>", "Plan.\n", "<tool_call>\n<function=f>"),  # sglang #38892
        ("<tool_call>x</tool_call>", "", "<tool_call>x</tool_call>"),
        ("Plan.</think>\n<tool_call>x", "Plan.", "<tool_call>x"),
        ("Plan.</think><think>A", "Plan.", "<think>A"),
        ("<thi", "<thi", ""),  # a cut-off tag that never completed is text
        ("Plan </thin", "Plan </thin", ""),
        ("数学 🤔\n</think>\n答案", "数学 🤔", "答案"),
    ],
)
def test_exact_split(text, reasoning, content):
    assert non_stream(text) == (reasoning, content)
    assert reasoning_stream(Step35ReasoningDetector(), list(text)) == (reasoning, content)


def test_force_reasoning_false_is_still_forced():
    # serving_chat passes force_reasoning=False for templates not ending in <think>.
    assert non_stream("Plan.</think>Answer.", force_reasoning=False) == ("Plan.", "Answer.")


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.category)
def test_corpus_reasoning(case):
    reasoning, content = non_stream(case.text)
    assert reasoning == case.reasoning
    assert reasoning + content == spec_split(case.text)[0] + spec_split(case.text)[1]


@pytest.mark.parametrize("case", CORPUS[::9], ids=lambda c: c.category)
def test_every_single_cut_matches_non_stream(case):
    expected = non_stream(case.text)
    for i in range(len(case.text) + 1):
        chunks = [case.text[:i], "", case.text[i:]]
        assert reasoning_stream(Step35ReasoningDetector(), chunks) == expected, i


TAG_ALPHABET = ["<think>", "</think>", "<tool_call>", "\n", "<", "</", "think", ">", "a", "中", "😀", " "]
tag_soup = st.lists(st.sampled_from(TAG_ALPHABET), max_size=30).map("".join)
cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)


@HYP
@given(text=tag_soup, cut=cuts, stream_reasoning=st.booleans())
def test_any_chunking_equals_spec(text, cut, stream_reasoning):
    expected = spec_split(text)
    assert non_stream(text, stream_reasoning=stream_reasoning) == expected
    detector = Step35ReasoningDetector(stream_reasoning=stream_reasoning)
    assert reasoning_stream(detector, split_at(text, cut)) == expected


@HYP
@given(index=st.integers(0, len(CORPUS) - 1), cut=cuts)
def test_corpus_any_chunking(index, cut):
    text = CORPUS[index].text
    assert reasoning_stream(Step35ReasoningDetector(), split_at(text, cut)) == non_stream(text)


def test_partial_close_tag_is_held_not_leaked():
    d = Step35ReasoningDetector()
    first = d.parse_streaming_increment("Plan.\n</thi")
    assert (first.reasoning_text, first.normal_text) == ("Plan.", "")
    second = d.parse_streaming_increment("nk>\nAnswer")
    assert (second.reasoning_text, second.normal_text) == ("", "Answer")


def test_stream_reasoning_false_releases_reasoning_at_end_of_block():
    d = Step35ReasoningDetector(stream_reasoning=False)
    assert d.parse_streaming_increment("<think>Plan ").reasoning_text == ""
    assert d.parse_streaming_increment("more").reasoning_text == ""
    end = d.parse_streaming_increment("</think>A")
    assert (end.reasoning_text, end.normal_text) == ("Plan more", "A")


def test_stream_reasoning_false_truncated_flushes_at_finish():
    d = Step35ReasoningDetector(stream_reasoning=False)
    assert d.parse_streaming_increment("Plan").reasoning_text == ""
    assert d.finish().reasoning_text == "Plan"


@pytest.mark.parametrize(
    "previous, text, expected",
    [
        ("<think>I was", " thinking</think>A", (" thinking", "A")),
        ("<think>Done.</think>", "\nAnswer", ("", "Answer")),  # the newline after </think>
        ("<think>Done.</think>Ans", "wer", ("", "wer")),
        ("", "Plan</think>A", ("Plan", "A")),
    ],
)
def test_continue_final_message(previous, text, expected):
    kw = dict(continue_final_message=True, previous_content=previous)
    assert non_stream(text, **kw) == expected
    assert reasoning_stream(Step35ReasoningDetector(**kw), list(text)) == expected


def test_force_nonempty_content_moves_unfinished_reasoning_to_content():
    assert non_stream("Only thoughts", force_nonempty_content=True) == ("", "Only thoughts")
    d = Step35ReasoningDetector(force_nonempty_content=True)
    d.parse_streaming_increment("Only ")
    d.parse_streaming_increment("thoughts")
    assert d.finish().normal_text == "Only thoughts"

"""The step3p5 parsers through SGLang's own entry points, ``ReasoningParser`` and
``FunctionCallParser``, in both modes: what serving_chat calls, for the behaviours of
issue 16 (type aliases, ``<think>`` after whitespace, calls cut off by max_tokens,
forced tool choice, the fuzz regression).

Each helper returns the non-stream and the stream result so that every test states
both, and states that they are equal.
"""

import json
from typing import List, Optional

import pytest

from parser_corpus import TYPE_ALIASES, merge_call_items
from sglang.srt.entrypoints.openai.protocol import Function, Tool
from sglang.srt.function_call.function_call_parser import FunctionCallParser
from sglang.srt.parser.reasoning_parser import ReasoningParser
from sglang_step35.parsers import Step35ReasoningDetector, Step35ToolCallDetector, register_parsers


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    monkeypatch.setitem(ReasoningParser.DetectorMap, "step3p5", ReasoningParser.DetectorMap["step3p5"])
    monkeypatch.setitem(FunctionCallParser.ToolCallParserEnum, "step3p5",
                        FunctionCallParser.ToolCallParserEnum["step3p5"])
    register_parsers()
    assert ReasoningParser.DetectorMap["step3p5"] is Step35ReasoningDetector
    assert FunctionCallParser.ToolCallParserEnum["step3p5"] is Step35ToolCallDetector


def reasoning_modes(text: str, chunks: Optional[List[str]] = None, **kw):
    """(non-stream, stream) as ``(reasoning, content)``; serving_chat's non-stream path
    builds its parser with stream_reasoning=False."""
    non = ReasoningParser("step3p5", stream_reasoning=False, **kw).parse_non_stream(text)
    parser = ReasoningParser("step3p5", **kw)
    reasoning, content = "", ""
    for chunk in list(text) if chunks is None else chunks:
        r, c = parser.parse_stream_chunk(chunk)
        reasoning, content = reasoning + (r or ""), content + (c or "")
    r, c = parser.parse_stream_end()
    return (non[0] or "", non[1] or ""), (reasoning + (r or ""), content + (c or ""))


def tool_modes(text: str, tools, chunks: Optional[List[str]] = None, tool_choice=None):
    """(non-stream, stream) as ``(content, [(name, arguments string)])``."""
    normal, calls = FunctionCallParser(tools, "step3p5", tool_choice=tool_choice).parse_non_stream(text)
    parser = FunctionCallParser(tools, "step3p5", tool_choice=tool_choice)
    content, items = "", []
    for chunk in list(text) if chunks is None else chunks:
        c, new = parser.parse_stream_chunk(chunk)
        content, items = content + c, items + new
    c, new = parser.parse_stream_end()
    return (normal, [(x.name, x.parameters) for x in calls]), (content + c, merge_call_items(items + new))


def one_param_tool(schema):
    return [Tool(function=Function(name="f", parameters={"type": "object", "properties": {"v": schema}}))]


# -- 1. parameter types outside JSON Schema ------------------------------------------------


@pytest.mark.parametrize("declared, raw, value", TYPE_ALIASES)
def test_type_aliases(declared, raw, value):
    text = f"<tool_call>\n<function=f>\n<parameter=v>\n{raw}\n</parameter>\n</function>\n</tool_call>"
    non, stream = tool_modes(text, one_param_tool({"type": declared}))
    assert non == stream == ("", [("f", json.dumps({"v": value}, ensure_ascii=False))])


# -- 2. <think> after leading whitespace -----------------------------------------------------


@pytest.mark.parametrize(
    "text, reasoning, content",
    [
        ("\n<think>\nPlan.\n</think>\nAnswer.", "\nPlan.", "Answer."),
        ("  \n\n<think>Plan.</think>Answer.", "Plan.", "Answer."),
        ("\n<think>\n<think>Plan.</think>A", "Plan.", "A"),
        ("\n<think>Plan.\n<tool_call>\n", "Plan.\n", "<tool_call>\n"),
        ("\n\tPlan.</think>A", "\n\tPlan.", "A"),  # no tag: the whitespace is reasoning text
    ],
)
@pytest.mark.parametrize("force_reasoning", [True, False])
def test_think_after_leading_whitespace_is_consumed(text, reasoning, content, force_reasoning):
    non, stream = reasoning_modes(text, force_reasoning=force_reasoning)
    assert non == stream == (reasoning, content)
    for i in range(len(text) + 1):
        assert reasoning_modes(text, [text[:i], text[i:]])[1] == (reasoning, content), i


# -- 6. the fuzz finding ---------------------------------------------------------------------


def test_fuzz_regression_trailing_newline_after_stray_text():
    tools = [Tool(function=Function(name="f", parameters={"type": "object"}))]
    non, stream = tool_modes("<function=f>\n}\n", tools, ["<function=f>\n}", "\n"])
    assert stream == non


# -- 3. a call cut off by max_tokens --------------------------------------------------------

WEATHER_TOOL = [Tool(function=Function(name="get_weather", parameters={
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}))]
CALL_HEAD = "<tool_call>\n<function=get_weather>\n"


@pytest.mark.parametrize(
    "body, arguments",
    [
        ("<parameter=city>\nPar", '{"city": "Par'),
        ("<parameter=city>\nParis\n</parameter>\n<parameter=days>\n1", '{"city": "Paris", "days": 1'),
        ("<parameter=city>\nParis\n</parameter>\n", '{"city": "Paris"'),
        ("<parameter=city>\nParis\n</parameter>\n</function", '{"city": "Paris"'),
        ("", ""),
    ],
)
def test_call_cut_off_keeps_its_arguments_as_generated(body, arguments):
    text = "Plan.\n</think>\nLooking.\n" + CALL_HEAD + body
    non_r, stream_r = reasoning_modes(text)
    assert non_r == stream_r == ("Plan.", "Looking.\n" + CALL_HEAD + body)
    non, stream = tool_modes(non_r[1], WEATHER_TOOL)
    assert non == stream == ("Looking.\n", [("get_weather", arguments)])


def test_serving_top_up_sends_nothing_after_a_cut_off_call():
    # serving_chat._check_for_unstreamed_tool_args sends the part of the recorded
    # arguments (json.dumps'ed unless a string) that the stream has not sent.
    parser = FunctionCallParser(WEATHER_TOOL, "step3p5")
    for ch in CALL_HEAD + "<parameter=city>\nPar":
        parser.parse_stream_chunk(ch)
    parser.parse_stream_end()
    detector = parser.detector
    assert detector.prev_tool_call_arr[-1]["arguments"] == detector.streamed_args_for_tool[-1] == '{"city": "Par'

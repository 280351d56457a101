"""The step3p5 parsers through SGLang's own entry points, ``ReasoningParser`` and
``FunctionCallParser``, in both modes: what serving_chat calls, for the behaviours of
issue 16 (type aliases, ``<think>`` after whitespace, calls cut off by max_tokens,
forced tool choice, the fuzz regression).

Each helper returns the non-stream and the stream result so that every test states
both, and states that they are equal.
"""

import json
import os
from typing import List, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parser_corpus import merge_call_items
from sglang.srt.entrypoints.openai.protocol import Function, Tool, ToolChoice, ToolChoiceFuncName
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


# The alias table itself (parser_corpus.TYPE_ALIASES) is asserted once, in test_parsers_differential.py;
# here one alias through SGLang's FunctionCallParser, both modes.
def test_type_alias_through_function_call_parser():
    text = "<tool_call>\n<function=f>\n<parameter=v>\n 42 \n</parameter>\n</function>\n</tool_call>"
    non, stream = tool_modes(text, one_param_tool({"type": "Integer"}))
    assert non == stream == ("", [("f", '{"v": 42}')])


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


# -- 4. tool_choice="required" and a named tool ------------------------------------------------
# The output is generated under the structural tag our detector builds. xgrammar compiles
# that tag here and is the oracle: every text it accepts is parsed as its grammar reads it.

FORCED = [Tool(function=Function(name="get_weather", parameters={
    "type": "object", "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["location"]})),
    Tool(function=Function(name="send_email", parameters={
        "type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string"}},
        "required": ["to", "subject"]}))]
NAMED = ToolChoice(function=ToolChoiceFuncName(name="get_weather"))


_GRAMMARS = {}


def grammar(tool_choice, parallel_tool_calls=True):
    import xgrammar

    key = (str(tool_choice), parallel_tool_calls)
    if key not in _GRAMMARS:
        kind, tag = FunctionCallParser(FORCED, "step3p5").get_structure_constraint(
            tool_choice, parallel_tool_calls=parallel_tool_calls)
        assert kind == "structural_tag"
        _GRAMMARS[key] = xgrammar.Grammar.from_structural_tag(tag.model_dump_json())
    return _GRAMMARS[key]


def accepts(tool_choice, text, **kw):
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string(grammar(tool_choice, **kw), text)


# Written by the trained tiny model under tool_choice=required (found by a run through
# sglang serve): the grammar made "<parameter=days>...</tool_call> 6 trip" the location
# string; the lenient reading split it and leaked the rest into content.
TINY_REQUIRED = ("<tool_call>\n<function=get_weather>\n<parameter=location>\n<parameter=days>\nlunch\n\n"
                 "<parameter>\n</function>\n</tool_call> 6 trip\n</parameter>\n<parameter=days>\n679\n"
                 "</parameter>\n</function>\n</tool_call>")
TINY_ARGS = {"location": "<parameter=days>\nlunch\n\n<parameter>\n</function>\n</tool_call> 6 trip", "days": 679}


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_forced_choice_reads_values_as_the_grammar_does(tool_choice):
    assert accepts(tool_choice, TINY_REQUIRED)
    text = "The user wants a forecast.\n</think>" + TINY_REQUIRED
    non_r, stream_r = reasoning_modes(text)
    assert non_r == stream_r == ("The user wants a forecast.", TINY_REQUIRED)
    non, stream = tool_modes(TINY_REQUIRED, FORCED, tool_choice=tool_choice)
    assert non == stream == ("", [("get_weather", json.dumps(TINY_ARGS))])
    for i in range(0, len(TINY_REQUIRED) + 1, 3):
        chunks = [TINY_REQUIRED[:i], TINY_REQUIRED[i:]]
        assert tool_modes(TINY_REQUIRED, FORCED, chunks, tool_choice=tool_choice)[1] == non, i


def test_auto_keeps_the_lenient_reading():
    # Unconstrained output: a missing </parameter> is recovered at the next tag.
    assert tool_modes(TINY_REQUIRED, FORCED)[0][1][0] == ("get_weather", '{"location": "", "days": "lunch\\n\\n<parameter>"}')


def test_required_grammar_admits_calls_and_nothing_else():
    call = TINY_REQUIRED
    assert accepts("required", call + "\n" + call)
    assert not accepts("required", call + "\n" + call, parallel_tool_calls=False)
    # xgrammar's own "required" tag accepts prose after the call, where SGLang lets a
    # reasoning model write "</think>"; ours does not.
    for tail in [" The answer is 740.", "\n</think>\n\nThe answer is 740.", "\n<parameter=x>\n"]:
        assert not accepts("required", call + tail), tail
    assert not accepts(NAMED, call + " bye")
    assert not accepts("required", "Sure. " + call)


VALUE_FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=get_weather>", "</function>", "<parameter=",
                   "<parameter=days>", "</think>", "\n", " ", "<", ">", "/", "a", "中", "😀", "{", '"']


# tests/fuzz_parsers.py raises the example count through this variable.
@settings(max_examples=int(os.environ.get("SGLANG_STEP35_PARSER_CASES", "60")), deadline=None,
          database=None if "SGLANG_STEP35_PARSER_CASES" in os.environ else settings.default.database,
          suppress_health_check=list(HealthCheck))
@given(calls=st.lists(st.tuples(st.lists(st.sampled_from(VALUE_FRAGMENTS), max_size=12).map("".join),
                                st.one_of(st.none(), st.integers(-99, 99))), min_size=1, max_size=3),
       cut=st.integers(0, 2000))
def test_any_grammar_output_parses_as_the_grammar_reads_it(calls, cut):
    blocks, expected = [], []
    for location, days in calls:
        body = f"<parameter=location>\n{location}\n</parameter>\n"
        args = {"location": location}
        if days is not None:
            body += f"<parameter=days>\n{days}\n</parameter>\n"
            args["days"] = days
        blocks.append(f"<tool_call>\n<function=get_weather>\n{body}</function>\n</tool_call>")
        expected.append(("get_weather", json.dumps(args, ensure_ascii=False)))
    text = "\n".join(blocks)
    assert accepts("required", text)
    non, stream = tool_modes(text, FORCED, [text[:cut], text[cut:]], tool_choice="required")
    assert non == stream == ("", expected)

"""Step-3.5 tool-call detector: formats, typing, malformed input, streaming, registration."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parser_corpus import (
    SOUP_MARKERS,
    TOOLS,
    as_objects,
    assert_soup_parse_loses_nothing,
    build_corpus,
    split_at,
    tool_non_stream,
    tool_stream,
)
from sglang.srt.entrypoints.openai.protocol import Function, Tool, ToolChoice, ToolChoiceFuncName
from sglang.srt.function_call.function_call_parser import FunctionCallParser
from sglang.srt.parser.reasoning_parser import ReasoningParser
from sglang_step35.parsers import Step35ReasoningDetector, Step35ToolCallDetector, register_parsers

CORPUS = build_corpus(seed=2)
# tests/fuzz_parsers.py raises the example count through this variable.
HYP = settings(
    max_examples=int(os.environ.get("SGLANG_STEP35_PARSER_CASES", "150")),
    deadline=None,
    database=None if "SGLANG_STEP35_PARSER_CASES" in os.environ else settings.default.database,
    suppress_health_check=list(HealthCheck),
)

WEATHER = (
    "<tool_call>\n<function=get_weather>\n<parameter=location>\nBeijing\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)
WEATHER_ARGS = {"location": "Beijing", "days": 3}


def parse(text, tools=TOOLS):
    """Non-stream result, after checking that char-by-char streaming agrees with it."""
    expected = tool_non_stream(Step35ToolCallDetector(), text, tools)
    assert tool_stream(Step35ToolCallDetector(), list(text), tools) == expected
    return expected[0], as_objects(expected[1])


def test_canonical_call_and_exact_arguments_string():
    text, calls = tool_non_stream(Step35ToolCallDetector(), WEATHER, TOOLS)
    assert text == ""
    assert calls == [("get_weather", json.dumps(WEATHER_ARGS, ensure_ascii=False))]


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ("Let me check.\n\n" + WEATHER, "Let me check.\n\n", [("get_weather", WEATHER_ARGS)]),
        (WEATHER + "\n" + WEATHER + "\n", "", [("get_weather", WEATHER_ARGS)] * 2),
        (WEATHER + "\nIt is sunny.", "\nIt is sunny.", [("get_weather", WEATHER_ARGS)]),  # kept, unlike built-in
        ("No tools needed.", "No tools needed.", []),
        # Unknown function: the block stays visible as text, nothing is raised or dropped.
        (WEATHER.replace("get_weather", "rm_rf"), WEATHER.replace("get_weather", "rm_rf"), []),
        # sglang #38893 recoveries.
        (WEATHER.replace("<function=get_weather>", "<function get_weather>"), "", [("get_weather", WEATHER_ARGS)]),
        (WEATHER.replace("\n</parameter>", ""), "", [("get_weather", WEATHER_ARGS)]),
        (WEATHER.replace("</function>\n", ""), "", [("get_weather", WEATHER_ARGS)]),
        (WEATHER.replace("</tool_call>", "") + "\nDone", "\n\nDone", [("get_weather", WEATHER_ARGS)]),
        # No <tool_call> at all but a declared function: still a call.
        (WEATHER.replace("<tool_call>\n", "").replace("\n</tool_call>", ""), "", [("get_weather", WEATHER_ARGS)]),
        # Cut off by max_tokens: the call with its arguments exactly as far as they got,
        # not closed into JSON a client would execute (both modes).
        ("<tool_call>\n<function=get_weather>\n<parameter=location>\nBei", "", [("get_weather", '{"location": "Bei')]),
        ("<tool_call>\n<function=get_weather>\n<parameter=days>\n1", "", [("get_weather", '{"days": 1')]),
        ("<tool_call>\n<function=get_weather>\n<parameter=location>\nParis\n</parameter>\n<parameter=days>\n",
         "", [("get_weather", '{"location": "Paris", "days": ')]),
        ("<tool_call>\n<function=get_weather>\n<parameter=location>\nParis\n</parameter>\n</func",
         "", [("get_weather", '{"location": "Paris"')]),
        ("<tool_call>\n<function=search>\n<parameter=exact>\ntr", "", [("search", '{"exact": "tr')]),
        ('<tool_call>\n<function=search>\n<parameter=filters>\n{"a": 1}', "", [("search", '{"filters": {"a": 1}')]),
        ('<tool_call>\n<function=get_weather>\n{"location": "Os', "", [("get_weather", '{"location": "Os')]),
        ("<tool_call>\n<function=get_weather>\n", "", [("get_weather", "")]),
        # Cut inside the function name: no call exists yet, the text is content.
        ("<tool_call>\n<function=get_wea", "<tool_call>\n<function=get_wea", []),
        ("<tool_call>\n<function=get_weather>\n<parameter=loca",
         "<parameter=loca", [("get_weather", "")]),
        ("<tool_call>\n</tool_call>", "<tool_call>\n</tool_call>", []),
        # A legacy structural tag writes a JSON object inside the function.
        ('<tool_call>\n<function=get_weather>\n{"location": "Oslo"}\n</function>\n</tool_call>',
         "", [("get_weather", {"location": "Oslo"})]),
        # First value of a repeated parameter wins in both modes.
        (WEATHER.replace("days>\n3", "location>\nRome"), "", [("get_weather", {"location": "Beijing"})]),
        # Two functions in one block are two calls.
        (WEATHER.replace("</function>\n", "</function>\n<function=calc>\n<parameter=x>\n2\n</parameter>\n</function>\n"),
         "", [("get_weather", WEATHER_ARGS), ("calc", {"x": 2})]),
    ],
)
def test_formats_and_malformed_inputs(text, content, calls):
    assert parse(text) == (content, calls)


@pytest.mark.parametrize(
    "key, raw, value",
    [
        ("x", "3.5", 3.5), ("x", "7", 7), ("x", "1e2", 100.0), ("x", "inf", "inf"), ("x", "abc", "abc"),
        ("y", "null", None), ("y", "2.5", 2.5), ("y", "none", "none"),
        ("note", "null", None), ("note", "  spaced ", "  spaced "), ("note", "\n\ntwo\n\n", "\n\ntwo\n\n"),
    ],
)
def test_schema_typing(key, raw, value):
    text = f"<tool_call>\n<function=calc>\n<parameter={key}>\n{raw}\n</parameter>\n</function>\n</tool_call>"
    assert parse(text)[1] == [("calc", {key: value})]


@pytest.mark.parametrize(
    "key, raw, value",
    [
        ("limit", " 5 ", 5), ("limit", "5.0", "5.0"), ("exact", "TRUE", True), ("exact", "yes", "yes"),
        ("filters", '{"a": [1, {"b": null}]}', {"a": [1, {"b": None}]}), ("filters", "[1]", "[1]"),
        ("tags", "['x', 'y']", ["x", "y"]), ("tags", "not json", "not json"), ("unknown_key", "12", "12"),
    ],
)
def test_schema_typing_search(key, raw, value):
    text = f"<tool_call>\n<function=search>\n<parameter={key}>\n{raw}\n</parameter>\n</function>\n</tool_call>"
    assert parse(text)[1] == [("search", {key: value})]


# The alias table (parser_corpus.TYPE_ALIASES) is asserted once, in test_parsers_differential.py.


@pytest.mark.parametrize("raw, value", [("null", None), ("1.5", 1.5), ("x", "x")])
def test_type_alias_in_a_type_list_and_any_of(raw, value):
    props = {"a": {"type": ["Float", "NULL"]}, "b": {"anyOf": [{"type": "double"}, {"type": "null"}]}}
    tool = Tool(function=Function(name="f", parameters={"type": "object", "properties": props}))
    body = "".join(f"<parameter={k}>\n{raw}\n</parameter>\n" for k in "ab")
    assert parse(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>", [tool])[1] == [
        ("f", {"a": value, "b": value})
    ]


def test_ref_and_enum_schemas():
    tool = Tool(function=Function(name="f", parameters={
        "type": "object",
        "$defs": {"N": {"type": "integer"}},
        "properties": {"n": {"$ref": "#/$defs/N"}, "e": {"enum": [1, 2]}, "s": {"enum": ["1"]}},
    }))
    body = "".join(f"<parameter={k}>\n1\n</parameter>\n" for k in "nes")
    assert parse(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>", [tool])[1] == [
        ("f", {"n": 1, "e": 1, "s": "1"})
    ]


def test_name_first_then_argument_deltas():
    d = Step35ToolCallDetector()
    first = d.parse_streaming_increment(WEATHER[:40], TOOLS)
    assert [(c.name, c.parameters) for c in first.calls][0] == ("get_weather", "")
    streamed = "".join(c.parameters for c in first.calls)
    for ch in WEATHER[40:]:
        streamed += "".join(c.parameters for c in d.parse_streaming_increment(ch, TOOLS).calls)
    assert streamed == json.dumps(WEATHER_ARGS, ensure_ascii=False)
    # String values stream before they end.
    d = Step35ToolCallDetector()
    r = d.parse_streaming_increment("<tool_call>\n<function=write_file>\n<parameter=content>\nhello wor", TOOLS)
    assert "".join(c.parameters for c in r.calls) == '{"content": "hello wor'


def test_multi_token_delta_does_not_open_empty_call():
    # vllm #33690: an MTP step delivering "</tool_call><tool_call><" in one delta.
    chunks = [WEATHER[:-len("</tool_call>")], "</tool_call>\n<tool_call>\n<", WEATHER[len("<tool_call>\n<"):]]
    d = Step35ToolCallDetector()
    assert tool_stream(d, chunks) == ("", [("get_weather", json.dumps(WEATHER_ARGS))] * 2)


def test_serving_end_of_stream_check_sends_nothing_extra():
    # serving_chat._check_for_unstreamed_tool_args sends json.dumps(arguments)[len(streamed):].
    d = Step35ToolCallDetector()
    for ch in WEATHER + WEATHER[:-len("\n</function>\n</tool_call>")]:
        d.parse_streaming_increment(ch, TOOLS)
    d.finish(TOOLS)
    assert len(d.prev_tool_call_arr) == 2
    for arr, streamed in zip(d.prev_tool_call_arr, d.streamed_args_for_tool):
        args = arr["arguments"]
        assert (args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)) == streamed
    # The second call was cut off: serving_chat compares its string verbatim.
    assert d.streamed_args_for_tool[1] == '{"location": "Beijing", "days": 3'


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.category)
def test_corpus_pipeline(case):
    split = Step35ReasoningDetector().detect_and_parse(case.text)
    assert split.reasoning_text == case.reasoning
    content = split.normal_text
    assert parse(content) == (case.content, case.calls)


@HYP
@given(index=st.integers(0, len(CORPUS) - 1), cuts=st.lists(st.integers(0, 600), max_size=15))
def test_corpus_any_chunking(index, cuts):
    content = Step35ReasoningDetector().detect_and_parse(CORPUS[index].text).normal_text
    expected = tool_non_stream(Step35ToolCallDetector(), content)
    assert tool_stream(Step35ToolCallDetector(), split_at(content, cuts)) == expected


@pytest.mark.parametrize("case", CORPUS[::11], ids=lambda c: c.category)
def test_every_single_cut(case):
    content = Step35ReasoningDetector().detect_and_parse(case.text).normal_text
    expected = tool_non_stream(Step35ToolCallDetector(), content)
    for i in range(len(content) + 1):
        assert tool_stream(Step35ToolCallDetector(), [content[:i], content[i:]]) == expected, i


# Markup fragments plus content characters that no tag or name contains, so their
# count can be checked end to end. Parameter names never repeat: a repeat is the one
# documented place where a value is dropped.
FREE_TOOL = [Tool(function=Function(name="f", parameters={"type": "object"}))]
FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=f>", "<function f>", "<function=g>", "</function>",
             "<parameter=", "</parameter>", "\n", "<", ">", " ", "{", "}", '"', ":", "=", *SOUP_MARKERS]


@st.composite
def tag_soup(draw):
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
    counter = iter(range(100))
    return "".join(p + f"p{next(counter)}>" if p == "<parameter=" else p for p in parts)


@HYP
@given(text=tag_soup(), cuts=st.lists(st.integers(0, 300), max_size=12))
def test_tag_soup_never_raises_loses_nothing_and_is_chunking_invariant(text, cuts):
    assert_soup_parse_loses_nothing(text, cuts, FREE_TOOL)


def test_stray_text_in_function_keeps_its_spaces_at_every_cut():
    # Found by the fuzz run: a chunk ending at "<function" lost the following space.
    text = "<tool_call><function=f><parameter=p0></parameter><function f>"
    expected = ("<function f>", [("f", '{"p0": ""')])  # no </function>: cut off, unclosed
    assert tool_non_stream(Step35ToolCallDetector(), text, FREE_TOOL) == expected
    for i in range(len(text) + 1):
        assert tool_stream(Step35ToolCallDetector(), [text[:i], text[i:]], FREE_TOOL) == expected, i


@pytest.mark.parametrize("text", ["<function=f>\n}\n", "<function=f>\n}\n<parameter=p0>\nv\n</parameter>\n x\n",
                                  # make fuzz: "{" after stray text was a JSON body only when a chunk began at it
                                  "<tool_call><tool_call><tool_call><function=f><function=f>{",
                                  "<function=f>\nnote {\"a\": 1}\n</function>"])
def test_stray_text_is_decided_by_what_follows_not_by_the_cut(text):
    # Found by `make fuzz`: split as ['<function=f>\n}', '\n'] the stream lost the final
    # newline that non-stream kept as part of the stray "}".
    expected = tool_non_stream(Step35ToolCallDetector(), text, FREE_TOOL)
    for i in range(len(text) + 1):
        assert tool_stream(Step35ToolCallDetector(), [text[:i], text[i:]], FREE_TOOL) == expected, i


# -- SGLang integration ----------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ReasoningParser.DetectorMap, "step3p5", ReasoningParser.DetectorMap["step3p5"])
    monkeypatch.setitem(FunctionCallParser.ToolCallParserEnum, "step3p5",
                        FunctionCallParser.ToolCallParserEnum["step3p5"])
    register_parsers()
    register_parsers()  # idempotent


def test_register_makes_sglang_use_ours(registered):
    assert isinstance(ReasoningParser("step3p5").detector, Step35ReasoningDetector)
    assert isinstance(FunctionCallParser(TOOLS, "step3p5").detector, Step35ToolCallDetector)
    reasoning, content = ReasoningParser("step3p5", force_reasoning=False).parse_non_stream(
        "Plan\n<tool_call>\n<function=get_weather>\n</function>\n</tool_call>"
    )
    assert reasoning == "Plan\n"
    assert FunctionCallParser(TOOLS, "step3p5").parse_non_stream(content)[1][0].name == "get_weather"


def test_import_has_no_side_effects():
    code = (
        "import sglang_step35.parsers\n"
        "from sglang.srt.parser.reasoning_parser import ReasoningParser, DeepSeekR1Detector\n"
        "from sglang.srt.function_call.function_call_parser import FunctionCallParser\n"
        "from sglang.srt.function_call.qwen3_coder_detector import Qwen3CoderDetector\n"
        "assert ReasoningParser.DetectorMap['step3p5'] is DeepSeekR1Detector\n"
        "assert FunctionCallParser.ToolCallParserEnum['step3p5'] is Qwen3CoderDetector\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


TOOL_CHOICES = [
    "auto",
    "required",
    ToolChoice(function=ToolChoiceFuncName(name="get_weather")),
]


@pytest.mark.parametrize("tool_choice", TOOL_CHOICES, ids=["auto", "required", "named"])
def test_function_call_parser_tool_choice(registered, tool_choice):
    text = "Checking.\n" + WEATHER + "\nDone."
    parser = FunctionCallParser(TOOLS, "step3p5", tool_choice=tool_choice)
    assert parser.has_tool_call(text)
    normal, calls = parser.parse_non_stream(text)
    assert normal == "Checking.\n\nDone."
    assert [(c.name, json.loads(c.parameters)) for c in calls] == [("get_weather", WEATHER_ARGS)]

    parser = FunctionCallParser(TOOLS, "step3p5", tool_choice=tool_choice)
    streamed_text, items = "", []
    for i in range(0, len(text), 7):
        chunk_text, chunk_calls = parser.parse_stream_chunk(text[i : i + 7])
        streamed_text += chunk_text
        items += chunk_calls
    end_text, end_calls = parser.parse_stream_end()
    assert streamed_text + end_text == normal
    assert "".join(c.parameters for c in items + end_calls) == calls[0].parameters

    if tool_choice != "auto":
        # Forced choice constrains generation to this very XML (not raw JSON, vllm #51804).
        kind, tag = parser.get_structure_constraint(tool_choice)
        assert kind == "structural_tag"
        dumped = tag.model_dump_json()
        assert "<tool_call>\\n<function=get_weather>\\n" in dumped and "qwen_xml" in dumped
        if isinstance(tool_choice, ToolChoice):
            assert "function=search" not in dumped


def test_legacy_structure_info_round_trips():
    info = Step35ToolCallDetector().structure_info()("get_weather")
    text = info.begin + json.dumps(WEATHER_ARGS) + info.end
    assert text.startswith(info.trigger)
    assert parse(text) == ("", [("get_weather", WEATHER_ARGS)])


def test_properties_declared_in_union_branches():
    """A schema whose properties live only in anyOf/oneOf/allOf branches (a discriminated union)
    types its arguments like the built-in Qwen3-Coder parser (SGLang's get_schema_properties);
    a name in two branches takes the first branch's schema."""
    tool = Tool(function=Function(name="f", parameters={"type": "object", "anyOf": [
        {"properties": {"kind": {"const": "a"}, "n": {"type": "integer"}}},
        {"properties": {"kind": {"const": "b"}, "n": {"type": "string"}, "flag": {"type": "boolean"}}},
    ]}))
    body = "<parameter=kind>\na\n</parameter>\n<parameter=n>\n7\n</parameter>\n<parameter=flag>\ntrue\n</parameter>\n"
    assert parse(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>", [tool])[1] == [
        ("f", {"kind": "a", "n": 7, "flag": True})
    ]

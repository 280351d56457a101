"""Our step3p5 parsers against SGLang 0.5.23's built-in ones, on the corpus.

0.5.23 maps ``step3p5`` to DeepSeekR1Detector (reasoning) and Qwen3CoderDetector (tool
calls); they are imported from their own modules so that a registration elsewhere
cannot swap them. Where both should agree, equality is asserted. Every category of
difference is listed in DIFFERENCES with the reason ours is right, and the test asserts
our behaviour (the ground truth) and the built-in's observed behaviour for it.
"""

import json
from collections import defaultdict

import pytest

from parser_corpus import TYPE_ALIASES, build_corpus, tool_non_stream, tool_stream
from sglang.srt.entrypoints.openai.protocol import Function, Tool
from sglang.srt.function_call.qwen3_coder_detector import Qwen3CoderDetector
from sglang.srt.parser.reasoning_parser import DeepSeekR1Detector
from sglang_step35.parsers import Step35ReasoningDetector, Step35ToolCallDetector

CORPUS = build_corpus(seed=3)

DIFFERENCES = {
    "think_newlines": "the built-in keeps the newline before and after </think>; the model "
    "emits them as format, so reasoning ends in and content starts with a stray newline",
    "missing_think_close": "sglang #38892: without </think> the built-in puts the tool call "
    "into reasoning_content and the call is never made",
    "nan_number": "the built-in turns 'NaN' for a number into a bare NaN token, which is not "
    "JSON; ours keeps the text as a string",
    "text_after_call": "the built-in's non-stream mode drops text after the first call while "
    "its stream mode keeps it; ours keeps it in both",
    "unknown_function": "the built-in returns a call to an undeclared function; ours keeps "
    "the block as content so nothing is executed and nothing is lost",
    "malformed_bash_style": "sglang #38893: '<function bash>' yields no call in the built-in's "
    "non-stream mode; ours recovers it",
    "truncated_call": "for a call cut off by max_tokens the built-in's non-stream mode returns "
    "arguments closed into valid JSON, a call a client would execute, and its stream mode loses "
    "the cut-off parameter; ours returns the arguments exactly as generated, unclosed, in both",
    "duplicate_param": "the built-in keeps the last value in non-stream mode and streams both "
    "keys (invalid JSON object for most clients); ours keeps the first in both",
    "empty_block": "the built-in silently deletes an empty <tool_call></tool_call>; ours "
    "keeps it as content",
    "whitespace_between_calls": "the built-in streams the newlines between blocks as content "
    "(non-stream does not); ours drops them in both",
    "alias_bool_fallback": "a value that is neither true nor false under 'bool' becomes false "
    "in the built-in, the opposite of a 'yes'; ours keeps the text for the client to reject",
    "alias_container_kind": "the built-in accepts any JSON under 'dict'/'list' ('[1]' for a "
    "dict); ours keeps text that is not the declared kind, as for 'object'/'array'",
    "alias_unknown_name": "the built-in runs literal_eval on any type name it does not know "
    "('date': '2024' -> 2024, '1.10' -> 1.1); ours keeps such values as text",
    "missing_closers": "missing </parameter>, </function> or </tool_call>: the built-in's "
    "streaming result differs from its own non-stream result on some of these (invalid "
    "JSON, lost calls); ours gives the ground truth in both",
}


def _loads(args):
    """Arguments as an object; the raw string when the built-in produced invalid JSON."""
    try:
        return json.loads(args, parse_constant=lambda c: c)
    except ValueError:
        return args


def _objects(result):
    return result[0], [(name, _loads(args)) for name, args in result[1]]


def _builtin_stream(content):
    try:
        return _objects(tool_stream(Qwen3CoderDetector(), list(content)))
    except AssertionError as e:  # e.g. arguments for a call whose name never came
        return "broken stream: " + str(e), []


def _run(case):
    ours = Step35ReasoningDetector().detect_and_parse(case.text)
    builtin = DeepSeekR1Detector().detect_and_parse(case.text)
    content = ours.normal_text  # both tool parsers get the same input
    return {
        "ours_reasoning": (ours.reasoning_text, ours.normal_text),
        "builtin_reasoning": (builtin.reasoning_text, builtin.normal_text),
        "ours": _objects(tool_non_stream(Step35ToolCallDetector(), content)),
        "ours_stream": _objects(tool_stream(Step35ToolCallDetector(), list(content))),
        "builtin_raw": tool_non_stream(Qwen3CoderDetector(), content),
        "builtin": _objects(tool_non_stream(Qwen3CoderDetector(), content)),
        "builtin_stream": _builtin_stream(content),
        "content": content,
    }


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.category)
def test_reasoning_against_builtin(case):
    r = _run(case)
    ours_r, ours_c = r["ours_reasoning"]
    b_r, b_c = r["builtin_reasoning"]
    assert ours_r == case.reasoning
    if case.diff == "missing_think_close":
        assert (b_r, b_c) == (ours_r + ours_c, "")
    elif "</think>" in case.text:  # DIFFERENCES["think_newlines"]
        assert b_r.endswith("\n") and b_c.startswith("\n")
        assert (b_r[:-1], b_c[1:]) == (ours_r, ours_c)
    else:
        assert (b_r, b_c) == (ours_r, ours_c)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.category)
def test_tool_calls_against_builtin(case):
    r = _run(case)
    truth = (case.content, case.calls)
    assert r["ours"] == truth and r["ours_stream"] == truth
    if "\nNaN\n" in r["content"] and r["builtin_raw"][1]:  # DIFFERENCES["nan_number"]
        raw = [args for _, args in r["builtin_raw"][1] if ": NaN" in args]
        assert raw and all('"NaN"' not in args for args in raw)
        assert [c for c in truth[1] if "NaN" in c[1].values()]
        return
    b, bs = r["builtin"], r["builtin_stream"]
    if case.diff in (None, "missing_think_close"):
        assert b == truth
        assert bs[1] == truth[1]
        assert bs[0].strip() == truth[0].strip()  # DIFFERENCES["whitespace_between_calls"]
    elif case.diff == "text_after_call":
        assert b[1] == bs[1] == truth[1]
        assert b[0] == "Checking.\n" and bs[0] == truth[0]
    elif case.diff == "unknown_function":
        assert [name for name, _ in b[1]] == ["delete_everything"] and truth[1] == []
    elif case.diff == "malformed_bash_style":
        assert b == ("OK.\n", []) and len(truth[1]) == 1
    elif case.diff == "truncated_call":
        (name, args), = truth[1]
        assert b == (truth[0], [(name, json.loads(args + '"}'))])
        assert bs[1] != truth[1]
    elif case.diff == "duplicate_param":
        assert b[1] == [("get_weather", {"location": "Rome"})]
        assert truth[1] == [("get_weather", {"location": "Paris"})]
    elif case.diff == "empty_block":
        assert "<tool_call>" not in b[0] and truth[0].startswith("<tool_call>\n</tool_call>")
    else:
        assert case.diff.startswith("malformed_no_")  # DIFFERENCES["missing_closers"]


def test_missing_closers_do_differ_in_builtin_stream():
    disagreements = defaultdict(int)
    for case in CORPUS:
        if case.diff and case.diff.startswith("malformed_no_") and "\nNaN\n" not in case.text:
            r = _run(case)
            disagreements[case.diff] += r["builtin_stream"] != (case.content, case.calls)
    assert disagreements["malformed_no_function_close"] > 0


def test_every_category_is_exercised():
    diffs = {case.diff for case in CORPUS}
    assert {"missing_think_close", "text_after_call", "unknown_function", "malformed_bash_style",
            "truncated_call", "duplicate_param", "empty_block"} <= diffs
    assert any("\nNaN\n" in case.text for case in CORPUS)
    assert len(CORPUS) >= 200


ALIAS_DIFFERENCES = {("bool", "yes"): "alias_bool_fallback", ("dict", "[1]"): "alias_container_kind",
                     ("date", "2024"): "alias_unknown_name", ("any", "12"): "alias_unknown_name"}


@pytest.mark.parametrize("declared, raw, value", TYPE_ALIASES)
def test_type_aliases_against_builtin(declared, raw, value):
    """The one test of the alias table: ours gives the value with its JSON type in both modes
    (arguments string exact, streamed char by char), the built-in agrees except where listed."""
    tool = Tool(function=Function(name="f", parameters={"type": "object", "properties": {"v": {"type": declared}}}))
    text = f"<tool_call>\n<function=f>\n<parameter=v>\n{raw}\n</parameter>\n</function>\n</tool_call>"
    expected = ("", [("f", json.dumps({"v": value}, ensure_ascii=False))])
    assert tool_non_stream(Step35ToolCallDetector(), text, [tool]) == expected
    assert tool_stream(Step35ToolCallDetector(), list(text), [tool]) == expected
    ours = json.loads(expected[1][0][1])["v"]
    builtin = json.loads(tool_non_stream(Qwen3CoderDetector(), text, [tool])[1][0][1])["v"]
    if (declared, raw) in ALIAS_DIFFERENCES:
        assert ALIAS_DIFFERENCES[(declared, raw)] in DIFFERENCES
        assert builtin != ours and isinstance(ours, str)
    else:
        assert (builtin, type(builtin)) == (ours, type(ours))

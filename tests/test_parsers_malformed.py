"""Malformed tool-call tags that Step-3.5 writes in real use (sglang #38893), recovered for
declared tools and kept as text for anything else:

* the name glued to the tag, ``<functionbash>``;
* a tag whose ``>`` is missing before the newline, ``<function=bash\\n<parameter=command\\npwd</parameter>``;
* the parameter prefix written twice, ``<parameter=parameter=command\\npwd</parameter>``.

Every shape is checked non-stream, whole, char by char and at every 2-chunk split, directly and
through SGLang's ``FunctionCallParser`` (what serving_chat calls); the property at the end is one
of ``make fuzz``'s.
"""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parser_corpus import SOUP_MARKERS, assert_soup_parse_loses_nothing, tool_non_stream, tool_stream
from sglang.srt.entrypoints.openai.protocol import Function, Tool
from sglang_step35.parsers import Step35ToolCallDetector
from test_parsers_public_api import registered, tool_modes  # noqa: F401  (fixture)

HYP = settings(
    max_examples=int(os.environ.get("SGLANG_STEP35_PARSER_CASES", "150")),
    deadline=None,
    database=None if "SGLANG_STEP35_PARSER_CASES" in os.environ else settings.default.database,
    suppress_health_check=list(HealthCheck),
)


def _tool(name, properties):
    return Tool(function=Function(name=name, parameters={"type": "object", "properties": properties}))


TOOLS = [
    _tool("bash", {"command": {"type": "string"}, "timeout": {"type": "integer"}}),
    # A declared name that is a prefix of another: the glued form takes the exact name.
    _tool("get", {"key": {"type": "string"}}),
    _tool("get_weather", {"location": {"type": "string"}}),
]

CANONICAL = "<tool_call>\n<function=bash>\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>"
PWD = [("bash", {"command": "pwd"})]

# (model output, the call it must give)
SHAPES = {
    "glued_name": ("<tool_call>\n<functionbash>\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>",
                   PWD),
    "glued_name_prefix_of_another": (
        "<tool_call>\n<functionget_weather>\n<parameter=location>\nOslo\n</parameter>\n</function>\n</tool_call>",
        [("get_weather", {"location": "Oslo"})]),
    "glued_name_short": ("<tool_call>\n<functionget>\n<parameter=key>\nk\n</parameter>\n</function>\n</tool_call>",
                         [("get", {"key": "k"})]),
    "missing_gt": ("<tool_call>\n<function=bash\n<parameter=command\npwd</parameter>\n</function>\n</tool_call>", PWD),
    "missing_gt_function_only": (
        "<tool_call>\n<function=bash\n<parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>", PWD),
    "missing_gt_value_newlines": (
        "<tool_call>\n<function=bash\n<parameter=command\nls\n-la\n</parameter>\n</function>\n</tool_call>",
        [("bash", {"command": "ls\n-la"})]),
    "missing_gt_typed": ("<tool_call>\n<function bash\n<parameter=timeout\n30</parameter>\n</function>\n</tool_call>",
                         [("bash", {"timeout": 30})]),
    "doubled_prefix": (
        "<tool_call>\n<function=bash>\n<parameter=parameter=command\npwd</parameter>\n</function>\n</tool_call>", PWD),
    "doubled_prefix_with_gt": (
        "<tool_call>\n<function=bash>\n<parameter=parameter=command>\npwd\n</parameter>\n</function>\n</tool_call>",
        PWD),
    "doubled_prefix_twice_and_second_param": (
        "<tool_call>\n<function=bash>\n<parameter=parameter=parameter=command>\npwd\n</parameter>\n"
        "<parameter=parameter=timeout\n5</parameter>\n</function>\n</tool_call>",
        [("bash", {"command": "pwd", "timeout": 5})]),
    "all_three_no_wrapper": ("<functionbash\n<parameter=parameter=command\npwd</parameter>\n</function>", PWD),
}


def every_way(text, tools=TOOLS):
    """The non-stream result, after checking that whole, char-by-char and every 2-chunk
    stream give exactly it."""
    expected = tool_non_stream(Step35ToolCallDetector(), text, tools)
    assert tool_stream(Step35ToolCallDetector(), [text], tools) == expected
    assert tool_stream(Step35ToolCallDetector(), list(text), tools) == expected
    for i in range(len(text) + 1):
        assert tool_stream(Step35ToolCallDetector(), [text[:i], text[i:]], tools) == expected, i
    return expected


def objects(calls):
    return [(name, json.loads(args)) for name, args in calls]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_malformed_call_of_a_declared_tool_is_recovered(shape):
    text, calls = SHAPES[shape]
    content, got = every_way("Running it.\n" + text + "\nDone.")
    assert (content, objects(got)) == ("Running it.\n\nDone.", calls)
    # The same arguments string as the well-formed call would give.
    if calls == PWD:
        assert got == tool_non_stream(Step35ToolCallDetector(), CANONICAL, TOOLS)[1]


@pytest.mark.parametrize("shape", list(SHAPES))
def test_malformed_call_through_sglang_function_call_parser(shape):
    text, calls = SHAPES[shape]
    non, stream = tool_modes("Running it.\n" + text, TOOLS)
    assert non == stream
    assert (non[0], objects(non[1])) == ("Running it.\n", calls)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_same_shapes_with_an_undeclared_name_stay_text(shape):
    text, _ = SHAPES[shape]
    for declared in ("bash", "get_weather", "get"):
        text = text.replace(declared, "rm_rf")
    content, calls = every_way("Running it.\n" + text + "\nDone.")
    assert (content, calls) == ("Running it.\n" + text + "\nDone.", [])


@pytest.mark.parametrize("text", [
    # Undeclared parameter names: a missing ">" or a doubled prefix is not recovered.
    "<tool_call>\n<function=bash>\n<parameter=cmd\npwd</parameter>\n</function>\n</tool_call>",
    "<tool_call>\n<function=bash>\n<parameter=parameter=cmd\npwd</parameter>\n</function>\n</tool_call>",
])
def test_undeclared_parameter_shapes_stay_text(text):
    content, calls = every_way(text)
    assert calls == [("bash", "{}")]
    assert content == text[text.index("<parameter"):text.index("\n</function>")]


def test_glued_prose_and_near_names_stay_text():
    for text in ("A <functional> unit and <functionbashful> x", "<functionba", "see <functionbash",
                 "<tool_call>\n<functionrm>\n</function>\n</tool_call>", "<functionbash <b>"):
        assert every_way(text) == (text, []), text


def test_whitespace_before_glued_prose_after_a_block_stays_content():
    # "<function" opens a tag only as "<function=", "<function " or a declared name glued to it:
    # the newline between a block and "<functional" prose is content, as before this recovery.
    block = SHAPES["glued_name"][0]
    assert every_way(block + "\n<functional prose") == ("\n<functional prose", [("bash", '{"command": "pwd"}')])
    assert every_way(block + "\n" + block)[0] == ""  # between two blocks it is format


def test_forwarded_unknown_tools_stay_chunking_invariant(monkeypatch):
    # SGLANG_FORWARD_UNKNOWN_TOOLS with no tools declared: a chunk ending at "<function" after a
    # block must not decide whether the whitespace before it is format.
    from sglang_step35.parsers import tool_call

    monkeypatch.setattr(tool_call, "_forward_unknown_tools", lambda: True)
    text = "<function=g>\n<parameter=a>\n1\n</parameter>\n</function>\n</tool_call>\n<function=h>\n</function>"
    assert every_way(text, tools=[]) == ("", [("g", '{"a": "1"}'), ("h", "{}")])


def test_tag_like_text_inside_values_stays_verbatim():
    value = "grep '<functionbash>' log && echo '<function=bash' &&\n<functionget_weather>"
    text = f"<tool_call>\n<function=bash\n<parameter=command\n{value}\n</parameter>\n</function>\n</tool_call>"
    assert every_way(text) == ("", [("bash", json.dumps({"command": value}))])


def test_cut_off_inside_a_recovered_call_keeps_the_arguments_as_generated():
    text = "<tool_call>\n<functionbash>\n<parameter=parameter=command\npw"
    assert every_way(text) == ("", [("bash", '{"command": "pw')])
    # Cut inside the glued name: no call yet, the text is content.
    assert every_way("<tool_call>\n<functionbas") == ("<tool_call>\n<functionbas", [])


# -- make fuzz: the new shapes mixed into tag soup ---------------------------------------

# Parameters p0, p2, ... are declared; odd ones are not. Names never repeat (the first of a
# repeated parameter wins: the one documented place where a value is dropped).
SOUP_TOOL = [_tool("f", {f"p{i}": {"type": "string"} for i in range(0, 100, 2)})]
FRAGMENTS = ["<tool_call>", "</tool_call>", "<function=f>", "<functionf>", "<function=f\n", "<function f\n",
             "<functionf\n", "<functiong>", "<function=g\n", "<function", "</function>", "<parameter=",
             "<parameter=parameter=", "</parameter>", "\n", "<", ">", " ", "{", "}", '"', "=", *SOUP_MARKERS]


@st.composite
def malformed_soup(draw):
    parts = draw(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
    counter = iter(range(100))
    out = []
    for part in parts:
        if part.startswith("<parameter="):
            part += f"p{next(counter)}" + draw(st.sampled_from([">", "\n"]))
        out.append(part)
    return "".join(out)


@HYP
@given(text=malformed_soup(), cuts=st.lists(st.integers(0, 300), max_size=12))
def test_malformed_soup_never_raises_loses_nothing_and_is_chunking_invariant(text, cuts):
    assert_soup_parse_loses_nothing(text, cuts, SOUP_TOOL)


def test_sglang_builtin_loses_these_calls():
    """What SGLang 0.5.23's built-in step3p5 mapping (Qwen3CoderDetector) makes of the three
    shapes (docs/parsers.md, conventions table): the call or its arguments are lost."""
    from sglang.srt.function_call.qwen3_coder_detector import Qwen3CoderDetector

    def builtin(shape):
        return tool_non_stream(Qwen3CoderDetector(), SHAPES[shape][0], TOOLS)

    assert builtin("glued_name") == ("", [])  # no call, and the text is gone too
    assert builtin("missing_gt") == ("", [("bash\n<parameter=command\npwd</parameter", "{}")])
    assert builtin("doubled_prefix") == ("", [("bash", "{}")])

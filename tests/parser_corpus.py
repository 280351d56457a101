"""Realistic Step-3.5 outputs with their ground truth, plus stream-driving helpers.

Each case is built from parts (reasoning, prose, calls with typed values), and the
expected reasoning/content/calls are derived from those parts by the documented rules
(docs/parsers.md), never by running a parser.
"""

import json
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from sglang.srt.entrypoints.openai.protocol import Function, Tool

TOOLS = [
    Tool(function=Function(name="get_weather", parameters={
        "type": "object",
        "properties": {
            "location": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["location"],
    })),
    Tool(function=Function(name="search", parameters={
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "limit": {"type": "integer"},
            "filters": {"type": "object"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "exact": {"type": "boolean"},
        },
    })),
    Tool(function=Function(name="calc", parameters={
        "type": "object",
        "properties": {
            "x": {"type": "number"},
            "y": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "note": {"type": ["string", "null"]},
        },
    })),
    Tool(function=Function(name="write_file", parameters={
        "type": "object",
        "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
    })),
]
TOOL_NAMES = [t.function.name for t in TOOLS]

# Type names outside JSON Schema, as hand-written tools declare them: the names SGLang's
# and vLLM's Qwen3-Coder parsers convert, in any case; values that do not convert stay
# text (bool included: the peers turn "yes" into false, we keep "yes").
TYPE_ALIASES = [
    ("float", "3.14", 3.14), ("FLOAT", "2", 2), ("float64", "0.5", 0.5), ("double", "3.14", 3.14),
    ("Double", "-1e3", -1000.0), ("number", "3.14", 3.14), ("Numeric", "7", 7), ("num", "1.5", 1.5),
    ("int", "42", 42), ("Integer", " 42 ", 42), ("INT64", "-7", -7), ("uint8", "255", 255), ("long", "9", 9),
    ("short", "1", 1), ("unsigned", "3", 3),
    ("bool", "true", True), ("BOOL", "False", False), ("binary", "true", True), ("Boolean", "TRUE", True),
    ("dict", '{"a": 1}', {"a": 1}), ("Dict", "{'a': 1}", {"a": 1}), ("dict[str, int]", '{"a": 1}', {"a": 1}),
    ("Object", '{"a": [1]}', {"a": [1]}),
    ("list", "[1, 2]", [1, 2]), ("List", "['x']", ["x"]), ("list[str]", '["x"]', ["x"]), ("ARRAY", "[1]", [1]),
    ("arr", "[1]", [1]),
    ("str", "42", "42"), ("String", "42", "42"), ("text", "true", "true"), ("varchar", "1", "1"),
    ("char", "x", "x"), ("enum", "1", "1"),
    # Fallbacks: the text, as for JSON Schema's own names.
    ("float", "abc", "abc"), ("double", "nan", "nan"), ("int", "4.5", "4.5"), ("int", "ten", "ten"),
    ("dict", "[1]", "[1]"), ("list", "not json", "not json"), ("bool", "yes", "yes"),
    # Names neither peer converts by name stay text.
    ("date", "2024", "2024"), ("any", "12", "12"),
]

SENTENCES = [
    "The user wants the weather in Beijing.",
    "Let me think about which tool fits best.",
    "I should compare 3 < 5 and 7 > 2 before answering.",
    "用户想知道北京的天气。",
    "Привет! Посмотрим, что можно сделать.",
    "مرحبا، سأبحث عن ذلك.",
    "Emoji check 🌦️ and 👍🏽 should survive.",
    "Code: `if a<b and b>c: return {\"k\": [1, 2]}`",
    "Mentioning the word think or tool_call in prose is fine.",
    "Tabs\tand  double  spaces stay.",
    "A line ending in a backslash \\",
]


@dataclass
class Call:
    name: str
    params: List[Tuple[str, str, Any]]  # (key, raw text as the model writes it, expected JSON value)
    style: str = "canonical"


@dataclass
class Case:
    category: str
    text: str
    reasoning: str
    content: str
    # Arguments as an object; as the exact string for a call cut off by the end of output.
    calls: List[Tuple[str, Any]] = field(default_factory=list)
    # The differential test groups its expectations by this tag.
    diff: Optional[str] = None


def render_call(call: Call) -> str:
    """The block the model writes; ``style`` injects one known malformation."""
    opener = f"<function {call.name}>" if call.style == "bash_style" else f"<function={call.name}>"
    out = f"<tool_call>\n{opener}\n"
    for key, raw, _ in call.params:
        closer = "" if call.style == "no_param_close" else "\n</parameter>"
        out += f"<parameter={key}>\n{raw}{closer}\n"
    if call.style != "no_function_close":
        out += "</function>\n"
    if call.style != "no_tool_call_close":
        out += "</tool_call>"
    return out


def expected_args(call: Call) -> Dict[str, Any]:
    args: Dict[str, Any] = {}
    for key, _, value in call.params:
        args.setdefault(key, value)
    return args


def _sentence(rng: random.Random, n: int = 2) -> str:
    return " ".join(rng.choice(SENTENCES) for _ in range(n))


def _string_value(rng: random.Random) -> str:
    return rng.choice([
        "Beijing", "São Paulo", "東京", "New York, NY", "line one\nline two",
        "  padded  ", "quote \" and backslash \\", "<b>bold</b> & <i>x</i>", "",
        "\nleading newline kept once", "def f(x):\n    return x < 3\n",
    ])


def _random_call(rng: random.Random) -> Call:
    name = rng.choice(TOOL_NAMES)
    if name == "get_weather":
        location = _string_value(rng)
        params = [("location", location, location)]
        if rng.random() < 0.7:
            days = rng.randint(-3, 30)
            params.append(("days", str(days), days))
        if rng.random() < 0.3:
            params.append(("unit", "c", "c"))
    elif name == "search":
        q = _string_value(rng)
        params = [("query", q, q)]
        options = [
            ("limit", "10", 10),
            ("limit", "ten", "ten"),  # does not convert -> stays a string
            ("filters", '{"lang": "zh", "year": 2024}', {"lang": "zh", "year": 2024}),
            ("filters", "{'lang': 'en'}", {"lang": "en"}),  # Python literal, still an object
            ("tags", '["a", "b"]', ["a", "b"]),
            ("exact", "true", True),
            ("exact", "False", False),
        ]
        chosen = {}
        for opt in rng.sample(options, rng.randint(0, 3)):
            chosen.setdefault(opt[0], opt)
        params += list(chosen.values())
    elif name == "calc":
        params = [rng.choice([("x", "3.5", 3.5), ("x", "42", 42), ("x", "-1e3", -1000.0), ("x", "NaN", "NaN")])]
        params.append(rng.choice([("y", "null", None), ("y", "2", 2), ("y", "two", "two")]))
        if rng.random() < 0.5:
            params.append(rng.choice([("note", "null", None), ("note", "fine", "fine")]))
    else:
        content = _string_value(rng)
        params = [("path", "/tmp/a.py", "/tmp/a.py"), ("content", content, content)]
    return Call(name=name, params=params)


def _answer(rng: random.Random, pieces: List[Any]) -> Tuple[str, str, List[Tuple[str, Dict[str, Any]]]]:
    """Render prose/call pieces; expected content drops whitespace-only text after a call."""
    text, content, calls = [], [], []
    after_call = False
    for piece in pieces:
        if isinstance(piece, Call):
            text.append(render_call(piece))
            calls.append((piece.name, expected_args(piece)))
            after_call = True
        else:
            text.append(piece)
            if not (after_call and piece.strip() == ""):
                content.append(piece)
                after_call = False
    return "".join(text), "".join(content), calls


def _think(rng: random.Random, reasoning: str) -> Tuple[str, str]:
    """(text of the reasoning part up to and including </think> + one newline, reasoning)."""
    opener = rng.choice(["", "<think>", "<think>"])
    return f"{opener}{reasoning}\n</think>\n", reasoning


def build_corpus(seed: int = 0, per_category: int = 20) -> List[Case]:
    rng = random.Random(seed)
    cases: List[Case] = []

    def add(category, reasoning_part, reasoning, pieces, diff=None):
        text, content, calls = _answer(rng, pieces)
        cases.append(Case(category, reasoning_part + text, reasoning, content, calls, diff))

    for _ in range(per_category):
        r = _sentence(rng, rng.randint(1, 4))
        head, reasoning = _think(rng, r)
        add("reasoning_answer", head, reasoning, ["\n" * rng.randint(0, 2) + _sentence(rng)])
    for _ in range(per_category):
        r = _sentence(rng, 2)
        # Only the newline right before </think> is format; the others are the model's.
        head = f"<think>\n{r}\n\n</think>\n"
        add("newlines_around_think", head, f"\n{r}\n", ["\n\n" + _sentence(rng)])
    for _ in range(per_category // 2):
        r = _sentence(rng, 3)
        cases.append(Case("reasoning_truncated", f"<think>{r}", r, ""))
    for _ in range(per_category):
        head, reasoning = _think(rng, _sentence(rng))
        add("single_call", head, reasoning, [rng.choice(["", "Let me check.\n\n"]), _random_call(rng)])
    for _ in range(per_category):
        head, reasoning = _think(rng, _sentence(rng))
        calls = [_random_call(rng) for _ in range(rng.randint(2, 4))]
        pieces: List[Any] = []
        for call in calls:
            pieces += [call, "\n"]
        add("parallel_calls", head, reasoning, pieces[:-1] + [rng.choice(["", "\n"])])
    for _ in range(per_category):
        head, reasoning = _think(rng, _sentence(rng))
        add("text_after_call", head, reasoning,
            ["Checking.\n", _random_call(rng), "\n" + _sentence(rng)], diff="text_after_call")
    for _ in range(per_category):
        # The model forgot </think> (sglang #38892): the call still has to come out.
        r = _sentence(rng, 2) + "\n"
        add("missing_think_close", "<think>" + r, r, [_random_call(rng)], diff="missing_think_close")
    for _ in range(per_category // 2):
        head, reasoning = _think(rng, _sentence(rng))
        block = render_call(Call("delete_everything", [("path", "/", "/")]))
        text = head + "Sure.\n" + block + "\nDone."
        cases.append(Case("unknown_function", text, reasoning, "Sure.\n" + block + "\nDone.", [],
                          diff="unknown_function"))
    for style in ("bash_style", "no_param_close", "no_function_close", "no_tool_call_close"):
        for _ in range(per_category // 2):
            head, reasoning = _think(rng, _sentence(rng))
            call = _random_call(rng)
            call.style = style
            # A malformed block is last so its recovery cannot swallow later prose.
            add(f"malformed_{style}", head, reasoning, ["OK.\n", call], diff=f"malformed_{style}")
    for _ in range(per_category):
        head, reasoning = _think(rng, _sentence(rng))
        call = Call("write_file", [("path", "/tmp/x", "/tmp/x"), ("content", "", "")])
        value = _string_value(rng) + " tail"
        cut = rng.randint(1, len(value))
        truncated = render_call(call).split("<parameter=content>")[0] + "<parameter=content>\n" + value[:cut]
        partial = value[:cut][:-1] if value[:cut].endswith("\n") else value[:cut]
        # Cut off by max_tokens: the arguments as generated, unterminated string, no "}".
        args = json.dumps({"path": "/tmp/x", "content": partial}, ensure_ascii=False)[:-2]
        cases.append(Case("truncated_call", head + truncated, reasoning, "",
                          [("write_file", args)], diff="truncated_call"))
    for _ in range(per_category // 2):
        head, reasoning = _think(rng, _sentence(rng))
        dup = Call("get_weather", [("location", "Paris", "Paris"), ("location", "Rome", "Rome")])
        add("duplicate_param", head, reasoning, [dup], diff="duplicate_param")
    for _ in range(per_category // 2):
        head, reasoning = _think(rng, _sentence(rng))
        text = head + "<tool_call>\n</tool_call>\nNothing to call."
        cases.append(Case("empty_block", text, reasoning, "<tool_call>\n</tool_call>\nNothing to call.", [],
                          diff="empty_block"))
    return cases


# -- driving parsers -------------------------------------------------------------------


def split_at(text: str, cuts: List[int]) -> List[str]:
    """Chunks of ``text`` cut at ``cuts`` (any order, repeats give empty chunks)."""
    bounds = [0] + sorted(min(max(c, 0), len(text)) for c in cuts) + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def reasoning_stream(detector, chunks: List[str]) -> Tuple[str, str]:
    reasoning, content = [], []
    for chunk in chunks:
        r = detector.parse_streaming_increment(chunk)
        reasoning.append(r.reasoning_text)
        content.append(r.normal_text)
    end = detector.finish()
    return "".join(reasoning) + end.reasoning_text, "".join(content) + end.normal_text


def merge_call_items(items) -> List[Tuple[str, str]]:
    """Streamed ToolCallItems -> [(name, arguments)] in call order; asserts name-first."""
    calls: Dict[int, List[str]] = {}
    for item in items:
        if item.name:
            assert item.tool_index not in calls, "a call was opened twice"
            assert item.parameters == "", "the name comes alone, arguments follow"
            calls[item.tool_index] = [item.name, ""]
        else:
            assert item.tool_index in calls, "arguments before the call's name"
            calls[item.tool_index][1] += item.parameters
    assert sorted(calls) == list(range(len(calls))), "tool_index must count calls from 0"
    return [tuple(calls[i]) for i in sorted(calls)]


def tool_stream(detector, chunks: List[str], tools=TOOLS) -> Tuple[str, List[Tuple[str, str]]]:
    text, items = [], []
    for chunk in chunks:
        r = detector.parse_streaming_increment(chunk, tools)
        text.append(r.normal_text)
        items += r.calls
    end = detector.finish(tools)
    return "".join(text) + end.normal_text, merge_call_items(items + end.calls)


def tool_non_stream(detector, text: str, tools=TOOLS) -> Tuple[str, List[Tuple[str, str]]]:
    r = detector.detect_and_parse(text, tools)
    return r.normal_text, [(c.name, c.parameters) for c in r.calls]


def as_objects(calls: List[Tuple[str, str]]) -> List[Tuple[str, Any]]:
    """Arguments as objects; a call cut off by the end of output keeps its string."""
    out = []
    for name, args in calls:
        try:
            out.append((name, json.loads(args)))
        except ValueError:
            out.append((name, args))
    return out


# Characters a tag soup mixes into its text, which every parse must give back exactly once each.
SOUP_MARKERS = "Zß中😀"


def assert_soup_parse_loses_nothing(text: str, cuts: List[int], tools) -> None:
    """The invariants of a tool-call parse of any text (the tag-soup property tests): streaming at
    the `cuts` equals the one-shot parse, every call is the declared "f" with a JSON-object argument
    (only the last may be cut off by the end of output, as the start of an object), and every
    marker of the text comes back exactly once, in the content or in a call."""
    from sglang_step35.parsers import Step35ToolCallDetector

    content, calls = tool_non_stream(Step35ToolCallDetector(), text, tools)
    assert tool_stream(Step35ToolCallDetector(), split_at(text, cuts), tools) == (content, calls)
    out = content + "".join(name + args for name, args in calls)
    for i, (name, args) in enumerate(calls):
        assert name == "f"  # "g" is undeclared: never a call
        try:
            assert isinstance(json.loads(args), dict)
        except ValueError:
            assert i == len(calls) - 1 and (args == "" or args.startswith("{"))
    for marker in SOUP_MARKERS:
        assert out.count(marker) == text.count(marker), marker

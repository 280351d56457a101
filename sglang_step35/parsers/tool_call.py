"""Tool-call detector for Step-3.5's XML call blocks (``--tool-call-parser step3p5``).

One block per call, several blocks possible::

    <tool_call>
    <function=get_weather>
    <parameter=location>
    Beijing
    </parameter>
    </function>
    </tool_call>

A single incremental scanner (:class:`~sglang_step35.parsers.tool_scanner.CallScanner`, building
calls with :mod:`sglang_step35.parsers.tool_args`) drives both streaming and non-streaming
parsing, so the two agree for every chunking by construction; this module is the glue to SGLang's
``BaseFormatDetector`` (results, serving state, structural tags). Malformed-input rules:
docs/parsers.md.
"""

import logging
from typing import Dict, List, Optional

from sglang.srt.entrypoints.openai.protocol import Tool, ToolChoice
from sglang.srt.environ import envs
from sglang.srt.function_call.base_format_detector import BaseFormatDetector
from sglang.srt.function_call.core_types import (
    StreamingParseResult,
    StructureInfo,
    ToolCallItem,
    _GetInfoFunc,
)

from sglang_step35.parsers.tool_scanner import (  # noqa: F401  (the scanner and tags, importable from here as before)
    CALL_TRIGGERS,
    FUNC_CLOSE,
    FUNC_TAG,
    PARAM_CLOSE,
    TOOL_CLOSE,
    TOOL_OPEN,
    CallScanner,
)

logger = logging.getLogger(__name__)


def _calls_only(fmt):
    """tool_choice=required: one or more calls and nothing else.

    xgrammar's builtin tag for "required" lets free text follow the first call; with a
    reasoning parser SGLang also lifts that text's ban on think tags, so a model that
    rambles on after its call puts "</think>" and half-written markup into ``content``.
    A client that demanded a call gets calls, separated by newlines as the template
    writes them.
    """
    from xgrammar.structural_tag import SequenceFormat, TagsWithSeparatorFormat, TriggeredTagsFormat

    if isinstance(fmt, TriggeredTagsFormat) and fmt.at_least_one:
        return TagsWithSeparatorFormat(tags=fmt.tags, separator="\n", at_least_one=True,
                                       stop_after_first=fmt.stop_after_first)
    if isinstance(fmt, SequenceFormat):
        fmt.elements = [_calls_only(element) for element in fmt.elements]
    return fmt


def _forward_unknown_tools() -> bool:
    try:
        return bool(envs.SGLANG_FORWARD_UNKNOWN_TOOLS.get())
    except Exception:  # an SGLang without the switch: default behaviour
        return False


def events_to_result(events: List[tuple]) -> StreamingParseResult:
    """Scanner events -> SGLang's streaming result (name first, then argument deltas)."""
    text, calls = [], []
    for event in events:
        if event[0] == "text":
            text.append(event[1])
        elif event[0] == "name":
            calls.append(ToolCallItem(tool_index=event[1], name=event[2], parameters=""))
        elif calls and calls[-1].tool_index == event[1] and calls[-1].name is None:
            calls[-1].parameters += event[2]  # one delta per call per chunk is enough
        else:
            calls.append(ToolCallItem(tool_index=event[1], name=None, parameters=event[2]))
    return StreamingParseResult(normal_text="".join(text), calls=calls)


class Step35ToolCallDetector(BaseFormatDetector):
    """``--tool-call-parser step3p5``; ``tool_index`` is the call's ordinal in the output."""

    def __init__(self, constrained: bool = False):
        super().__init__()
        self.constrained = constrained
        self.bot_token = TOOL_OPEN
        self.eot_token = TOOL_CLOSE
        self.tool_call_separator = "\n"
        self._scanner: Optional[CallScanner] = None
        self._passthrough = False

    def has_tool_call(self, text: str) -> bool:
        return any(tag in text for tag in CALL_TRIGGERS)

    def detect_and_parse(self, text: str, tools: List[Tool]) -> StreamingParseResult:
        try:
            scanner = CallScanner(tools, _forward_unknown_tools(), self.constrained)
            events = scanner.feed(text, final=True)
        except Exception:  # the server must get an answer, never a 500
            logger.exception("step3p5 tool parser failed; returning text unparsed")
            return StreamingParseResult(normal_text=text)
        merged: Dict[int, ToolCallItem] = {}
        text_parts = []
        for event in events:
            if event[0] == "text":
                text_parts.append(event[1])
            elif event[0] == "name":
                merged[event[1]] = ToolCallItem(tool_index=event[1], name=event[2], parameters="")
            else:
                merged[event[1]].parameters += event[2]
        return StreamingParseResult(normal_text="".join(text_parts), calls=list(merged.values()))

    def _stream(self, text: str, tools: List[Tool], final: bool) -> StreamingParseResult:
        if self._passthrough:
            return StreamingParseResult(normal_text=text)
        if self._scanner is None:
            self._scanner = CallScanner(tools, _forward_unknown_tools(), self.constrained)
        try:
            result = events_to_result(self._scanner.feed(text, final))
        except Exception:
            logger.exception("step3p5 tool parser failed; passing the rest through as text")
            self._passthrough = True
            return StreamingParseResult(normal_text=self._scanner.pending)
        self._sync_serving_state()
        return result

    def _sync_serving_state(self) -> None:
        # serving_chat compares these at the end of a stream and sends whatever part of
        # json.dumps(arguments) it thinks is missing; keeping them equal sends nothing.
        calls = self._scanner.calls
        # A cut-off call's arguments are not a JSON object; as a string they are
        # compared verbatim, so the top-up still sends nothing.
        self.prev_tool_call_arr = [
            {"name": c.name, "arguments": c.streamed if c.cut_off else c.args} for c in calls
        ]
        self.streamed_args_for_tool = [c.streamed for c in calls]
        self.current_tool_id = len(calls) - 1 if calls else -1
        self.current_tool_name_sent = bool(calls) and not calls[-1].closed

    def parse_streaming_increment(self, new_text: str, tools: List[Tool]) -> StreamingParseResult:
        return self._stream(new_text, tools, final=False)

    def finish(self, tools: List[Tool]) -> StreamingParseResult:
        return self._stream("", tools, final=True)

    def supports_structural_tag(self) -> bool:
        return True

    def get_structural_tag_name(self) -> str:
        # xgrammar's "qwen_3_coder" tag emits exactly this XML (style="qwen_xml"), so
        # tool_choice=required/named constrains the model to the format parsed here.
        return "qwen_3_coder"

    def get_structural_tag(self, tools=None, tool_choice="auto", thinking_mode=False, parallel_tool_calls=True):
        tag = super().get_structural_tag(
            tools=tools, tool_choice=tool_choice, thinking_mode=thinking_mode,
            parallel_tool_calls=parallel_tool_calls,
        )
        if tag is not None and tool_choice == "required":
            tag.format = _calls_only(tag.format)
        return tag

    def get_required_tool_parser(self, tool_choice):
        # serving_chat parses required/named output with the detector this returns: one
        # that reads values as the grammar of get_structural_tag delimits them.
        if tool_choice == "required" or isinstance(tool_choice, ToolChoice):
            return Step35ToolCallDetector(constrained=True)
        return None

    def structure_info(self) -> _GetInfoFunc:
        # Legacy structural tags put a JSON object between begin and end; the scanner
        # accepts a JSON body inside <function=...> for exactly this case.
        return lambda name: StructureInfo(
            begin=f"{TOOL_OPEN}\n<function={name}>\n",
            end=f"\n{FUNC_CLOSE}\n{TOOL_CLOSE}",
            trigger=f"{TOOL_OPEN}\n<function=",
        )

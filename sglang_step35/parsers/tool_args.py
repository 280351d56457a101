"""What the step3p5 tool-call scanner builds: the calls of one output, their parameters and the
events that stream them to SGLang: ("text", str), ("name", i, str), ("args", i, str).

:class:`CallBuilder` turns "a call named N opens", "parameter K opens", "a piece of its value",
"it closes" into each call's JSON arguments, sent incrementally (a string value as it arrives, a
typed one whole, converted by its schema: :mod:`sglang_step35.parsers.param_types`). Where those
steps come from, the XML tags, is :mod:`sglang_step35.parsers.tool_scanner`.
"""

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from sglang.srt.entrypoints.openai.protocol import Tool

from sglang_step35.parsers.param_types import (
    convert_value,
    is_plain_string,
    schema_types,
    tool_properties,
)

# One logger for the whole step3p5 tool parser (its name from before the parser was split into modules).
logger = logging.getLogger("sglang_step35.parsers.tool_call")


def dumps(value: Any) -> str:
    # Same settings as the built-in detectors, so clients see the same JSON style.
    return json.dumps(value, ensure_ascii=False)


@dataclass
class _Call:
    name: str
    types_by_param: Dict[str, Any]
    args: Dict[str, Any] = field(default_factory=dict)
    streamed: str = ""
    object_open: bool = False  # "{" sent and "}" not yet
    # Anything but whitespace seen inside the function: a "{" after that is prose, not a
    # JSON body, however the chunks fall.
    body_started: bool = False
    closed: bool = False
    # The output ended inside this call (max_tokens): its arguments stay exactly what
    # was generated, unclosed, as OpenAI returns such a call with finish_reason=length.
    cut_off: bool = False


@dataclass
class _Param:
    key: str
    types: List[str]
    skip: bool  # a repeated name: the first value wins, JSON objects have unique keys
    raw: str = ""
    started: bool = False  # the one leading newline has been dealt with


class CallBuilder:
    """The calls of one output and the events of the current feed (see the module docstring)."""

    def __init__(self, tools: List[Tool]):
        self.tools = {t.function.name: t for t in tools or [] if t.function.name}
        self.calls: List[_Call] = []
        self.param: Optional[_Param] = None
        self.events: List[tuple] = []

    # -- emission -------------------------------------------------------------------

    def _text(self, text: str) -> None:
        if text:
            self.events.append(("text", text))

    def _args(self, text: str) -> None:
        call = self.calls[-1]
        call.streamed += text
        self.events.append(("args", len(self.calls) - 1, text))

    def _open_call(self, name: str) -> None:
        tool = self.tools.get(name)
        root = tool.function.parameters if tool and isinstance(tool.function.parameters, dict) else {}
        types = {key: schema_types(sub, root) for key, sub in tool_properties(tool).items()}
        self.calls.append(_Call(name=name, types_by_param=types))
        self.events.append(("name", len(self.calls) - 1, name))
        self.block_raw = ""

    def _close_call(self) -> None:
        call = self.calls[-1]
        if call.closed:
            return
        if not call.streamed:
            self._args("{}")
        elif call.object_open:
            self._args("}")
        call.object_open = False
        call.closed = True

    def _open_param(self, key: str) -> None:
        call = self.calls[-1]
        types = call.types_by_param.get(key, [])
        # A JSON body already completed the arguments; a repeated key cannot be a
        # second JSON member. Either way the first value wins.
        skip = key in call.args or (bool(call.streamed) and not call.object_open)
        self.param = _Param(key=key, types=types, skip=skip)
        if skip:
            logger.warning("step3p5 tool call repeats parameter %r; keeping the first value", key)
            return
        self._args(("{" if not call.object_open else ", ") + dumps(key) + ": ")
        call.object_open = True
        if is_plain_string(types):
            self._args('"')
            call.args[key] = ""
        else:
            call.args[key] = None  # placeholder keeps key order; the value comes at close

    def _value_piece(self, piece: str) -> None:
        param = self.param
        param.raw += piece
        if not param.skip and is_plain_string(param.types):
            self.calls[-1].args[param.key] = param.raw
            if piece:
                self._args(dumps(piece)[1:-1])

    def _close_param(self) -> None:
        param, self.param = self.param, None
        if param.skip:
            return
        if is_plain_string(param.types):
            self._args('"')
        else:
            value = convert_value(param.raw, param.types)
            self.calls[-1].args[param.key] = value
            self._args(dumps(value))

    def _cut_off_call(self) -> None:
        """End of output inside the open call: send what it has, close nothing."""
        param, self.param = self.param, None
        if param is not None and param.raw and not param.skip and not is_plain_string(param.types):
            # Typed values are only sent whole; a cut-off one is sent as far as it
            # got: its JSON if the text so far converts, else an unterminated string
            # (what the value would have become had the output ended there).
            value = convert_value(param.raw, param.types)
            self.calls[-1].args[param.key] = value
            self._args(dumps(value)[:-1] if isinstance(value, str) else dumps(value))
        self.calls[-1].cut_off = True

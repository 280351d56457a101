"""The step3p5 tool-call scanner: Step-3.5's XML call markup read incrementally.

A state machine over the tags (``<tool_call>``, ``<function=NAME>``, ``<parameter=KEY>``, their
closers, and a JSON object written instead of parameter tags); each state consumes what is
certain and holds back text that may still become a tag, so streaming and non-streaming parsing
agree for every chunking by construction. Malformed-input rules: docs/parsers.md. What the
recognised steps build (the calls and their JSON arguments) is
:class:`sglang_step35.parsers.tool_args.CallBuilder`, which this class extends.
"""

import json
from typing import List, Optional, Tuple

from sglang.srt.entrypoints.openai.protocol import Tool

from sglang_step35.parsers._text import find_first, partial_tag_len
from sglang_step35.parsers.tool_args import CallBuilder, dumps, logger

TOOL_OPEN = "<tool_call>"
TOOL_CLOSE = "</tool_call>"
FUNC_CLOSE = "</function>"
PARAM_CLOSE = "</parameter>"
# "<function=bash>", "<function bash>" and, for a declared name only, "<functionbash>"
# (sglang #38893): every function tag starts with this; what follows decides.
FUNC_TAG = "<function"
FUNC_SEPARATORS = ("=", " ")
PARAM_OPENERS = ("<parameter=", "<parameter ")
# "<parameter=parameter=command>": the model repeated the tag's own prefix (sglang #38893).
PARAM_PREFIX = "parameter="
# A name longer than this is prose that happens to follow "<function ", not a tag.
MAX_NAME_LEN = 256

# Scanner states.
_NORMAL = "normal"
_BLOCK = "block"  # after <tool_call>, before <function=
_FUNC_NAME = "func_name"
_IN_FUNC = "in_func"  # between parameters
_PARAM_NAME = "param_name"
_PARAM_VALUE = "param_value"
_JSON_BODY = "json_body"  # a JSON object written instead of <parameter> tags
_AFTER_FUNC = "after_func"  # after </function>, expecting </tool_call>

# Where a call can start in ordinary output (also what has_tool_call looks for).
CALL_TRIGGERS = (TOOL_OPEN, FUNC_TAG)
_VALUE_ENDS = (PARAM_CLOSE,) + PARAM_OPENERS + (FUNC_CLOSE, TOOL_CLOSE)
_VALUE_HOLDBACK = _VALUE_ENDS + tuple("\n" + tag for tag in _VALUE_ENDS)
# Under xgrammar's qwen_xml grammar a string value is any text without "</parameter>":
# "<parameter=", "</function>" or "</tool_call>" inside it are part of the value.
_GRAMMAR_VALUE_ENDS = (PARAM_CLOSE,)
_GRAMMAR_VALUE_HOLDBACK = (PARAM_CLOSE, "\n" + PARAM_CLOSE)
_IN_FUNC_TAGS = PARAM_OPENERS + (FUNC_CLOSE, TOOL_CLOSE, TOOL_OPEN)
_BODY_ENDS = (FUNC_CLOSE, TOOL_CLOSE)


def _is_partial(text: str, tags) -> bool:
    return any(tag.startswith(text) and tag != text for tag in tags)


def _opener_at(text: str, openers) -> Optional[str]:
    return next((tag for tag in openers if text.startswith(tag)), None)


def _name_end(text: str, start: int = 0) -> int:
    """Where a tag's name ends: its ">", a newline (the ">" is missing) or a "<" (not a tag)."""
    ends = [i for i in (text.find(c, start) for c in ">\n<") if i != -1]
    return min(ends) if ends else -1


def _undoubled(name: str, declared, prefix: Optional[str]) -> str:
    """``name`` with a repeated tag prefix removed, if that turns it into a declared name."""
    if prefix is None or name in declared:
        return name
    stripped = name
    while stripped.startswith(prefix):
        stripped = stripped[len(prefix):]
        if stripped in declared:
            return stripped
    return name


class CallScanner(CallBuilder):
    """Turns model text into events: ("text", str), ("name", i, str), ("args", i, str).

    ``feed(text, final=False)`` returns only what is certain; text that may still
    become a tag is held until the next feed or ``final=True``.
    """

    def __init__(self, tools: List[Tool], forward_unknown: bool = False, constrained: bool = False):
        super().__init__(tools)
        self.forward_unknown = forward_unknown
        # constrained: the output was generated under our structural tag, so values are
        # read the way its grammar delimits them, not by the malformed-input recovery.
        self.value_ends = _GRAMMAR_VALUE_ENDS if constrained else _VALUE_ENDS
        self.value_holdback = _GRAMMAR_VALUE_HOLDBACK if constrained else _VALUE_HOLDBACK
        self.state = _NORMAL
        self.pending = ""
        self.block_raw = ""  # consumed markup, returned as text if no call materialises
        self.after_block = False  # whitespace right after a block is format, not content

    def _open_call(self, name: str) -> None:
        super()._open_call(name)
        self.block_raw = ""  # the markup became a call

    def _cut_off_call(self) -> None:
        super()._cut_off_call()
        self.pending = ""
        self.state = _NORMAL

    # -- scanning -------------------------------------------------------------------

    def feed(self, text: str, final: bool = False) -> List[tuple]:
        self.pending += text
        self.events = []
        step = {
            _NORMAL: self._normal,
            _BLOCK: self._block,
            _FUNC_NAME: self._func_name,
            _IN_FUNC: self._in_func,
            _PARAM_NAME: self._param_name,
            _PARAM_VALUE: self._param_value,
            _JSON_BODY: self._json_body,
            _AFTER_FUNC: self._after_func,
        }
        # Each step either consumes input, changes state, or returns False to wait.
        while step[self.state](final):
            pass
        return self.events

    def _normal(self, final: bool) -> bool:
        buf = self.pending
        if self.after_block:
            rest = buf.lstrip()
            if not rest and not final:
                return False
            starts = self._starts_tag(rest, final) if rest else True
            if starts is None:
                return False
            if starts:
                buf = self.pending = rest  # whitespace between or after blocks is format
            self.after_block = False
        pos, tag = find_first(buf, CALL_TRIGGERS)
        if tag is None:
            keep = 0 if final else partial_tag_len(buf, CALL_TRIGGERS)
            self._text(buf[: len(buf) - keep])
            self.pending = buf[len(buf) - keep :]
            return False
        self._text(buf[:pos])
        self.pending = buf[pos + len(tag) :]
        self.block_raw = tag
        self.state = _BLOCK if tag == TOOL_OPEN else _FUNC_NAME
        return True

    def _starts_tag(self, rest: str, final: bool) -> Optional[bool]:
        """Whether ``rest`` starts with a tag (None: not known before more text comes).

        Prose like "<functional" is not one: the whitespace before it stays content.
        """
        if rest.startswith((TOOL_OPEN,) + tuple(FUNC_TAG + sep for sep in FUNC_SEPARATORS)):
            return True
        if rest.startswith(FUNC_TAG):
            tail = rest[len(FUNC_TAG):]
            if not tail:  # the next character may still be "=" or " "
                return False if final else None
            end = _name_end(tail)
            if end == -1:
                return None if not final and any(n.startswith(tail) for n in self.tools) else False
            return tail[end] in ">\n" and tail[:end] in self.tools
        return None if not final and _is_partial(rest, CALL_TRIGGERS) else False

    def _abandon_markup(self) -> bool:
        """The consumed markup is not a call after all: it goes back out as text."""
        self._text(self.block_raw)
        self.block_raw = ""
        self.state = _NORMAL
        return True

    def _block(self, final: bool) -> bool:
        rest = self.pending.lstrip()
        skipped = self.pending[: len(self.pending) - len(rest)]
        if rest.startswith(FUNC_TAG):
            self.block_raw += skipped + FUNC_TAG
            self.pending = rest[len(FUNC_TAG) :]
            self.state = _FUNC_NAME
            return True
        if not final and (not rest or _is_partial(rest, (FUNC_TAG, TOOL_CLOSE))):
            return False
        if rest.startswith(TOOL_CLOSE):
            # An empty block calls nothing; keep it visible rather than drop it.
            self.block_raw += skipped + TOOL_CLOSE
            self.pending = rest[len(TOOL_CLOSE) :]
        return self._abandon_markup()

    def _read_name(self, final: bool, declared, skip: int = 0, glued: bool = False,
                   prefix: Optional[str] = None) -> Tuple[str, str, bool]:
        """(status, name, ended_by_newline); status "ok" having consumed the tag's rest,
        else "wait", "bad" or "truncated". ``skip``: separator characters before the name.

        A name ends at ">". For a name in ``declared`` only (an undeclared one stays text,
        sglang #38893), also: at a newline when the ">" is missing (``<function=bash\n``),
        glued to the tag (``glued``: ``<functionbash>``, the name exactly), and written
        after the tag's own ``prefix`` again (``<parameter=parameter=command>``).
        """
        buf = self.pending
        end = _name_end(buf, skip)
        head = buf[skip:] if end == -1 else buf[skip:end]
        if glued:
            # Waiting is only worth it while the text can still become a declared name.
            if end == -1:
                if not final and any(n.startswith(head) for n in declared):
                    return "wait", "", False
                return "bad", "", False
            if buf[end] == "<" or head not in declared:
                return "bad", "", False
            name = head
        else:
            if len(head) > MAX_NAME_LEN:
                return "bad", "", False
            if end == -1:
                return ("truncated" if final else "wait"), "", False
            name = _undoubled(head.strip().strip("\"'").strip(), declared, prefix)
            if buf[end] == "<" or not name or (buf[end] == "\n" and name not in declared):
                return "bad", "", False
        self.block_raw += buf[: end + 1]
        self.pending = buf[end + 1 :]
        return "ok", name, buf[end] == "\n"

    def _func_name(self, final: bool) -> bool:
        buf = self.pending
        if not buf and not final:
            return False
        separated = buf[:1] in FUNC_SEPARATORS
        status, name, _ = self._read_name(final, self.tools, skip=int(separated), glued=not separated)
        if status == "wait":
            return False
        if status == "ok" and (name in self.tools or self.forward_unknown):
            self._open_call(name)
            self.state = _IN_FUNC
            return True
        if status == "ok":
            logger.warning("step3p5 model called undeclared tool %r; kept as text", name)
        return self._abandon_markup()

    def _in_func(self, final: bool) -> bool:
        rest = self.pending.lstrip()
        call = self.calls[-1]
        opener = _opener_at(rest, PARAM_OPENERS)
        if opener:
            self.pending = rest[len(opener) :]
            self.block_raw = opener
            self.state = _PARAM_NAME
            call.body_started = True
            return True
        if rest.startswith(FUNC_CLOSE):
            self.pending = rest[len(FUNC_CLOSE) :]
            self._close_call()
            self.state = _AFTER_FUNC
            return True
        if rest.startswith(TOOL_CLOSE) or rest.startswith(TOOL_OPEN):
            if rest.startswith(TOOL_CLOSE):
                rest = rest[len(TOOL_CLOSE) :]
                self.after_block = True
            self.pending = rest
            self._close_call()
            self.state = _NORMAL
            return True
        if not rest or _is_partial(rest, _IN_FUNC_TAGS):
            if final:
                self._cut_off_call()
            return False
        if rest.startswith("{") and not call.streamed and not call.body_started:
            self.pending = rest
            self.state = _JSON_BODY
            return True
        call.body_started = True
        # Stray prose inside a function: not part of any argument, so it is content,
        # with its leading whitespace (a chunk may have ended right before that space).
        # Its trailing whitespace stays pending: whether that is format (before a tag
        # or the end of output) or part of more prose is only known from what follows,
        # and a chunk boundary must not decide it (fuzz: '<function=f>\n}' + '\n').
        lead = len(self.pending) - len(rest)
        cut = rest.find("<", 1)
        cut = len(rest.rstrip()) if cut == -1 else len(rest[:cut].rstrip())
        self._text(self.pending[: lead + cut])
        self.pending = rest[cut:]
        return True

    def _param_name(self, final: bool) -> bool:
        declared = self.calls[-1].types_by_param
        status, name, ended_by_newline = self._read_name(final, declared, prefix=PARAM_PREFIX)
        if status == "wait":
            return False
        self.state = _IN_FUNC
        if status != "ok":
            # Not a parameter tag (or one cut off by the end of output): it is kept
            # as content so that no character of the output disappears.
            self._text(self.block_raw)
            return True
        self._open_param(name)
        # "<parameter=command\npwd": that newline stood for ">" and the value's leading
        # newline at once; the value starts right after it.
        self.param.started = ended_by_newline
        self.state = _PARAM_VALUE
        return True

    def _param_value(self, final: bool) -> bool:
        param = self.param
        buf = self.pending
        if not param.started:
            if not buf and not final:
                return False
            buf = self.pending = buf[1:] if buf.startswith("\n") else buf
            param.started = True
        pos, tag = find_first(buf, self.value_ends)
        if tag is None:
            keep = 0 if final else partial_tag_len(buf, self.value_holdback)
            piece = buf[: len(buf) - keep]
            self.pending = buf[len(buf) - keep :]
            if final:
                self._value_piece(piece[:-1] if piece.endswith("\n") else piece)
                self._cut_off_call()
            else:
                self._value_piece(piece)
            return False
        else:
            piece = buf[:pos]
            self.pending = buf[pos + len(tag) :] if tag == PARAM_CLOSE else buf[pos:]
        self._value_piece(piece[:-1] if piece.endswith("\n") else piece)
        self._close_param()
        self.state = _IN_FUNC
        return True

    def _json_body(self, final: bool) -> bool:
        buf = self.pending
        pos, _tag = find_first(buf, _BODY_ENDS)
        if pos == -1 and not final:
            return False
        body = buf if pos == -1 else buf[:pos]
        self.pending = "" if pos == -1 else buf[pos:]
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            self.calls[-1].args = parsed
            self._args(dumps(parsed))
        elif pos == -1:
            # Cut off while writing the object: those are its arguments so far.
            self._args(body)
            self._cut_off_call()
            return False
        else:
            self._text(body)
        self.state = _IN_FUNC
        return True

    def _after_func(self, final: bool) -> bool:
        rest = self.pending.lstrip()
        if rest.startswith(TOOL_CLOSE):
            self.pending = rest[len(TOOL_CLOSE) :]
            self.after_block = True
            self.state = _NORMAL
            return True
        if rest.startswith(FUNC_TAG):
            # Several functions in one block: each is its own call.
            self.pending = rest[len(FUNC_TAG) :]
            self.block_raw = FUNC_TAG
            self.state = _FUNC_NAME
            return True
        if not final and (not rest or _is_partial(rest, (FUNC_TAG, TOOL_CLOSE))):
            return False
        # </tool_call> is missing; what follows is ordinary output again.
        self.after_block = True
        self.state = _NORMAL
        return True

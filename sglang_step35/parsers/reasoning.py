"""Reasoning detector for Step-3.5: splits ``<think>...</think> answer`` output.

Step-3.5 always reasons, and its chat template may already have opened ``<think>`` in
the prompt, so everything before ``</think>`` is reasoning whether or not the output
repeats the opening tag. See docs/parsers.md for the exact rules.
"""

import logging
from typing import Tuple

from sglang.srt.parser.reasoning_parser import (
    BaseReasoningFormatDetector,
    StreamingParseResult,
)

from sglang_step35.parsers._text import find_first, partial_tag_len

logger = logging.getLogger(__name__)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_OPEN = "<tool_call>"

# Scanner states.
_PRE = "pre"  # reasoning has not produced a character yet: leading <think> tags (and whitespace before them) are dropped
_REASONING = "reasoning"
_AFTER_END = "after_end"  # just consumed </think>: one newline may still be dropped
_CONTENT = "content"

# Held back at a chunk end while reasoning: the next chunk may complete one of these.
_REASONING_HOLDBACK = ("\n" + THINK_CLOSE, THINK_CLOSE, TOOL_OPEN)


def initial_state(previous_content: str) -> str:
    """Where scanning starts, given the assistant prefix of a continued final message."""
    last_open = previous_content.rfind(THINK_OPEN)
    last_close = previous_content.rfind(THINK_CLOSE)
    if last_close != -1 and last_close > last_open:
        return _AFTER_END if previous_content.endswith(THINK_CLOSE) else _CONTENT
    if last_open != -1 and not previous_content.endswith(THINK_OPEN):
        return _REASONING
    return _PRE


class ThinkScanner:
    """Incremental splitter; non-streaming parsing is one ``feed(text, final=True)``.

    Driving both modes through the same scanner is what makes streaming and
    non-streaming results identical for every chunking.
    """

    def __init__(self, state: str = _PRE):
        self.state = state
        self.pending = ""

    @property
    def in_reasoning(self) -> bool:
        return self.state in (_PRE, _REASONING)

    def feed(self, text: str, final: bool) -> Tuple[str, str]:
        """Consume ``text``; return the (reasoning, content) that became certain."""
        self.pending += text
        reasoning, content = [], []
        while True:
            buf = self.pending
            if self.state == _PRE:
                # A prompt that did not open the block lets the model write the tag
                # itself, possibly after a newline or two: that whitespace is format.
                rest = buf.lstrip()
                if rest.startswith(THINK_OPEN):
                    self.pending = rest[len(THINK_OPEN) :]
                    continue
                if not final and THINK_OPEN.startswith(rest):
                    break  # only whitespace, or a partial <think>: wait for more
                self.state = _REASONING
            elif self.state == _REASONING:
                pos, tag = find_first(buf, (THINK_CLOSE, TOOL_OPEN))
                if tag == THINK_CLOSE:
                    text_before = buf[:pos]
                    if text_before.endswith("\n"):
                        text_before = text_before[:-1]
                    reasoning.append(text_before)
                    self.pending = buf[pos + len(THINK_CLOSE) :]
                    self.state = _AFTER_END
                elif tag == TOOL_OPEN:
                    # The model forgot </think> (sglang #38892): the call is the answer,
                    # and the tool parser needs to see its opening tag.
                    reasoning.append(buf[:pos])
                    self.pending = buf[pos:]
                    self.state = _CONTENT
                else:
                    keep = 0 if final else partial_tag_len(buf, _REASONING_HOLDBACK)
                    reasoning.append(buf[: len(buf) - keep])
                    self.pending = buf[len(buf) - keep :]
                    break
            elif self.state == _AFTER_END:
                if not buf:
                    if final:
                        self.state = _CONTENT
                    break
                self.pending = buf[1:] if buf[0] == "\n" else buf
                self.state = _CONTENT
            else:
                content.append(buf)
                self.pending = ""
                break
        return "".join(reasoning), "".join(content)


class Step35ReasoningDetector(BaseReasoningFormatDetector):
    """``--reasoning-parser step3p5``.

    ``force_reasoning`` is accepted for ``ReasoningParser`` but ignored: the serving
    layer passes False whenever the template does not end with ``<think>``, yet
    Step-3.5 reasons in every turn.
    """

    def __init__(
        self,
        stream_reasoning: bool = True,
        force_reasoning: bool = True,  # noqa: ARG002 (SGLang passes it; Step-3.5 always reasons)
        continue_final_message: bool = False,
        previous_content: str = "",
        force_nonempty_content: bool = False,
    ):
        if not isinstance(previous_content, str):
            # Multimodal prefixes arrive as content-part lists; they carry no think tags.
            previous_content = ""
        super().__init__(
            THINK_OPEN,
            THINK_CLOSE,
            force_reasoning=True,
            stream_reasoning=stream_reasoning,
            tool_start_token=TOOL_OPEN,
            continue_final_message=continue_final_message,
            previous_content=previous_content,
            force_nonempty_content=force_nonempty_content,
        )
        self._start_state = initial_state(self.previous_content)
        self._scanner = ThinkScanner(self._start_state)
        self._in_reasoning = self._scanner.in_reasoning
        self._held_reasoning = ""  # stream_reasoning=False keeps reasoning until it ends

    def _detect_and_parse_impl(self, text: str) -> StreamingParseResult:
        try:
            reasoning, content = ThinkScanner(self._start_state).feed(text, final=True)
        except Exception:  # the server must get an answer, never a 500
            logger.exception("step3p5 reasoning parser failed; returning text as content")
            return StreamingParseResult(normal_text=text)
        return StreamingParseResult(normal_text=content, reasoning_text=reasoning)

    def _feed(self, text: str, final: bool) -> StreamingParseResult:
        try:
            reasoning, content = self._scanner.feed(text, final)
        except Exception:
            logger.exception("step3p5 reasoning parser failed; passing text through")
            content, reasoning = self._scanner.pending, ""
            self._scanner = ThinkScanner(_CONTENT)
        self._in_reasoning = self._scanner.in_reasoning
        if not self.stream_reasoning:
            self._held_reasoning += reasoning
            reasoning = ""
            if final or not self._in_reasoning:
                reasoning, self._held_reasoning = self._held_reasoning, ""
        return StreamingParseResult(normal_text=content, reasoning_text=reasoning)

    def _parse_streaming_increment_impl(self, new_text: str) -> StreamingParseResult:
        return self._feed(new_text, final=False)

    def finish(self) -> StreamingParseResult:
        never_answered = self._scanner.in_reasoning
        ret = self._feed("", final=True)
        if self._force_nonempty_content and never_answered:
            # Same contract as the base class: the whole reasoning becomes the content.
            text = self._accumulated_reasoning + ret.reasoning_text + ret.normal_text
            self._accumulated_reasoning = ""
            return StreamingParseResult(normal_text=text)
        return ret

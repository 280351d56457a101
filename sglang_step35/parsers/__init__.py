"""Step-3.5 reasoning and tool-call parsers (``step3p5``) for SGLang.

Importing this package changes nothing in SGLang; :func:`register_parsers` installs
the detectors under the ``step3p5`` name. Formats and malformed-input behaviour are
documented in docs/parsers.md.
"""

from sglang_step35.parsers.reasoning import Step35ReasoningDetector
from sglang_step35.parsers.tool_call import Step35ToolCallDetector

PARSER_NAME = "step3p5"

__all__ = [
    "PARSER_NAME",
    "Step35ReasoningDetector",
    "Step35ToolCallDetector",
    "register_parsers",
]


def register_parsers() -> None:
    """Make ``--reasoning-parser step3p5`` and ``--tool-call-parser step3p5`` use ours.

    Idempotent: it only (re)binds two dictionary entries.
    """
    from sglang.srt.function_call.function_call_parser import FunctionCallParser
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    ReasoningParser.DetectorMap[PARSER_NAME] = Step35ReasoningDetector
    FunctionCallParser.ToolCallParserEnum[PARSER_NAME] = Step35ToolCallDetector

"""Typing of raw tool-call parameter text by the tool's JSON schema.

Step-3.5 writes every parameter value as raw text; the OpenAI ``arguments`` string
needs JSON values. A value that fits none of the schema's types stays a string, so a
sloppy model output still reaches the client instead of being dropped. Type names
outside JSON Schema (``float``, ``int``, ``bool``, ``dict``...) are read as the JSON
type they stand for, case-insensitively.
"""

import ast
import json
import math
import re
from typing import Any, Dict, List, Optional

from sglang.srt.entrypoints.openai.protocol import Tool
from sglang.srt.function_call.utils import get_schema_properties

_INT_RE = re.compile(r"[-+]?\d+")
_NUMBER_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

# Union types are tried most specific first; string always last so that "3" under
# ["integer", "string"] becomes 3, and "null" under ["string", "null"] becomes None.
_TRY_ORDER = ("null", "boolean", "integer", "number", "object", "array", "string")

_MAX_REF_DEPTH = 8

# Hand-written tool definitions use programming-language type names. These are the
# names SGLang's and vLLM's Qwen3-Coder parsers convert (exact names, then prefixes,
# compared lower-cased), so a tool that works there gets the same JSON types here.
# "double" is not in their lists (they reach it through a generic literal_eval); it
# is named here because it is the one float spelling those prefixes miss.
_STRING_ALIASES = ("str", "text", "varchar", "char", "enum")
_BOOLEAN_ALIASES = ("bool", "binary")
_INTEGER_PREFIXES = ("int", "uint", "long", "short", "unsigned")
_NUMBER_PREFIXES = ("num", "float")
_NUMBER_ALIASES = ("double",)
_ARRAY_ALIASES = ("arr",)


def canonical_type(name: str) -> Optional[str]:
    """The JSON Schema type a declared type name stands for; None when it is unknown."""
    t = name.strip().lower()
    if t in _TRY_ORDER:
        return t
    if t in _STRING_ALIASES:
        return "string"
    if t in _BOOLEAN_ALIASES:
        return "boolean"
    if t.startswith(_INTEGER_PREFIXES):
        return "integer"
    if t.startswith(_NUMBER_PREFIXES) or t in _NUMBER_ALIASES:
        return "number"
    if t in _ARRAY_ALIASES or t.startswith("list"):
        return "array"
    if t.startswith("dict"):
        return "object"
    return None


def tool_properties(tool: Optional[Tool]) -> Dict[str, Any]:
    """The ``properties`` of a tool's parameter schema; {} when it declares none.

    SGLang's helper, the one its Qwen3-Coder (0.5.23's built-in step3p5 tool parser) and GLM
    detectors use: top-level ``properties``, else those of ``anyOf``/``oneOf``/``allOf``
    branches (first definition of a name wins), so union-typed arguments are typed like there.
    Branches given as ``$ref`` are not followed, as in SGLang."""
    if tool is None:
        return {}
    return get_schema_properties(tool.function.parameters)


def _resolve_ref(schema: Any, root: Dict[str, Any]) -> Any:
    for _ in range(_MAX_REF_DEPTH):
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        node: Any = root
        for part in ref[2:].split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return schema
        schema = node
    return schema


def schema_types(schema: Any, root: Optional[Dict[str, Any]] = None, depth: int = 0) -> List[str]:
    """JSON types a (sub)schema admits, in _TRY_ORDER; [] means "unknown, keep text".

    Not SGLang's ``infer_type_from_json_schema`` (function_call/utils.py), which returns one
    type: for a union it drops "null" and otherwise prefers "string" ("3" under
    ["integer", "string"] stays text, "null" under ["string", "null"] the string "null"),
    resolves no ``$ref`` and knows no type aliases (``float``, ``int``, ...); every value is
    then tried against all the admitted types here, most specific first."""
    root = root or {}
    schema = _resolve_ref(schema, root)
    if not isinstance(schema, dict) or depth > _MAX_REF_DEPTH:
        return []
    found = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        declared = [declared]
    if isinstance(declared, list):
        found.update(canonical_type(t) for t in declared if isinstance(t, str))
        found.discard(None)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            found.update(schema_types(sub, root, depth + 1))
    values = schema.get("enum", [])
    if "const" in schema:
        values = [schema["const"]]
    for value in values if not found else []:
        found.add(_json_type_of(value))
    if not found and "properties" in schema:
        found.add("object")
    return [t for t in _TRY_ORDER if t in found]


def _json_type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "string"


_MISSING = object()


def _as_type(text: str, json_type: str) -> Any:
    """``text`` as a value of ``json_type``, or _MISSING when it is not one."""
    stripped = text.strip()
    if json_type == "string":
        return text
    if json_type == "null":
        return None if stripped == "null" else _MISSING
    if json_type == "boolean":
        return {"true": True, "false": False}.get(stripped.lower(), _MISSING)
    if json_type == "integer":
        return int(stripped) if _INT_RE.fullmatch(stripped) else _MISSING
    if json_type == "number":
        if _INT_RE.fullmatch(stripped):
            return int(stripped)
        if _NUMBER_RE.fullmatch(stripped):
            value = float(stripped)
            return value if math.isfinite(value) else _MISSING
        return _MISSING
    if json_type in ("object", "array"):
        wanted = dict if json_type == "object" else list
        for loads in (json.loads, ast.literal_eval):
            try:
                value = loads(stripped)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, wanted) and _json_safe(value):
                return value
        return _MISSING
    return _MISSING


def _json_safe(value: Any) -> bool:
    # literal_eval accepts Python-only values (tuples, sets, inf, bytes) that json.dumps
    # would reject or rewrite; such a value stays text.
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def convert_value(text: str, types: List[str]) -> Any:
    """Raw parameter text -> JSON value for the first admitted type that fits."""
    for json_type in types:
        value = _as_type(text, json_type)
        if value is not _MISSING:
            return value
    return text


def is_plain_string(types: List[str]) -> bool:
    """Whether the value is text whatever it says, so it can stream before it ends."""
    return types in ([], ["string"])

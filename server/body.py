"""Reading a request body as strict JSON: the limits OpenAI's API enforces, as 400s.

Python's `json` is lax in ways a gateway must not be: it guesses UTF-16/32 from the first
bytes, accepts `NaN`/`Infinity`, keeps the last of duplicate keys (so the gateway and the
worker could read different values of one field), builds arbitrarily large integers, and
recurses until `RecursionError`. Each of those becomes a shaped 400 here.
"""

from __future__ import annotations

import json
import math
import re

from server.errors import OpenAIError

MAX_DEPTH = 32  # objects/arrays nested deeper than any OpenAI request needs
MAX_INT = 2**63 - 1  # token ids, seeds and limits all fit in int64 (what vLLM parses them into)


def _invalid_json(detail: str) -> OpenAIError:
    return OpenAIError(400, f"We could not parse the JSON body of your request: {detail}",
                       code="invalid_json")


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _invalid_json(f"duplicate key '{duplicate}'")
    return obj


def _reject_constant(name: str) -> float:
    raise _invalid_json(f"'{name}' is not a JSON number")


def _check_tree(value: object) -> None:
    """Depth and number limits, iteratively (a recursive walk could itself overflow)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        elif isinstance(node, bool) or node is None or isinstance(node, str):
            continue
        elif isinstance(node, int):
            if abs(node) > MAX_INT:
                raise _invalid_json("an integer is outside the 64-bit range")
            continue
        else:  # float
            if not math.isfinite(node):  # 1e400 parses to inf
                raise _invalid_json("a number is too large")
            continue
        if depth > MAX_DEPTH:
            raise _invalid_json(f"nesting deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list | int | float))


def parse_json_object(raw: bytes) -> dict[str, object]:
    """The body as a JSON object, or an OpenAIError(400, code="invalid_json")."""
    try:
        text = raw.decode("utf-8")  # OpenAI's API is UTF-8 only; never guess an encoding
    except UnicodeDecodeError as exc:
        raise _invalid_json("the body is not valid UTF-8") from exc
    try:
        payload = json.loads(text, object_pairs_hook=_reject_duplicates,
                             parse_constant=_reject_constant)
    except RecursionError as exc:
        raise _invalid_json(f"nesting deeper than {MAX_DEPTH} levels") from exc
    except ValueError as exc:  # JSONDecodeError, and int() of more than 4300 digits
        raise _invalid_json(str(exc).split(":")[0]) from exc
    if not isinstance(payload, dict):
        raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_tree(payload)
    # A lone surrogate escape ("\\ud800") decodes to a str that is not Unicode text; the
    # worker's tokenizer would fail on it with a 5xx. Only bodies with such an escape pay.
    if _SURROGATE_ESCAPE.search(text) and not _is_unicode_text(payload):
        raise _invalid_json("a string holds an unpaired UTF-16 surrogate")
    return payload


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_unicode_text(value: object) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

"""JSON from outside the process, parsed strictly and within bounds.

Every input path that reads JSON someone else wrote (queue messages, ingest lines,
continuation tokens) goes through `loads`, so each refuses the same things with a
message that says what is wrong and where: invalid UTF-8, nesting deeper than the
caller allows, integers outside 64 bits, NaN and infinities, duplicate keys, and
unpaired surrogates (no UTF-8 store can hold them). The standard parser alone would
raise RecursionError on deep nesting, ValueError past 4300 digits, and accept the rest.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A string token (so brackets inside strings are skipped) or a bracket.
_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF]")
_ECHO = 24
_BOM = b"\xef\xbb\xbf"


class JSONInputError(ValueError):
    """The text is not JSON this project accepts; the message says what is wrong and where."""


def loads(data: bytes | str, *, max_depth: int) -> Any:
    """Parse data (UTF-8 if bytes, a leading BOM ignored) as JSON nested at most max_depth levels deep.

    JSONInputError for anything else; never RecursionError, whatever the input.
    """
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        # RFC 8259 lets a parser ignore a leading byte-order mark; some editors and producers write one.
        start = len(_BOM) if raw.startswith(_BOM) else 0
        try:
            text = raw[start:].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONInputError(f"invalid UTF-8 at byte {start + exc.start}") from None
    else:
        text = data
    deepest = _too_deep_at(text, max_depth)
    if deepest is not None:
        raise JSONInputError(f"nested deeper than {max_depth} levels at character {deepest}")
    try:
        value = json.loads(
            text,
            parse_int=_parse_int,
            parse_float=_parse_float,
            parse_constant=_parse_constant,
            object_pairs_hook=_object,
        )
    except JSONInputError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONInputError(f"{exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError) as exc:  # the depth scan makes RecursionError unreachable; kept as a floor
        raise JSONInputError(str(exc)) from None
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(value)
    return value


def type_name(value: object) -> str:
    """The JSON name of a parsed value's type, with its article, for messages that never echo the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _too_deep_at(text: str, max_depth: int) -> int | None:
    """The offset of the first bracket past max_depth, or None (cheap when brackets are few)."""
    if text.count("[") + text.count("{") <= max_depth:
        return None
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        bracket = match.group()
        if bracket in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return match.start()
        elif bracket in ("]", "}"):
            depth -= 1
    return None


def _parse_int(text: str) -> int:
    # Digits are counted before int() runs, so a 4,000-digit number costs no conversion.
    if len(text) > 20:
        raise JSONInputError(f"integer {text[:_ECHO]}… is outside the 64-bit range")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise JSONInputError(f"integer {text} is outside the 64-bit range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONInputError(f"number {text[:_ECHO]} is out of range")
    return value


def _parse_constant(name: str) -> float:
    raise JSONInputError(f"{name} is not a JSON value")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONInputError(f"key {key[:_ECHO]!r} appears more than once in an object")
            seen.add(key)
    return result


def _check_surrogates(value: Any) -> None:
    try:
        # Bounded depth (checked above), so this cannot recurse far; it fails on the first lone surrogate.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise JSONInputError("a string holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)") from None

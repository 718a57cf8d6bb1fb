"""JSON from a peer we do not trust, parsed with limits.

Python's ``json.loads`` is fast but lets a hostile peer crash or bloat the
reader: deep nesting raises RecursionError, a number of thousands of digits
raises ValueError (or costs quadratic time), ``\\ud800`` escapes produce lone
surrogates that blow up much later when the string is encoded, duplicate keys
silently overwrite each other, and ``NaN`` is accepted. ``loads`` turns every
one of those into one ``BadJson`` with a specific reason, before any caller
sees the value:

- the input is bytes of at most ``max_bytes`` and strict UTF-8;
- nesting is at most ``max_depth`` (the C scanner's RecursionError on a
  ``[[[[...`` bomb is caught, then the tree is walked with the limit);
- integers have at most 20 digits, floats at most 40 characters, no
  ``NaN``/``Infinity``;
- strings (keys included) are at most ``max_string`` characters and contain
  no surrogate code points;
- no object has a key twice; at most ``max_items`` values in all.

It is the one decoder for every peer input: IPC frames, MQTT payloads, job
documents, and the state files the processes read back.
"""

from __future__ import annotations

import json

MAX_INT_DIGITS = 20  # 2**63 has 19 digits; room for a sign
MAX_FLOAT_CHARS = 40


class BadJson(ValueError):
    """The input is not acceptable JSON; the text says exactly why."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadJson(f"a number has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise BadJson(f"a number is longer than {MAX_FLOAT_CHARS} characters")
    return float(text)


def _parse_constant(name: str):
    raise BadJson(f"{name} is not a JSON number")


def _pairs(pairs: list) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise BadJson(f"key {key!r} appears twice in one object")
            seen.add(key)
    return result


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_float=_parse_float,
                            parse_constant=_parse_constant, object_pairs_hook=_pairs)


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_tree(value, max_depth: int, max_string: int, max_items: int) -> None:
    """Walk a decoded value iteratively; raise BadJson on the first violation."""
    stack = [(value, 1)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            raise BadJson(f"more than {max_items} values")
        if isinstance(node, str):
            if len(node) > max_string:
                raise BadJson(f"a string is longer than {max_string} characters")
            if _has_surrogate(node):
                raise BadJson("a string contains a lone surrogate (not valid Unicode)")
        elif isinstance(node, (dict, list)):
            if depth > max_depth:
                raise BadJson(f"nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    stack.append((key, depth + 1))
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


def loads(data: bytes, *, max_bytes: int, max_depth: int = 16, max_string: int = 65536,
          max_items: int = 10000):
    """Decode ``data`` within the limits, or raise BadJson naming the problem."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadJson("input is not bytes")
    if len(data) > max_bytes:
        raise BadJson(f"{len(data)} bytes exceed the limit of {max_bytes}")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadJson(f"not UTF-8 (byte {exc.start})") from None
    try:
        value, end = _DECODER.raw_decode(text.lstrip(" \t\r\n"))
    except BadJson:
        raise
    except RecursionError:
        raise BadJson(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise BadJson(f"not JSON ({exc.msg} at character {exc.pos})") from None
    except ValueError as exc:  # e.g. int() limits
        raise BadJson(f"not JSON ({exc})") from None
    if text.lstrip(" \t\r\n")[end:].strip(" \t\r\n"):
        raise BadJson("extra data after the JSON value")
    check_tree(value, max_depth, max_string, max_items)
    return value


def dumps(value) -> bytes:
    """Compact UTF-8 JSON of our own values (they are trusted)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")

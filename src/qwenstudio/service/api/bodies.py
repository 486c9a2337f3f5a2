"""The one parser every JSON body and multipart text field goes through (SECURITY 28): whatever a client sends,
the result is a plain JSON value a route can trust, or a typed 400 — never a ValueError, RecursionError or
UnicodeEncodeError that would surface as a 500 somewhere later (SQLite, the tokenizer, PNG metadata).

- integers: at most ``MAX_INT_DIGITS`` digits (the largest bound, a 63-bit seed, has 19); Python's own 4300-digit
  guard raises a bare ValueError and a big-but-allowed integer costs quadratic time to convert.
- floats: finite; ``NaN``/``Infinity`` literals are refused (they are not JSON).
- nesting: at most ``MAX_DEPTH`` levels (the C decoder's RecursionError is caught too, for the 100000-deep case).
- text: valid Unicode only. Lone surrogates (``"\\ud800"``) are **rejected** with ``invalid_text``, not replaced:
  a silent replacement would change the prompt (and the image) without telling anyone.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Request

from ..errors import MalformedBody, UnsupportedMediaType

MAX_INT_DIGITS = 20
MAX_FLOAT_CHARS = 40
MAX_DEPTH = 16
MAX_EXTRA_BYTES = 16 * 1024  # a request's free-form ``extra``: copied into every PNG and history row
MAX_EXTRA_DEPTH = 6


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedBody(f"an integer has {len(text.lstrip('-'))} digits; at most {MAX_INT_DIGITS} are accepted",
                            code="number_too_large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text) if len(text) <= MAX_FLOAT_CHARS else math.inf
    if not math.isfinite(value):
        raise MalformedBody(f"a number is too long or not finite ({text[:20]}...)", code="number_too_large")
    return value


def _parse_constant(name: str) -> Any:
    raise MalformedBody(f"{name} is not valid JSON", code="invalid_json")


def check_text(value: str, where: str = "a string") -> str:
    """Valid Unicode only: lone surrogates cannot be stored, tokenized or written to PNG metadata."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedBody(f"{where} contains invalid Unicode (a lone surrogate)", code="invalid_text") from None
    return value


def check_tree(value: Any, max_depth: int = MAX_DEPTH) -> Any:
    """Depth and text validity of a decoded JSON value, iteratively (no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            check_text(v)
        elif isinstance(v, (dict, list)):
            if depth > max_depth:
                raise MalformedBody(f"the JSON is nested more than {max_depth} levels deep", code="too_deep")
            if isinstance(v, dict):
                for k, item in v.items():
                    check_text(k, "a key")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in v)
    return value


def parse_json_text(raw: bytes | str, what: str = "the body") -> Any:
    """Decode JSON with every hostile case turned into a typed 400."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError:
        raise MalformedBody(f"{what} is not UTF-8", code="invalid_json") from None
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise MalformedBody(f"{what} is nested more than {MAX_DEPTH} levels deep", code="too_deep") from None
    except ValueError:  # JSONDecodeError and friends
        raise MalformedBody(f"{what} is not valid JSON", code="invalid_json") from None
    return check_tree(value)


async def json_body(request: Request) -> Any:
    """The body of a state-changing JSON route. Form posts (the cross-site kind) get 415, not parsing."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send the body as JSON with 'Content-Type: application/json'")
    raw = await request.body()
    return parse_json_text(raw) if raw else {}


def form_text(key: str, value: str) -> str:
    """A multipart text field: the same validity rules as JSON text."""
    return check_text(value, f"field '{key}'")


def check_extra(value: Any) -> None:
    """``extra`` is free-form but bounded: it is copied into every PNG and history row."""
    from ...errors import InvalidRequest

    if not isinstance(value, dict):
        raise InvalidRequest("field 'extra' must be an object", code="invalid_type")
    check_tree(value, MAX_EXTRA_DEPTH)
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8"))
    if size > MAX_EXTRA_BYTES:
        raise InvalidRequest(f"'extra' is {size} bytes as JSON; at most {MAX_EXTRA_BYTES}", code="extra_too_large")

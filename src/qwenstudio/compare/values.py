"""Request fields named on the command line: grid axes (``steps=4,8,20``) and variant settings (``steps=8,cfg=1``).

Names are checked against ``dataclasses.fields(GenerateRequest)`` (so a new request field is an axis at once) plus a
few that are not single fields: ``model`` / ``variant`` (what ``Engine.load`` gets), ``size`` (``WxH``: width and
height), ``lora`` (a whole stack: ``name:weight+other:0.5``, or ``none``) and, on grid axes only, ``prompt_sr``
(A1111's prompt search/replace: the first value is searched in the prompt, each value replaces it).
Values are comma separated (quote one that contains a comma: ``prompt="a, b",c``); numeric ranges are written
``4..20:4`` (start..stop:step, stop included) or ``1..4[7]`` (7 evenly spaced values).
"""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest

LOAD_FIELDS = ("model", "variant")  # change what is loaded, not the request
SPECIAL = ("size", "lora", "prompt_sr")
_NOT_SETTABLE = ("extra", "settings_from")  # settings_from is the engine's record, never an input
_RANGE = re.compile(r"^\s*(-?[\d.]+)\s*\.\.\s*(-?[\d.]+)\s*(?::\s*(-?[\d.]+)|\[\s*(\d+)\s*\])?\s*$")


def request_field_types() -> dict[str, str]:
    """{field name: its base type name ('int', 'float', 'str', 'bool', 'loras')} for every settable request field."""
    from ..engine.requests import GenerateRequest

    out = {}
    for f in fields(GenerateRequest):
        if f.name in _NOT_SETTABLE:
            continue
        ann = str(f.type)
        out[f.name] = "loras" if f.name == "loras" else next(
            (t for t in ("bool", "int", "float", "str") if re.search(rf"\b{t}\b", ann)), "str")
    return out


def known_names(axis: bool) -> list[str]:
    names = [*LOAD_FIELDS, *request_field_types(), "size", "lora"]
    return [*names, "prompt_sr"] if axis else names


def split_values(text: str) -> list[str]:
    """Comma separated, CSV quoting honoured, surrounding spaces trimmed."""
    try:
        row = next(csv.reader([text], skipinitialspace=True), [])
    except csv.Error as e:
        raise InvalidRequest(f"cannot read the values '{text[:60]}': {e}", code="invalid_axis") from None
    return [v.strip() for v in row]


def parse_value(name: str, text: str) -> Any:
    """One value of field ``name``, typed; raises ``InvalidRequest`` naming the field."""
    types = request_field_types()
    text = text.strip()
    if name in LOAD_FIELDS or name == "prompt_sr":
        return text
    if name == "size":
        m = re.fullmatch(r"(\d+)\s*[x×*]\s*(\d+)", text)
        if not m:
            raise InvalidRequest(f"size '{text}' is not WIDTHxHEIGHT", code="invalid_size")
        return (int(m.group(1)), int(m.group(2)))
    if name in ("lora", "loras"):
        return parse_lora_stack(text)
    kind = types.get(name)
    if kind is None:
        raise InvalidRequest(f"unknown field '{name}'; known: {', '.join(known_names(True))}", code="invalid_axis")
    if text.lower() in ("none", "default", "") and kind != "str":
        return None
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
    except ValueError:
        raise InvalidRequest(f"{name}: '{text}' is not a valid {kind}", code="invalid_axis") from None
    return text


def parse_lora_stack(text: str) -> tuple:
    """``none`` / empty -> no LoRA; else ``name[:weight]`` entries joined by ``+``."""
    from ..engine.lora import parse_lora_arg
    from ..engine.requests import LoraRef

    if text.strip().lower() in ("", "none", "off"):
        return ()
    return tuple(LoraRef(*parse_lora_arg(part)) for part in text.split("+") if part.strip())


def expand_values(name: str, text: str) -> list[Any]:
    """All values of an axis: a list, with ``a..b:step`` / ``a..b[n]`` ranges expanded for numeric fields."""
    kind = request_field_types().get(name)
    out: list[Any] = []
    for part in split_values(text):
        m = _RANGE.match(part) if kind in ("int", "float") else None
        if m:
            out += _expand_range(name, kind, *m.groups())
        else:
            out.append(parse_value(name, part))
    if not out:
        raise InvalidRequest(f"axis '{name}' has no values", code="invalid_axis")
    return out


def _expand_range(name: str, kind: str, start: str, stop: str, step: str | None, count: str | None) -> list[Any]:
    try:
        a, b = float(start), float(stop)
        s = float(step) if step is not None else (1.0 if b >= a else -1.0)
        n = int(count) if count is not None else int(abs(b - a) / abs(s) + 1e-9) + 1
        if n < 1 or s == 0 or (count is None and (b - a) * s < 0) or not (math.isfinite(a) and math.isfinite(b)):
            raise ValueError
    except (ValueError, OverflowError, ZeroDivisionError):
        raise InvalidRequest(f"{name}: bad range '{start}..{stop}'", code="invalid_axis") from None
    if n > 64:  # checked before building the list: "1..1e9" must not allocate a billion values
        raise InvalidRequest(f"{name}: range gives {n} values (at most 64)", code="invalid_axis")
    if count is not None:
        vals = [a + (b - a) * i / (n - 1) for i in range(n)] if n > 1 else [a]
    else:
        vals = [a + i * s for i in range(n)]
    return [round(v) for v in vals] if kind == "int" else [round(v, 6) for v in vals]


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[Any, ...]
    labels: tuple[str, ...]  # how each value is shown on the contact sheet and in the report

    @property
    def loads(self) -> bool:
        return self.name in LOAD_FIELDS


def parse_axis(text: str) -> Axis:
    """``NAME=v1,v2,...`` -> Axis. ``prompt_sr=old,new1,new2``: the first value must occur in the prompt."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InvalidRequest(f"axis '{text}' is not NAME=VALUES (e.g. steps=4,8,20)", code="invalid_axis")
    if name not in known_names(axis=True):
        raise InvalidRequest(f"unknown axis '{name}'; known: {', '.join(known_names(True))}", code="invalid_axis")
    if name == "loras":
        name = "lora"
    values = expand_values(name, rest)
    if name == "prompt_sr" and len(values) < 2:
        raise InvalidRequest("prompt_sr needs the searched text and at least one replacement", code="invalid_axis")
    return Axis(name, tuple(values), tuple(label_of(name, v) for v in values))


def label_of(name: str, value: Any) -> str:
    if name == "size":
        return f"{value[0]}x{value[1]}"
    if name == "lora":
        return " + ".join(f"{r.name}:{r.weight:g}" for r in value) if value else "no LoRA"
    if name == "prompt_sr":
        return str(value)
    if name == "model" and ("/" in str(value) or "\\" in str(value)):
        return f"model={Path(str(value)).name}"  # a path: its folder/file name is what tells cells apart
    return f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"


def apply_setting(fields_: dict[str, Any], name: str, value: Any) -> None:
    """Set one (special or plain) setting in a dict of request fields + load fields, in place."""
    if name == "size":
        fields_["width"], fields_["height"] = value
    elif name in ("lora", "loras"):
        fields_["loras"] = value
    else:
        fields_[name] = value


def parse_settings(text: str) -> dict[str, Any]:
    """``steps=8,cfg=1,lora=name:1`` -> {field: value} (``size`` expanded to width/height)."""
    out: dict[str, Any] = {}
    for part in split_values(text):
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep:
            raise InvalidRequest(f"setting '{part}' is not NAME=VALUE", code="invalid_variant")
        if name not in known_names(axis=False):
            raise InvalidRequest(f"unknown setting '{name}'; known: {', '.join(known_names(False))}",
                                 code="invalid_variant")
        apply_setting(out, name, parse_value(name, value))
    return out


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Settings as plain JSON values (LoRA refs become {"name", "weight"})."""
    from dataclasses import asdict, is_dataclass

    def conv(v):
        if is_dataclass(v):
            return asdict(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return {k: conv(v) for k, v in d.items()}


def axis_from_values(name: str, values: list[Any]) -> Axis:
    """An axis from a JSON list (the API form): each value parsed as its CLI text would be."""
    if not isinstance(values, list) or not values:
        raise InvalidRequest(f"axis '{name}' needs a non-empty list of values", code="invalid_axis")
    if len(values) > 64:
        raise InvalidRequest(f"axis '{name}' has {len(values)} values (at most 64)", code="invalid_axis")
    text = []
    for v in values:
        if isinstance(v, dict) or (isinstance(v, list) and name not in ("lora", "loras", "size")):
            raise InvalidRequest(f"axis '{name}': value {v!r} is not a scalar", code="invalid_axis")
        if name in ("lora", "loras") and isinstance(v, list):  # [{"name", "weight"}, ...] -> "a:1+b:0.5"
            if not all(isinstance(x, str) or (isinstance(x, dict) and isinstance(x.get("name"), str)) for x in v):
                raise InvalidRequest(f"axis '{name}': a LoRA is 'name:weight' or {{\"name\", \"weight\"}}",
                                     code="invalid_axis")
            v = "+".join(f"{x['name']}:{x.get('weight', 1.0)}" if isinstance(x, dict) else x for x in v) or "none"
        elif name == "size" and isinstance(v, list) and len(v) == 2:
            v = f"{v[0]}x{v[1]}"
        text.append("none" if v is None else str(v).lower() if isinstance(v, bool) else str(v))
    buf = io.StringIO()
    csv.writer(buf).writerow(text)
    return parse_axis(f"{name}={buf.getvalue().strip()}")

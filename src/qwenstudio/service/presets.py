"""Presets: named partial requests. Validation reuses the request field types; SwarmUI preset JSON is mapped
field by field and whatever does not map is reported back, never silently dropped."""

from __future__ import annotations

from typing import Any

from ..engine.requests import nearest_multiple
from ..errors import InvalidRequest
from .api.schemas import REQUEST_FIELDS, check_field_types

PRESET_FIELDS = REQUEST_FIELDS | {"model"}
MAX_NAME = 200


def validate_params(params: Any, spec: Any = None) -> dict[str, Any]:
    """Field names and types, then (with the served model's ``spec``) every bound a request has: a preset that
    could never run (``steps: 0``, a 5000-pixel side) is refused when it is saved, not when it is used."""
    if not isinstance(params, dict):
        raise InvalidRequest("preset params must be a JSON object")
    unknown = sorted(set(params) - PRESET_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown preset field(s): {', '.join(unknown)}", code="invalid_preset")
    check_field_types({k: v for k, v in params.items() if k != "prompt" or v is not None})
    if spec is not None:
        check_request_bounds(params, spec)
    return dict(params)


def check_request_bounds(params: dict[str, Any], spec: Any) -> None:
    """The engine's own validation (GenerateRequest.resolve) on the preset's fields; a missing or empty prompt is
    fine in a preset (the user types one), so a placeholder stands in for it."""
    from ..engine.requests import GenerateRequest

    fields = {k: v for k, v in params.items() if k in REQUEST_FIELDS}
    if not (isinstance(fields.get("prompt"), str) and fields["prompt"].strip()):
        fields["prompt"] = "preset"
    if fields.get("batch") is None:
        fields.pop("batch", None)
    GenerateRequest.from_dict(fields).resolve(spec)


def validate_preset(body: Any, spec: Any = None) -> tuple[str, dict[str, Any], str, str]:
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise InvalidRequest(f"preset 'name' must be a non-empty string of at most {MAX_NAME} characters",
                             code="invalid_preset")
    description, author = body.get("description", ""), body.get("author", "")
    if not isinstance(description, str) or not isinstance(author, str):
        raise InvalidRequest("'description' and 'author' must be strings", code="invalid_preset")
    return name.strip(), validate_params(body.get("params", {}), spec), description, author


def _num(value: Any, kind: type):
    if isinstance(value, bool):
        raise TypeError
    return kind(float(value)) if kind is int else kind(value)


def from_swarmui(data: Any) -> tuple[dict[str, Any], list[str]]:
    """SwarmUI preset JSON -> (our preset body, names of params that did not map)."""
    from ..engine.sampling import SAMPLERS, SCHEDULERS

    if not isinstance(data, dict) or not isinstance(data.get("param_map", {}), dict):
        raise InvalidRequest("not a SwarmUI preset: expected {'title', 'param_map': {...}}", code="invalid_preset")
    pm: dict[str, Any] = data.get("param_map", {})
    params: dict[str, Any] = {}
    unmapped: list[str] = []
    simple = {"prompt": ("prompt", str), "negativeprompt": ("negative_prompt", str), "steps": ("steps", int),
              "cfgscale": ("cfg", float), "sigmashift": ("shift", float), "width": ("width", int),
              "height": ("height", int), "images": ("batch", int), "batchsize": ("batch", int)}
    for key, value in pm.items():
        k = key.lower()
        try:
            if k in simple:
                name, kind = simple[k]
                params[name] = str(value) if kind is str else _num(value, kind)
            elif k == "seed":
                seed = _num(value, int)
                if seed >= 0:  # -1 is SwarmUI's "random": ours is "no seed"
                    params["seed"] = seed
            elif k == "sampler" and str(value) in SAMPLERS:
                params["sampler"] = str(value)
            elif k == "scheduler" and str(value) in SCHEDULERS:
                params["scheduler"] = str(value)
            elif k == "sidelength":
                side = nearest_multiple(_num(value, int))
                params.setdefault("width", side)
                params.setdefault("height", side)
            else:
                unmapped.append(key)
        except (TypeError, ValueError, OverflowError):
            unmapped.append(key)
    for k in ("width", "height"):  # SwarmUI sizes need not be multiples of 16; ours must
        if k in params:
            params[k] = nearest_multiple(params[k])
    title = data.get("title")
    body = {
        "name": title if isinstance(title, str) and title.strip() else "imported preset",
        "description": data.get("description", "") if isinstance(data.get("description", ""), str) else "",
        "author": data.get("author", "") if isinstance(data.get("author", ""), str) else "",
        "params": params,
    }
    return body, unmapped

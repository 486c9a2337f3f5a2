"""Presets: named partial requests. Validation reuses the request field types; SwarmUI preset JSON is mapped
field by field and whatever does not map is reported back, never silently dropped."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequest
from .api.schemas import REQUEST_FIELDS, check_field_types

PRESET_FIELDS = (REQUEST_FIELDS - {"preset"}) | {"model"}  # a preset does not name another preset
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


def from_swarmui_file(data: Any) -> list[tuple[dict[str, Any], list[str], list[str]]]:
    """A SwarmUI preset file (one preset, or the "Export All" file of many) -> ``(our preset body, what did not
    map, warnings)`` per preset.  The parsing is ``qwenstudio.interop`` (shared with ``--from-image``)."""
    from ..interop import import_swarmui_presets

    return [(body, settings.unmapped, settings.warnings) for body, settings in import_swarmui_presets(data)]


def from_swarmui(data: Any) -> tuple[dict[str, Any], list[str]]:
    """A single SwarmUI preset -> (our preset body, what did not map)."""
    body, unmapped, _ = from_swarmui_file(data)[0]
    return body, unmapped

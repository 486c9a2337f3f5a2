"""OpenAPI request-body schemas for the routes that read raw bodies (``json_body`` / ``read_form``).

The routes parse bodies themselves (typed 4xx errors, OpenAI's error shape, one bound check shared with the engine),
so FastAPI cannot infer their schemas; these are generated from the engine's one field table (``engine/fields.py``)
so clients, docs and fuzzers (schemathesis, tests/service/test_fuzz.py) see the real bodies. They describe;
they do not validate (the route does, and a body outside them gets a 4xx, never a 5xx).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ...engine import fields as F
from ...engine.requests import GenerateRequest
from .schemas import MAX_PREVIEW_EVERY

_UPLOAD_ID = {"type": "string", "pattern": "^[0-9a-f]{64}$", "description": "an id returned by POST /api/uploads"}


def generate_fields(caps: Any = None) -> dict[str, Any]:
    """Every client field of GenerateRequest, from the engine's field table (``caps``: the operator's caps)."""
    return {f.name: F.json_schema(f.name, caps) for f in fields(GenerateRequest) if f.name in F.GENERATE_FIELDS}


def edit_fields(caps: Any = None) -> dict[str, Any]:
    return {n: F.json_schema(n, caps) for n in ("strength", "feather", "keep_size", "controlnet")}


def _model(models: list[str] | None) -> dict[str, Any]:
    return {"type": "string", "enum": models} if models else {"type": "string", "maxLength": 200}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def job_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    props = {
        "model": _model(models),
        "preview_every": {"type": "integer", "minimum": 0, "maximum": MAX_PREVIEW_EVERY},
        **generate_fields(caps),
        "images": {"type": "array", "maxItems": 8, "items": _UPLOAD_ID},
        "mask": _UPLOAD_ID,
        "controls": {"type": "array", "maxItems": 8, "items": {
            "type": "object", "required": ["image"], "properties": {
                "image": _UPLOAD_ID, "mode": {"type": "string"}, "scale": {"type": "number"},
                "start": {"type": "number", "minimum": 0, "maximum": 1},
                "end": {"type": "number", "minimum": 0, "maximum": 1}}}},
        **edit_fields(caps),
    }
    return _json({"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": props})


def openai_generation_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    g = generate_fields(caps)
    props = {
        "model": _model(models),
        "prompt": g["prompt"],
        "n": g["batch"],
        "size": {"type": "string", "pattern": r"^(auto|\d{2,4}x\d{2,4})$"},
        "response_format": {"type": "string", "enum": ["b64_json", "url"]},
        "user": {"type": "string"}, "quality": {"type": "string"}, "style": {"type": "string"},
        **{k: g[k] for k in ("negative_prompt", "steps", "cfg", "seed", "sampler", "scheduler", "shift")},
    }
    return _json({"type": "object", "required": ["prompt"], "additionalProperties": False, "properties": props})


def openai_edit_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    g = generate_fields(caps)
    props = {
        "image": {"type": "string", "format": "binary"},
        "mask": {"type": "string", "format": "binary"},
        "prompt": g["prompt"], "model": _model(models), "n": g["batch"],
        "size": {"type": "string"}, "response_format": {"type": "string", "enum": ["b64_json", "url"]},
        "steps": g["steps"], "seed": g["seed"], "strength": edit_fields(caps)["strength"],
    }
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image", "prompt"], "properties": props}}}}}


def upload_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


def preset_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    params = {k: v for k, v in generate_fields(caps).items() if k not in ("extra",)}
    return _json({"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 100},
        "description": {"type": "string", "maxLength": 2000}, "author": {"type": "string", "maxLength": 200},
        "params": {"type": "object", "additionalProperties": False, "properties": params}}})


def swarmui_body(caps: Any = None, models: list[str] | None = None) -> dict[str, Any]:
    return _json({"type": "object", "properties": {
        "title": {"type": "string"}, "author": {"type": "string"}, "description": {"type": "string"},
        "param_map": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}}})


BODIES = {
    ("/api/jobs", "post"): job_body,
    ("/v1/images/generations", "post"): openai_generation_body,
    ("/v1/images/edits", "post"): openai_edit_body,
    ("/api/uploads", "post"): upload_body,
    ("/api/presets", "post"): preset_body,
    ("/api/presets/{preset_id}", "put"): preset_body,
    ("/api/presets/import/swarmui", "post"): swarmui_body,
}


def install(app) -> None:
    """Add the request bodies to the app's OpenAPI document when it is first built (lazily: the sampler and
    scheduler names come from the engine, which imports torch; serving must not wait for that). The bodies show
    this server's operator caps and served model names."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        caps = getattr(app.state, "config", None)
        client = getattr(app.state, "client", None)
        models = [m.id for m in client.models()] if client is not None else None
        for (path, method), body in BODIES.items():
            op = schema.get("paths", {}).get(path, {}).get(method)
            if op is not None:
                op.update(body(caps, models))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi

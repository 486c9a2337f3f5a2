"""Request parsing shared by the native and OpenAI routes: JSON-only bodies, field types, then the engine's own
``GenerateRequest.resolve`` for every bound, all before anything is queued (SECURITY.md 1, 5)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from fastapi import Request

from ...engine.requests import GenerateRequest
from ...errors import InvalidRequest, ModelNotFound
from ..engine_client import EngineClient
from ..errors import UnsupportedMediaType

_STR = {"prompt", "negative_prompt", "aspect", "sampler", "scheduler", "noise", "magic"}
_INT = {"width", "height", "steps", "seed", "batch", "noise_skip"}
_FLOAT = {"cfg", "shift"}
_BOOL = {"cfg_norm"}
REQUEST_FIELDS = frozenset(f.name for f in fields(GenerateRequest))
MAX_PREVIEW_EVERY = 1000


async def json_body(request: Request) -> Any:
    """The body of a state-changing JSON route. Form posts (the cross-site kind) get 415, not parsing."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send the body as JSON with 'Content-Type: application/json'")
    raw = await request.body()
    try:
        return json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON", code="invalid_json") from None


def check_field_types(data: dict[str, Any]) -> None:
    """Reject wrongly typed fields with a 4xx before they can reach engine code that assumes the types."""
    for name, value in data.items():
        if value is None and name != "prompt":
            continue
        bad = (
            (name in _STR and not isinstance(value, str))
            or (name in _INT and (isinstance(value, bool) or not isinstance(value, int)))
            or (name in _FLOAT and (isinstance(value, bool) or not isinstance(value, (int, float))))
            or (name in _BOOL and not isinstance(value, bool))
            or (name == "extra" and not isinstance(value, dict))
        )
        if bad:
            raise InvalidRequest(f"field '{name}' has the wrong type ({type(value).__name__})", code="invalid_type")


def default_model(client: EngineClient) -> str:
    return client.models()[0].id


def resolve_request(client: EngineClient, model: str | None, data: dict[str, Any]) -> tuple[str, GenerateRequest]:
    """Find the served model (404 model_not_found otherwise) and resolve the request against its spec."""
    served = {m.id: m for m in client.models()}
    model = model or default_model(client)
    if not isinstance(model, str) or model not in served:
        raise ModelNotFound(f"model '{model}' is not served here; available: {', '.join(served)}")
    check_field_types(data)
    return model, client.prepare(model, GenerateRequest.from_dict(data))


def parse_job_body(client: EngineClient, body: Any, default_preview_every: int) -> tuple[str, GenerateRequest, int]:
    """Native create-job body: the GenerateRequest fields plus ``model`` and ``preview_every``."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    data = dict(body)
    model = data.pop("model", None)
    preview_every = data.pop("preview_every", default_preview_every)
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or not 0 <= preview_every <= MAX_PREVIEW_EVERY:
        raise InvalidRequest(f"preview_every must be an integer in [0, {MAX_PREVIEW_EVERY}]", code="invalid_preview_every")
    model, request = resolve_request(client, model, data)
    return model, request, preview_every

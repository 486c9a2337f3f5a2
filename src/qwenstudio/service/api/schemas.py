"""Request parsing shared by the native and OpenAI routes: JSON-only bodies, field types from the engine's one field
table (``engine/fields.py``), then the engine's own ``prepare`` for every bound, all before anything is queued
(SECURITY.md 1, 5). The edges only parse: an unset field stays unset for ``prepare``'s recipes."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from ...engine import fields as F
from ...engine.requests import GenerateRequest
from ...errors import InvalidRequest, ModelNotFound
from ..engine_client import EngineClient
from ..uploads import UploadStore
from .bodies import check_extra, json_body  # noqa: F401  (json_body: the one body parser, re-exported)

EDIT_INPUTS = ("images", "mask", "controls")  # upload ids; their presence makes a job an edit
# What a client may send: the request's fields, less the engine's own record of where settings came from.
REQUEST_FIELDS = frozenset(f.name for f in fields(GenerateRequest)) - {"settings_from"}
MAX_PREVIEW_EVERY = 1000


def check_field_types(data: dict[str, Any]) -> None:
    """Reject wrongly typed fields with a 4xx before they can reach engine code that assumes the types."""
    F.check_types(data)
    if isinstance(data.get("extra"), dict):
        check_extra(data["extra"])


def default_model(client: EngineClient) -> str:
    return client.models()[0].id


def preset_model(client: EngineClient, data: dict[str, Any]) -> str | None:
    """A job naming a preset but no model runs on the preset's ``model`` (if it names one)."""
    lookup = getattr(client, "preset_lookup", None)
    if lookup is None or not isinstance(data.get("preset"), str):
        return None
    model = lookup(data["preset"]).get("model")  # an unknown preset: its typed 404 preset_not_found
    return model if isinstance(model, str) else None


def resolve_request(client: EngineClient, model: str | None, data: dict[str, Any],
                    uploads: UploadStore | None = None) -> tuple[str, GenerateRequest]:
    """Find the served model (404 model_not_found otherwise) and prepare the request against it. A body naming
    uploaded images (``images``, ``mask``, ``controls``) becomes an edit: an EditRequest naming each input by its
    content reference (sha256 = upload id; the upload must exist now, 404 otherwise), never by a path."""
    served = {m.id: m for m in client.models()}
    model = model or preset_model(client, data) or default_model(client)
    if not isinstance(model, str) or model not in served:
        raise ModelNotFound(f"model '{model}' is not served here; available: {', '.join(served)}")
    data = dict(data)
    edit = any(data.get(k) for k in EDIT_INPUTS)
    if edit:
        if uploads is None:
            raise InvalidRequest("editing needs uploaded images", code="missing_image")
        data = _bind_uploads(uploads, data)
    else:
        for k in EDIT_INPUTS:
            data.pop(k, None)
    check_field_types(data)
    if edit:
        from ...engine.editing import EditRequest

        request = EditRequest.from_dict(data, trusted=False)
    else:
        request = GenerateRequest.from_dict(data, trusted=False)
    return model, client.prepare(model, request)


def _bind_uploads(uploads: UploadStore, data: dict[str, Any]) -> dict:
    images = data.pop("images", None) or []
    mask = data.pop("mask", None)
    controls = data.pop("controls", None) or []
    if not isinstance(images, list) or not isinstance(controls, list):
        raise InvalidRequest("'images' and 'controls' must be lists of upload ids / control objects",
                             code="invalid_type")
    if len(images) + len(controls) > 8:
        raise InvalidRequest("too many input images", code="too_many_images")
    data["images"] = [uploads.ref(i) for i in images]
    if mask is not None:
        data["mask"] = uploads.ref(mask)
    refs = []
    for c in controls:
        if not isinstance(c, dict) or "image" not in c:
            raise InvalidRequest("a control is {'image': upload id, 'mode', 'scale', 'start', 'end'}",
                                 code="invalid_control")
        opts = {k: c[k] for k in ("mode", "scale", "start", "end") if k in c}
        refs.append({"image": uploads.ref(c["image"]), **opts})
    data["controls"] = refs
    return data


def parse_job_body(client: EngineClient, body: Any, default_preview_every: int,
                   uploads: UploadStore | None = None) -> tuple[str, GenerateRequest, int]:
    """Native create-job body: the GenerateRequest fields plus ``model`` and ``preview_every``; for an edit also
    ``images``/``mask``/``controls`` (upload ids), ``strength``/``feather``/``keep_size`` and ``controlnet`` (a
    ControlNet name from the models home)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    data = dict(body)
    model = data.pop("model", None)
    preview_every = data.pop("preview_every", default_preview_every)
    if isinstance(preview_every, bool) or not isinstance(preview_every, int) or not 0 <= preview_every <= MAX_PREVIEW_EVERY:
        raise InvalidRequest(f"preview_every must be an integer in [0, {MAX_PREVIEW_EVERY}]", code="invalid_preview_every")
    model, request = resolve_request(client, model, data, uploads)
    return model, request, preview_every

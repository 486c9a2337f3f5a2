"""OpenAI-compatible image routes. The official ``openai`` client works unchanged; our extra sampling fields ride in
the same body (``extra_body`` in that client). Errors use OpenAI's shape (see api/errors.py)."""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ...errors import InvalidRequest, QwenStudioError
from .bodies import form_text, parse_json_text
from .files import output_bytes
from .jobs import cancel_quietly, wait_finished
from .schemas import json_body, resolve_request
from .uploads import read_form, save_upload

router = APIRouter(prefix="/v1", tags=["openai"])
JOB_ID_HEADER = "X-Qwenstudio-Job-Id"  # on every /v1/images response: follow /api/jobs/{id}(/events), the history
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
IGNORED = {"user", "quality", "style", "background", "moderation", "output_format", "output_compression"}
EXTRA = {"negative_prompt": "negative_prompt", "steps": "steps", "cfg": "cfg", "seed": "seed",
         "sampler": "sampler", "scheduler": "scheduler", "shift": "shift", "loras": "loras", "cfg_norm": "cfg_norm",
         "noise": "noise", "magic": "magic", "preset": "preset"}


def to_request_fields(body: Any) -> tuple[str | None, dict[str, Any], str]:
    """OpenAI body -> (model, GenerateRequest fields, response_format)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - IGNORED - set(EXTRA) - {"model", "prompt", "n", "size", "response_format"})
    if unknown:
        raise InvalidRequest(f"unknown parameter(s): {', '.join(unknown)}", code="unknown_parameter")
    fmt = body.get("response_format") or "b64_json"
    if fmt not in ("b64_json", "url"):
        raise InvalidRequest("response_format must be 'b64_json' or 'url'", code="invalid_response_format")
    fields: dict[str, Any] = {"prompt": body.get("prompt")}
    n = body.get("n")
    if n is not None:
        fields["batch"] = n
    size = body.get("size")
    if size not in (None, "auto"):
        m = SIZE.fullmatch(size) if isinstance(size, str) else None
        if m is None:
            raise InvalidRequest("size must be 'WIDTHxHEIGHT' (e.g. '1328x1328') or 'auto'", code="invalid_size")
        fields["width"], fields["height"] = int(m.group(1)), int(m.group(2))
    for key, name in EXTRA.items():
        if body.get(key) is not None:
            fields[name] = body[key]
    return body.get("model"), fields, fmt


@router.post("/images/generations", summary="OpenAI-compatible text-to-image")
async def generations(request: Request):
    state = request.app.state
    model, fields, fmt = to_request_fields(await json_body(request))
    model, req = await asyncio.to_thread(resolve_request, state.client, model, fields)
    job = await asyncio.to_thread(state.jobs.submit, model, req, 0)
    return await _respond(request, job, fmt)


EDIT_EXTRA = {"strength": float, "keep_size": bool, "feather": int}


@router.post("/images/edits", summary="OpenAI-compatible image edit (multipart: image or image[], optional mask)")
async def edits(request: Request):
    state = request.app.state
    form = await read_form(request)
    images = form.getlist("image[]") + form.getlist("image")
    if not images:
        raise InvalidRequest("give at least one 'image' (or 'image[]') file", code="missing_image", )
    body: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in ("image", "image[]", "mask"):
            continue
        if not isinstance(value, str):
            raise InvalidRequest(f"'{key}' must be a text field", code="invalid_multipart")
        body[key] = _form_value(key, form_text(key, value))
    model, fields, fmt = to_request_fields({k: v for k, v in body.items() if k not in EDIT_EXTRA})
    fields.update({k: v for k, v in body.items() if k in EDIT_EXTRA})
    fields["images"] = [(await save_upload(state, part, "image"))["id"] for part in images]
    mask = form.get("mask")
    if mask is not None:
        fields["mask"] = (await save_upload(state, mask, "mask"))["id"]
    model, req = await asyncio.to_thread(resolve_request, state.client, model, fields, state.uploads)
    job = await asyncio.to_thread(state.jobs.submit, model, req, 0)
    return await _respond(request, job, fmt)


MAX_NUMBER_CHARS = 40
_FORM_NUMBERS = {"n": int, "steps": int, "seed": int, "feather": int, "cfg": float, "shift": float, "strength": float}


def _form_value(key: str, value: str):
    """Multipart fields arrive as text: convert the numeric/boolean ones, with a typed error when they are not."""
    if key in ("keep_size", "cfg_norm"):
        if value.lower() not in ("true", "false", "1", "0"):
            raise InvalidRequest(f"{key} must be true or false", code="invalid_type")
        return value.lower() in ("true", "1")
    if key == "loras":  # JSON text in a multipart field: [{"name": ..., "weight": ...}]
        return parse_json_text(value, "the 'loras' field")
    conv = _FORM_NUMBERS.get(key)
    if conv is None:
        return value
    if len(value) > MAX_NUMBER_CHARS:
        raise InvalidRequest(f"'{key}' is not a number this server accepts ({len(value)} characters)",
                             code="invalid_type")
    try:
        number = conv(value)
    except ValueError:
        raise InvalidRequest(f"'{key}' must be a number, got {value!r}", code="invalid_type") from None
    if isinstance(number, float) and not math.isfinite(number):
        raise InvalidRequest(f"'{key}' must be a finite number", code="invalid_type")
    return number


def public_base(request: Request) -> str:
    """Absolute URLs are built from the configured public URL or the local address the request arrived on, never
    from the client's Host header (SECURITY 29: a rebinding name must not end up in a response)."""
    configured = request.app.state.config.public_url
    if configured:
        return configured.rstrip("/")
    host, port = (request.scope.get("server") or ("127.0.0.1", request.app.state.config.port))[:2]
    host = f"[{host}]" if ":" in str(host) else host
    return f"{request.scope.get('scheme', 'http')}://{host}:{port}"


async def _respond(request: Request, job, fmt: str) -> JSONResponse:
    """Wait for the job (a client that goes away cancels it) and answer in OpenAI's image-response shape, with the
    job id in ``X-Qwenstudio-Job-Id`` (also on a failed or cancelled job's error)."""
    from .errors import error_response, openai_status

    state = request.app.state
    headers = {JOB_ID_HEADER: job.id}
    if not await wait_finished(job, request):
        await asyncio.to_thread(cancel_quietly, state, job.id)
        raise QwenStudioError("client disconnected", code="cancelled")
    outcome = job.terminal
    if outcome["event"] in ("failed", "cancelled"):
        err = outcome["data"]["error"] if outcome["event"] == "failed" else \
            {"message": "the job was cancelled", "code": "cancelled"}
        exc = QwenStudioError(err["message"], code=err["code"])
        return error_response(request.url.path, openai_status(exc), exc.code, exc.message, headers)
    data = []
    for out in outcome["data"]["outputs"]:
        if fmt == "url":
            data.append({"url": public_base(request) + out["url"], "revised_prompt": None})
        else:
            raw = await output_bytes(state, out["id"])
            data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
    return JSONResponse({"created": int(time.time()), "data": data}, headers=headers)


@router.get("/models", summary="OpenAI-compatible model list (plus each model's variant, why, format, resident)")
async def models(request: Request):
    served = await asyncio.to_thread(request.app.state.client.models)
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": 0, "owned_by": "qwenstudio", "variant": m.variant,
         "variant_reason": getattr(m, "variant_reason", "") or None, "format": getattr(m, "format", "") or None,
         "resident": getattr(m, "resident", None)} for m in served
    ]}

"""OpenAI-compatible image routes. The official ``openai`` client works unchanged; our extra sampling fields ride in
the same body (``extra_body`` in that client). Errors use OpenAI's shape (see api/errors.py)."""

from __future__ import annotations

import asyncio
import base64
import re
import time
from typing import Any

from fastapi import APIRouter, Request

from ...errors import InvalidRequest, QwenStudioError
from ..errors import NotImplementedYet
from .files import output_bytes
from .jobs import _cancel_quietly, wait_finished
from .schemas import json_body, resolve_request

router = APIRouter(prefix="/v1", tags=["openai"])
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
IGNORED = {"user", "quality", "style", "background", "moderation", "output_format", "output_compression"}
EXTRA = {"negative_prompt": "negative_prompt", "steps": "steps", "cfg": "cfg", "seed": "seed",
         "sampler": "sampler", "scheduler": "scheduler", "shift": "shift"}


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
    model, req = resolve_request(state.client, model, fields)
    job = await asyncio.to_thread(state.jobs.submit, model, req, 0)
    if not await wait_finished(job, request):
        await asyncio.to_thread(_cancel_quietly, state, job.id)
        raise QwenStudioError("client disconnected", code="cancelled")
    outcome = job.terminal
    if outcome["event"] == "failed":
        err = outcome["data"]["error"]
        raise QwenStudioError(err["message"], code=err["code"])
    if outcome["event"] == "cancelled":
        raise QwenStudioError("the job was cancelled", code="cancelled")
    data = []
    for out in outcome["data"]["outputs"]:
        if fmt == "url":
            data.append({"url": str(request.base_url).rstrip("/") + out["url"], "revised_prompt": None})
        else:
            raw = await output_bytes(state, out["id"])
            data.append({"b64_json": base64.b64encode(raw).decode("ascii"), "revised_prompt": None})
    return {"created": int(time.time()), "data": data}


@router.post("/images/edits", summary="OpenAI-compatible image edit (not yet available)")
async def edits(request: Request):
    raise NotImplementedYet("image editing arrives with the editing engine; only /v1/images/generations works now")


@router.get("/models", summary="OpenAI-compatible model list")
async def models(request: Request):
    return {"object": "list", "data": [
        {"id": m.id, "object": "model", "created": 0, "owned_by": "qwenstudio"} for m in request.app.state.client.models()
    ]}

"""Input images for edits: ``POST /api/uploads`` (multipart, one ``file``) returns an id = the content hash."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from ...errors import InvalidRequest

router = APIRouter(prefix="/api", tags=["uploads"])
MAX_FILES = 8  # per multipart request (the OpenAI edits route takes up to 3 images + a mask)
MAX_FIELDS = 32


async def read_form(request: Request):
    """A multipart body with bounded parts (SECURITY 3: too many parts is refused, not parsed)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        from ..errors import UnsupportedMediaType

        raise UnsupportedMediaType("send the image as multipart/form-data")
    try:
        return await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS)
    except Exception as e:  # starlette raises its own MultiPartException/HTTPException for over-limit or bad bodies
        raise InvalidRequest(f"unreadable multipart body: {getattr(e, 'detail', None) or e}",
                             code="invalid_multipart") from None


async def save_upload(state, part, what: str) -> dict:
    if not hasattr(part, "read"):
        raise InvalidRequest(f"'{what}' must be a file part", code="invalid_image")
    data = await part.read()
    return await asyncio.to_thread(state.uploads.save, data, what)


@router.post("/uploads", status_code=201, summary="Upload an input image (PNG/JPEG/WebP) for edit jobs")
async def upload(request: Request):
    form = await read_form(request)
    files = form.getlist("file")
    if len(files) != 1:
        raise InvalidRequest("send exactly one file part named 'file'", code="invalid_multipart")
    return await save_upload(request.app.state, files[0], "file")


@router.get("/uploads/{upload_id}/settings", summary="The generation settings stored in an uploaded image")
async def upload_settings(request: Request, upload_id: str):
    """Read the settings an image carries — ours, A1111/Forge ``parameters``, SwarmUI ``sui_image_params``, a ComfyUI
    workflow (``qwenstudio.interop``) — as request fields, plus what could not be mapped (never guessed). The studio's
    "load from image" uses it; the image is one the client uploaded (validated by the upload store), never a path."""
    from ...interop import read_pasted_settings

    path = request.app.state.uploads.path(upload_id)
    s = await asyncio.to_thread(read_pasted_settings, path)
    fields = dict(s.fields)
    if s.info.get("compat") and "compat" not in fields:
        fields["compat"] = s.info["compat"]
    return {"source": s.source, "fields": fields, "unmapped": s.unmapped, "warnings": s.warnings}

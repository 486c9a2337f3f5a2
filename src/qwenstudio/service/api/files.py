"""Output files, served by id only (SECURITY.md 7, 8).

The client gives an opaque id; the store maps it to a name we generated; the file is opened with O_NOFOLLOW from
the outputs dir and must be a regular file. No client string is ever joined to a path.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..errors import NotFound

router = APIRouter(tags=["files"])
OUTPUT_ID = re.compile(r"[0-9a-f]{32}")
OUTPUT_NAME = re.compile(r"[0-9a-f]{32}\.png")
SERVE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cache-Control": "private, max-age=31536000, immutable",
}


def read_output(outputs_dir: Path, name: str) -> bytes:
    if not OUTPUT_NAME.fullmatch(name):
        raise NotFound("no such output", code="output_not_found")
    try:
        fd = os.open(outputs_dir / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise NotFound("no such output", code="output_not_found") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise NotFound("no such output", code="output_not_found")
        return f.read()


async def output_bytes(state, output_id: str) -> bytes:
    if not OUTPUT_ID.fullmatch(output_id):
        raise NotFound("no such output", code="output_not_found")
    name = await asyncio.to_thread(state.store.output_filename, output_id)
    if name is None:
        raise NotFound("no such output", code="output_not_found")
    return await asyncio.to_thread(read_output, state.outputs_dir, name)


@router.get("/api/outputs/{output_id}", summary="An output PNG by id", response_class=Response)
async def get_output(request: Request, output_id: str):
    data = await output_bytes(request.app.state, output_id)
    headers = {**SERVE_HEADERS, "Content-Disposition": f'inline; filename="{output_id}.png"'}
    return Response(data, media_type="image/png", headers=headers)


@router.get("/api/history", tags=["jobs"], summary="Finished outputs with their full reproducible metadata")
async def history(request: Request, limit: int = Query(50, ge=1, le=200), offset: int = Query(0, ge=0, le=10**9)):
    items, total = await asyncio.to_thread(request.app.state.store.history, limit, offset)
    for item in items:
        item["url"] = f"/api/outputs/{item['id']}"
    return {"items": items, "total": total, "limit": limit, "offset": offset}

"""The web studio: ``/`` is its page, ``/ui/<file>`` its static files (package data in ``qwenstudio/ui/static``).

The page only talks to the public HTTP API (so anything it does, a script can do). Files are served by a strict
name pattern from the package's own folder (no client string reaches a path beyond a checked basename), with their
real content type, ``nosniff`` and a CSP that allows only the page's own scripts/styles and images from
self/``data:``/``blob:``. The page and its files carry no data, so they are served without the API key: the page asks
for the key and sends it on every API call.
"""

from __future__ import annotations

import re
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from ..errors import NotFound

router = APIRouter(tags=["ui"], include_in_schema=False)
UI_FILE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}\.(html|js|css|svg|png|ico)")
CONTENT_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "css": "text/css; charset=utf-8", "svg": "image/svg+xml", "png": "image/png", "ico": "image/x-icon"}
UI_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
          "font-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
UI_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": UI_CSP, "Cache-Control": "no-cache",
              "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}


def ui_file(name: str) -> tuple[bytes, str]:
    if not UI_FILE.fullmatch(name):
        raise NotFound("no such file", code="not_found")
    entry = resources.files("qwenstudio").joinpath("ui", "static", name)
    if not entry.is_file():
        raise NotFound("no such file", code="not_found")
    return entry.read_bytes(), CONTENT_TYPES[name.rsplit(".", 1)[1]]


def _serve(name: str) -> Response:
    data, ctype = ui_file(name)
    return Response(data, media_type=ctype, headers=UI_HEADERS)


@router.get("/", summary="The web studio")
async def index():
    return _serve("index.html")


@router.get("/ui/{name}", summary="A static file of the web studio")
async def static_file(name: str):
    return _serve(name)

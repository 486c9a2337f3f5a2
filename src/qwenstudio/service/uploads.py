"""Uploaded input images, stored by content hash.

An upload is validated exactly as the engine validates input images (format sniffed from the bytes, PNG/JPEG/WebP
only, decompression-bomb and size limits) and kept as ``<sha256>.<format>`` — the id *is* the hash, so a job and its
stored request name inputs by the same reference the engine's metadata uses, a re-run finds the same bytes, and a
client never supplies a path: ids are checked to be 64 hex characters before they touch the filesystem.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..errors import InvalidRequest
from .errors import NotFound

_ID = re.compile(r"[0-9a-f]{64}")
FORMATS = ("png", "jpeg", "webp")


class UploadStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def save(self, data: bytes, what: str = "image") -> dict:
        """Validate and store; returns the public reference ``{"id", "width", "height", "format"}``."""
        from ..engine.images import load_image

        ref = load_image(data, what=what).ref  # raises InvalidRequest with a code for anything unsafe
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{ref.sha256}.{ref.format}"
        if not target.exists():
            fd, tmp = tempfile.mkstemp(prefix=".up-", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return {"id": ref.sha256, "width": ref.width, "height": ref.height, "format": ref.format}

    def path(self, upload_id: object) -> Path:
        if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
            raise InvalidRequest("an upload id is the 64-hex-digit id returned by POST /api/uploads",
                                 code="invalid_upload_id")
        for fmt in FORMATS:
            p = self.folder / f"{upload_id}.{fmt}"
            if p.is_file() and not p.is_symlink():
                return p
        raise NotFound(f"no upload '{upload_id}' (upload the image first)", code="upload_not_found")

    def ref(self, upload_id: object):
        """The engine's ImageRef for a stored upload (re-validated from the bytes on disk)."""
        from ..engine.images import load_image

        return load_image(self.path(upload_id), what="upload").ref

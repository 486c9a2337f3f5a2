"""Uploaded input images, stored by content hash.

An upload is validated exactly as the engine validates input images (format sniffed from the bytes, PNG/JPEG/WebP
only, decompression-bomb and size limits) and kept as ``<sha256>.<format>`` — the id *is* the hash, so a job and its
stored request name inputs by the same reference the engine's metadata uses, a re-run finds the same bytes, and a
client never supplies a path: ids are checked to be 64 hex characters before they touch the filesystem. It is the
server's ``ImageStore`` (engine/job.py): ``get`` re-hashes what it reads, so a file changed or removed after submit
fails the job with ``InputImageUnavailable`` instead of running on other pixels.

Uploads are bounded (SECURITY 34): one not used for ``ttl_s`` (a job using it refreshes it) is deleted at the next
upload, and past ``quota_bytes`` in all a new upload is refused with 507 ``upload_quota_exceeded`` (nothing a queued
job may still need is evicted to make room).
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

from ..errors import InvalidRequest
from .errors import NotFound, UploadQuotaExceeded

_ID = re.compile(r"[0-9a-f]{64}")
FORMATS = ("png", "jpeg", "webp")


class UploadStore:
    def __init__(self, folder: Path, *, quota_bytes: int | None = None, ttl_s: float | None = None):
        self.folder = Path(folder)
        self.quota_bytes, self.ttl_s = quota_bytes, ttl_s
        self._lock = threading.Lock()

    def expire(self) -> int:
        """Delete uploads unused for ``ttl_s``; return the bytes the rest take."""
        total = 0
        if not self.folder.is_dir():
            return 0
        cutoff = time.time() - self.ttl_s if self.ttl_s is not None else None
        for p in self.folder.iterdir():
            if not p.is_file() or p.is_symlink() or p.name.startswith("."):
                continue
            st = p.stat()
            if cutoff is not None and st.st_mtime < cutoff:
                p.unlink(missing_ok=True)
            else:
                total += st.st_size
        return total

    def save(self, data: bytes, what: str = "image") -> dict:
        """Validate and store; returns the public reference ``{"id", "width", "height", "format"}``."""
        from ..engine.images import load_image

        ref = load_image(data, what=what).ref  # raises InvalidRequest with a code for anything unsafe
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / f"{ref.sha256}.{ref.format}"
        with self._lock:
            used = self.expire()
            if target.exists():
                os.utime(target)
            elif self.quota_bytes is not None and used + len(data) > self.quota_bytes:
                raise UploadQuotaExceeded(f"the upload store is full ({used} of {self.quota_bytes} bytes); retry "
                                          "after older uploads expire")
            else:
                self._write(target, data)
        return {"id": ref.sha256, "width": ref.width, "height": ref.height, "format": ref.format}

    def _write(self, target: Path, data: bytes) -> None:
        if not target.exists():
            fd, tmp = tempfile.mkstemp(prefix=".up-", dir=self.folder)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

    def path(self, upload_id: object) -> Path:
        if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
            raise InvalidRequest("an upload id is the 64-hex-digit id returned by POST /api/uploads",
                                 code="invalid_upload_id")
        for fmt in FORMATS:
            p = self.folder / f"{upload_id}.{fmt}"
            if p.is_file() and not p.is_symlink():
                os.utime(p)  # in use: not expired while a job needs it
                return p
        raise NotFound(f"no upload '{upload_id}' (upload the image first)", code="upload_not_found")

    def get(self, content_id: str) -> bytes:
        """``ImageStore.get``: the bytes of an upload, verified against its id (a job's input at run time)."""
        from ..engine.job import verified

        try:
            data = self.path(content_id).read_bytes()
        except (NotFound, InvalidRequest, OSError):
            data = None
        return verified(content_id, data)

    def put(self, data: bytes) -> str:
        """``ImageStore.put``: validate and store; the content id."""
        return self.save(data)["id"]

    def ref(self, upload_id: object):
        """The engine's ImageRef for a stored upload (re-validated from the bytes on disk)."""
        from ..engine.images import load_image

        return load_image(self.path(upload_id), what="upload").ref

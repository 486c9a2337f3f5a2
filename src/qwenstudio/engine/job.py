"""The self-contained engine job: what crosses every ``EngineClient`` (in-process, multi-model, Ray replica, fake).

``EngineJob`` is the request as prepared before queueing, the model it must run on, and nothing else: its input
images are the request's own ``ImageRef``s (sha256 of the bytes), so a job is plain data — JSON round-trippable, the
same in the store, on the wire and in the engine — and never carries a file path. Bytes are resolved through an
``ImageStore`` (``get(content_id) -> bytes``, ``put(bytes) -> content_id``) that the client is given: the server's
upload folder, a dict of bytes shipped with a Ray call, or ``MemoryImageStore`` in tests. ``verified`` checks every
read against its id, so a file changed or deleted after submit is a typed ``InputImageUnavailable``, never a run on
another image.

``run_job`` is the one edit-or-generate dispatch; ``EngineResult`` the one result type every client returns (PIL
images with their metadata, timings, warnings; ``to_wire``/``from_wire`` ship it as PNG bytes + JSON-able data).

Why here (engine/, not service/): a replica process that imports only the engine must be able to run a job, and
the service may not know tensors — this module holds neither HTTP nor SQL, only the request types and bytes.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InputImageUnavailable, InvalidRequest

KINDS = ("generate", "edit")


class ImageStore(Protocol):
    def get(self, content_id: str) -> bytes:
        """The bytes whose sha256 is ``content_id``; ``InputImageUnavailable`` when they are gone or changed."""

    def put(self, data: bytes) -> str:
        """Keep ``data``; return its content id (sha256 hex)."""


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified(cid: str, data: bytes | None) -> bytes:
    """``data`` if it is the content ``cid`` names, else the typed error (missing: ``input_missing``; other bytes:
    ``input_changed``)."""
    if data is None:
        raise InputImageUnavailable(f"input image {cid[:12]}… is no longer stored; upload it again and resubmit",
                                    code="input_missing")
    if content_id(data) != cid:
        raise InputImageUnavailable(f"input image {cid[:12]}… changed after the job was submitted (its bytes no "
                                    "longer match the content id); upload it again and resubmit",
                                    code="input_changed")
    return data


class MemoryImageStore:
    """An ``ImageStore`` in a dict (tests; the bytes a Ray call ships to its replica). Reads are verified too."""

    def __init__(self, blobs: dict[str, bytes] | None = None):
        self._blobs: dict[str, bytes] = dict(blobs or {})
        self._lock = threading.Lock()

    def get(self, content_id: str) -> bytes:
        with self._lock:
            data = self._blobs.get(content_id)
        return verified(content_id, data)

    def put(self, data: bytes) -> str:
        cid = content_id(bytes(data))
        with self._lock:
            self._blobs[cid] = bytes(data)
        return cid

    def replace(self, content_id: str, data: bytes) -> None:
        """Overwrite the bytes under an id (tests of tamper detection: what a changed file on disk looks like)."""
        with self._lock:
            self._blobs[content_id] = bytes(data)

    def remove(self, content_id: str) -> None:
        with self._lock:
            self._blobs.pop(content_id, None)


@dataclass(frozen=True)
class EngineJob:
    """``request``: a GenerateRequest, or an EditRequest whose images/mask/controls are ``ImageRef``s."""

    id: str
    model: str
    request: Any

    @property
    def kind(self) -> str:
        return "edit" if hasattr(self.request, "controls") else "generate"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The content ids of the input images, in request order (images, mask, controls)."""
        r = self.request
        if self.kind != "edit":
            return ()
        refs = [*r.images, *([r.mask] if r.mask is not None else []), *(c.image for c in r.controls)]
        return tuple(ref.sha256 for ref in refs)

    def fetch(self, images: ImageStore) -> dict[str, bytes]:
        """The job's input bytes by content id, verified (what a remote client ships with the job)."""
        if self.inputs and images is None:
            raise InvalidRequest("this engine client has no image store for edit jobs", code="missing_image")
        return {cid: verified(cid, images.get(cid)) for cid in self.inputs}

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "model": self.model, "kind": self.kind, "request": self.request.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineJob:
        kind = data.get("kind", "generate")
        if kind not in KINDS:
            raise InvalidRequest(f"unknown job kind '{kind}'", code="invalid_job")
        if kind == "edit":
            from .editing import EditRequest

            request = EditRequest.from_dict(data["request"])
        else:
            from .requests import GenerateRequest

            request = GenerateRequest.from_dict(data["request"])
        return cls(str(data["id"]), str(data["model"]), request)


@dataclass
class EngineResult:
    """What every client returns: ``images`` (``GeneratedImage``: a PIL image + the metadata that re-creates it),
    the request as run, timings and the warnings of the run (also in each image's metadata as ``notes``)."""

    model: str
    images: list[Any]
    request: Any
    timings: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, model: str, result: Any) -> EngineResult:
        """From the engine's ``GenerateResult`` (latents stay behind: they never leave the engine)."""
        warnings: list[str] = []
        for img in result.images:
            for note in (img.metadata.get("notes") or []):
                if note not in warnings:
                    warnings.append(note)
        return cls(model, list(result.images), result.request, dict(result.timings or {}), warnings)

    def png(self, i: int) -> bytes:
        buf = io.BytesIO()
        self.images[i].image.save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    def to_wire(self) -> dict[str, Any]:
        """Plain data (lossless PNG bytes + metadata) for a process boundary."""
        request = self.request.to_dict() if hasattr(self.request, "to_dict") else self.request
        return {"model": self.model, "images": [{"png": self.png(i), "metadata": img.metadata}
                                                for i, img in enumerate(self.images)],
                "request": request, "timings": self.timings, "warnings": list(self.warnings)}

    @classmethod
    def from_wire(cls, payload: dict[str, Any]) -> EngineResult:
        from PIL import Image

        from .requests import GeneratedImage

        images = []
        for item in payload["images"]:
            im = Image.open(io.BytesIO(item["png"]))
            im.load()
            images.append(GeneratedImage(im, item["metadata"]))
        return cls(payload.get("model", ""), images, payload["request"], payload["timings"],
                   list(payload.get("warnings") or []))


def local_job(job_id: str, model: str, request: Any, *, images=(), mask=None, controls=()
              ) -> tuple[EngineJob, MemoryImageStore]:
    """An edit job for inputs given as files, bytes or PIL images (the CLI, notebooks): their bytes go into a
    ``MemoryImageStore`` and the request names them by content id. A request that already names its inputs (a
    stored one, ``--from-image``) must name these very bytes (``image_mismatch`` otherwise)."""
    from .editing import ControlRef, EditRequest, bind_inputs
    from .editing.run import Control
    from .images import load_image, read_source
    from .requests import GenerateRequest

    store = MemoryImageStore()

    def ref(source: Any, what: str, as_mask: bool = False):
        data = read_source(source, what=what)
        store.put(data)
        return load_image(data, what=what, mask=as_mask).ref

    controls = [c if isinstance(c, Control) else Control(**c) if isinstance(c, dict) else Control(c)
                for c in (controls or ())]
    refs = {"images": tuple(ref(x, f"image {i + 1}") for i, x in enumerate(images or ())),
            "mask": ref(mask, "mask", as_mask=True) if mask is not None else None,
            "controls": tuple(ControlRef(ref(c.image, f"control image {i + 1}"), c.mode, c.scale, c.start, c.end)
                              for i, c in enumerate(controls))}
    if not isinstance(request, EditRequest):
        data = request.to_dict() if isinstance(request, GenerateRequest) else dict(request)
        request = EditRequest.from_dict(data)
    return EngineJob(job_id, model, bind_inputs(request, refs)), store


def run_job(engine: Any, job: EngineJob, images: ImageStore | None, *, on_progress: Callable | None = None,
            preview_every: int = 0, should_stop: Callable[[], bool] | None = None,
            retry_fp32: bool = False) -> EngineResult:
    """The one edit-or-generate dispatch (every client, the CLI): an edit reads its inputs by content id
    (verified) and runs ``Engine.edit``; anything else runs ``Engine.generate``."""
    req = job.request
    if job.kind == "edit":
        from .editing import Control

        data = job.fetch(images)
        result = engine.edit(
            req, images=[data[r.sha256] for r in req.images],
            mask=data[req.mask.sha256] if req.mask is not None else None,
            controls=[Control(data[c.image.sha256], c.mode, c.scale, c.start, c.end) for c in req.controls],
            on_progress=on_progress, preview_every=preview_every, should_stop=should_stop, retry_fp32=retry_fp32)
    else:
        result = engine.generate(req, on_progress=on_progress, preview_every=preview_every, should_stop=should_stop,
                                 retry_fp32=retry_fp32)
    return EngineResult.of(job.model, result)

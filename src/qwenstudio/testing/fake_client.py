"""A model-free ``EngineClient`` for service tests: deterministic small images and realistic metadata, instantly.

The service (queue, store, SSE, OpenAI routes, auth, history) does not care how pixels are made, so its tests need
not load a model. ``FakeEngineClient`` resolves requests with the real request code (``GenerateRequest.resolve``
against the model's spec: defaults, bounds, ``settings_from``), sends a progress event per step (cancellable, like
the engine) and returns the real ``EngineResult`` of ``GeneratedImage``s whose metadata has the engine's shape
(request, model identity, seed, settings_from, timings). It takes the same ``EngineJob`` as every client and reads
an edit's inputs through its ``ImageStore`` by content id (verified: a changed upload fails the job, typed). Each
image is a flat colour derived from (model, prompt, seed): the same request gives the same pixels, another model or
seed gives others. Tests of the engine itself, and
of what a real model computes, keep using the tiny models (``qwenstudio.testing.tiny``).
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from ..engine.job import EngineJob, EngineResult, ImageStore, MemoryImageStore
from ..errors import Cancelled, ModelNotFound
from ..service.engine_client import EventCallback, LoadEvent, ModelInfo, StepEvent

__all__ = ["FakeEngineClient", "MemoryImageStore", "fake_colour"]  # MemoryImageStore: the in-memory ImageStore


def fake_colour(model: str, prompt: str, seed: int) -> tuple[int, int, int]:
    """The colour of a fake image: a function of exactly what should change it."""
    digest = hashlib.sha256(f"{model}\0{prompt}\0{seed}".encode()).digest()
    return digest[0], digest[1], digest[2]


class FakeEngineClient:
    """Serves ``models`` (ids; all of variant ``variant``). ``step_s`` makes each step take that long (for tests of
    cancel and queueing); ``load_s`` > 0 sends a ``loading`` event (the first job of each model) like a real
    multi-model client. Thread-safe; jobs run one at a time, like an engine."""

    def __init__(self, models: tuple[str, ...] = ("fake",), variant: str = "tiny", *, step_s: float = 0.0,
                 load_s: float = 0.0, images: ImageStore | None = None):
        self.ids, self.variant, self.step_s, self.load_s = tuple(models), variant, step_s, load_s
        self.images = images
        self.preset_lookup = None
        self.submitted: list[tuple[str, str]] = []  # (job id, model) in the order they ran
        self._loaded: set[str] = set()
        self._cancelled: set[str] = set()
        self._run_lock = threading.Lock()
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return True

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(m, self.variant, True, "fake model (qwenstudio.testing)", format="fake",
                          variant_reason="fake client", resident=m in self._loaded or not self.load_s)
                for m in self.ids]

    def _check(self, model: str) -> None:
        if model not in self.ids:
            raise ModelNotFound(f"model '{model}' is not served here; available: {', '.join(self.ids)}")

    def prepare(self, model: str, request: Any) -> Any:
        """The engine's own ``prepare`` (preset, recipes, variant defaults, bounds, ``settings_from``) against a
        model-less stand-in: no tokenizer (no token-limit check), no LoRA files."""
        from ..engine.prepare import prepare_request
        from ..engine.specs import get_spec

        self._check(model)
        return prepare_request(_SpecOnly(get_spec(self.variant), self.preset_lookup), request)

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0) -> EngineResult:
        from PIL import Image

        from ..engine.requests import GeneratedImage

        job_id, model, request = job.id, job.model, job.request
        self._check(model)
        with self._run_lock:
            if self.load_s and model not in self._loaded:
                on_event(LoadEvent(model, "start"))
                for fraction in (0.5, 1.0):
                    time.sleep(self.load_s / 2)
                    on_event(LoadEvent(model, "progress", fraction=fraction))
                self._loaded.add(model)
                on_event(LoadEvent(model, "done", self.load_s))
            inputs = job.fetch(self.images)  # by content id, verified, as a real client reads them
            req = request if request.is_prepared else self.prepare(model, request)
            self.submitted.append((job_id, model))
            started = time.perf_counter()
            try:
                for step in range(1, req.steps + 1):
                    if self.step_s:
                        time.sleep(self.step_s)
                    with self._lock:
                        stop = job_id in self._cancelled
                    if stop or on_event(StepEvent(step, req.steps, time.perf_counter() - started)) is False:
                        raise Cancelled("cancelled")
            finally:
                with self._lock:
                    self._cancelled.discard(job_id)
            total = time.perf_counter() - started
            images = []
            for i in range(req.batch or 1):
                single = req.for_image(i)
                img = Image.new("RGB", (req.width, req.height), fake_colour(model, req.prompt, single.seed))
                images.append(GeneratedImage(img, {
                    "generator": "qwenstudio fake client",
                    "request": single.to_dict(),
                    "model": {"name": model, "variant": self.variant, "format": "fake", "device": "none"},
                    "seed": single.seed, "noise": single.noise, "loras": [],
                    "settings_from": dict(req.settings_from or {}),
                    "timings": {"total": round(total, 4)},
                    **({"edit": {"inputs": len(req.images), "content_ids": list(inputs)}} if inputs else {}),
                }))
            return EngineResult(model, images, req, {"total": total, "steps": []})

    def cancel(self, job_id: str) -> None:
        with self._lock:
            self._cancelled.add(job_id)

    def close(self) -> None:
        pass


class _SpecOnly:
    """What ``engine.prepare.prepare_request`` needs of an engine, without weights."""

    def __init__(self, spec: Any, preset_lookup: Any):
        self.spec, self.preset_lookup = spec, preset_lookup

    def check_request(self, req: Any, original: Any = None) -> Any:
        req.validate(self.spec)
        return req

    def lora_path(self, name: str):
        raise ModelNotFound(f"no LoRA named '{name}' (the fake client has none)", code="lora_not_found")

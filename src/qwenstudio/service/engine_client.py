"""The one seam between the service and the engine (after vLLM v1's EngineCoreClient).

The service calls ``submit(job, on_event, preview_every)`` from its job worker and blocks until the result: ``job`` is
a self-contained ``EngineJob`` (engine/job.py: the prepared request, its model, its input images by content id),
resolved through the ``ImageStore`` the client is given (``images``; ``create_app`` hands it the upload store), and
the result is an ``EngineResult``. Progress arrives through ``on_event``, whose ``False`` return stops the run at the
next step. ``InProcessEngineClient`` runs the engine on one dedicated
thread that owns it (loads it, runs every generation); a process or Ray client only has to implement the same three
methods plus ``ready``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ..engine.job import EngineJob, EngineResult, ImageStore, run_job
from ..errors import ModelNotFound, QwenStudioError


@dataclass(frozen=True)
class ModelInfo:
    id: str  # the name clients pass as "model"
    variant: str  # the spec whose bounds and defaults apply
    ready: bool
    description: str = ""
    format: str = ""  # diffusers | safetensors | gguf (how the weights are stored)
    variant_reason: str = ""  # why this variant (identity.Identity.reason)
    resident: bool | None = None  # loaded now (a multi-model client loads the others on demand)


@dataclass(frozen=True)
class StepEvent:
    """One denoising step done; ``preview`` is a uint8 [B, h, w, 3] array or None."""

    step: int
    total: int
    elapsed: float
    preview: Any = None


@dataclass(frozen=True)
class LoadEvent:
    """The job's model is being loaded: ``phase`` "start", then "progress" (``fraction`` of its bytes filled in, from
    the loader), then "done" (with the seconds it took and the models evicted to make room). A multi-model client
    sends them before the job's first step."""

    model: str
    phase: str
    seconds: float | None = None
    evicted: tuple[str, ...] = ()
    fraction: float | None = None


EventCallback = Callable[[Any], Any]  # a StepEvent (return False to cancel) or a LoadEvent


class EngineClient(Protocol):
    images: ImageStore | None  # where input images are read by content id

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0) -> EngineResult:
        """Run ``job`` (its prepared request, on ``job.model``; an edit's inputs read from ``images``); block;
        return the EngineResult."""

    def prepare(self, model: str, request: Any) -> Any:
        """Validate and resolve a request before queueing; raise the typed error a client should see."""

    def cancel(self, job_id: str) -> None:
        """Ask the running job to stop at its next step (no-op when it is not running)."""

    def models(self) -> list[ModelInfo]: ...

    @property
    def ready(self) -> bool: ...

    def close(self) -> None: ...


class InProcessEngineClient:
    """An engine loaded in this process, owned by one worker thread. ``loader`` runs on that thread at start."""

    def __init__(self, model_id: str, variant: str, loader: Callable[[], Any], description: str = "",
                 images: ImageStore | None = None):
        self._model_id, self._variant, self._description = model_id, variant, description
        self.images = images
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwenstudio-engine")
        self._engine: Any = None
        self._load_error: BaseException | None = None
        self._cancelled: set[str] = set()
        self._running: str | None = None
        self._lock = threading.Lock()
        self.preset_lookup: Callable[[str], dict] | None = None  # set by create_app: presets by name, from the store
        self._loaded: Future = self._pool.submit(self._load, loader)

    @classmethod
    def from_engine(cls, engine: Any, model_id: str | None = None) -> InProcessEngineClient:
        """Wrap an already loaded Engine (tests, notebooks)."""
        return cls(model_id or engine.spec.name, engine.spec.name, lambda: engine, engine.spec.description)

    def _load(self, loader: Callable[[], Any]) -> None:
        try:
            self._engine = loader()
        except Exception as e:
            logging.getLogger("qwenstudio.service").exception("loading the model failed")
            self._load_error = e

    @property
    def ready(self) -> bool:
        return self._loaded.done() and self._engine is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._loaded.result(timeout)
        return self.ready

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(self._model_id, self._variant, self.ready, self._description, resident=self.ready)]

    def submit(self, job: EngineJob, on_event: EventCallback, preview_every: int = 0) -> EngineResult:
        if job.model != self._model_id:
            raise ModelNotFound(f"model '{job.model}' is not served here; available: {self._model_id}")
        return self._pool.submit(self._run, job, on_event, preview_every).result()

    def _run(self, job: EngineJob, on_event: EventCallback, preview_every: int) -> EngineResult:
        job_id = job.id
        if self._engine is None:
            if isinstance(self._load_error, QwenStudioError):
                raise self._load_error
            raise QwenStudioError("the model failed to load; see the server log", code="model_load_failed")

        def should_stop() -> bool:  # checked inside every long stage (engine/stopping.py), not only per step
            with self._lock:
                return job_id in self._cancelled

        with self._lock:
            self._running = job_id
        self._engine.preset_lookup = self.preset_lookup
        try:
            return run_on_engine(self._engine, job, self.images, on_event, preview_every, should_stop)
        finally:
            with self._lock:
                self._cancelled.discard(job_id)
                self._running = None

    def prepare(self, model: str, request: Any) -> Any:
        """Validate and resolve a request before it is queued (bounds, LoRA names and recipes, token limits).
        Until the model is loaded only the spec-level checks can run; the rest happen when the job starts."""
        if model != self._model_id:
            raise ModelNotFound(f"model '{model}' is not served here; available: {self._model_id}")
        if self._engine is not None:
            self._engine.preset_lookup = self.preset_lookup
            return self._engine.prepare(request)
        # Not loaded yet: check what the user gave; the worker prepares the job (LoRA recipes need the engine)
        # when it runs it. Filling the variant's defaults here would hide a Lightning LoRA's recipe.
        from ..engine.fields import check_bounds

        check_bounds(request.__dict__, [k for k, v in request.__dict__.items() if v is not None])
        return request

    def cancel(self, job_id: str) -> None:
        with self._lock:
            if job_id == self._running:  # remember only the running one: no growth from stale cancels
                self._cancelled.add(job_id)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def run_on_engine(engine: Any, job: EngineJob, images: ImageStore | None, on_event: EventCallback,
                  preview_every: int, should_stop: Callable[[], bool]) -> EngineResult:
    """``engine.job.run_job`` with the engine's progress turned into ``StepEvent``s for ``on_event``."""

    def on_progress(p) -> bool:
        if should_stop():
            return False
        return on_event(StepEvent(p.step, p.total, p.elapsed, p.preview)) is not False

    return run_job(engine, job, images, on_progress=on_progress, preview_every=preview_every,
                   should_stop=should_stop)

"""Bounded job queue and the one worker that feeds the engine client.

Why a hand-made queue (deque + condition) and not ``queue.Queue``: a queued job must be removable on cancel, and the
queue bound must be checked and the job inserted atomically so concurrent submitters can neither overfill it nor
lose a job. Events (queued position, progress, previews, terminal state) are appended to a per-job log that SSE
readers and waiting callers follow from asyncio through ``subscribe``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, QwenStudioError
from .config import ServiceConfig
from .engine_client import EngineClient, StepEvent
from .errors import Conflict, NotFound, OutputWriteFailed, QueueFull, ServiceUnavailable, redact_paths
from .metrics import Metrics
from .store import Store

log = logging.getLogger("qwenstudio.service")

TERMINAL_EVENTS = ("done", "failed", "cancelled")
KEEP_FINISHED = 256  # finished jobs whose event log stays in memory for late SSE readers


@dataclass
class Job:
    """In-memory state of a live (or recently finished) job; the store holds the durable record."""

    id: str
    model: str
    request: Any  # resolved GenerateRequest (an EditRequest for edits)
    preview_every: int
    inputs: dict | None = None  # edits: upload paths for Engine.edit (images, mask, controls)
    events: list[dict] = field(default_factory=list)
    cancel_reason: str | None = None  # user | disconnect | shutdown | deadline
    finished: threading.Event = field(default_factory=threading.Event)
    _subscribers: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, event: str, data: dict) -> None:
        with self._lock:
            self.events.append({"event": event, "data": data})
            subs = list(self._subscribers)
        for loop, flag in subs:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is gone
                pass

    def subscribe(self) -> asyncio.Event:
        flag = asyncio.Event()
        with self._lock:
            self._subscribers.add((asyncio.get_running_loop(), flag))
        return flag

    def unsubscribe(self, flag: asyncio.Event) -> None:
        with self._lock:
            self._subscribers = {s for s in self._subscribers if s[1] is not flag}

    @property
    def terminal(self) -> dict | None:
        with self._lock:
            return self.events[-1] if self.events and self.events[-1]["event"] in TERMINAL_EVENTS else None


class JobManager:
    def __init__(self, store: Store, client: EngineClient, outputs_dir: Path, config: ServiceConfig, metrics: Metrics):
        self.store, self.client, self.outputs_dir, self.config, self.metrics = (
            store, client, outputs_dir, config, metrics)
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="qwenstudio-jobs", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs, cancel queued and running ones, wait for the worker (bounded), leave the store
        consistent. Called on SIGTERM through the app's lifespan."""
        with self._cond:
            self._accepting = False
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        for job in queued:
            self._finish_cancelled(job, "shutdown")
        if running is not None:
            running.cancel_reason = "shutdown"
            self.client.cancel(running.id)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(self.config.shutdown_grace_s if grace_s is None else grace_s)

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopping

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return 1 if self._running is not None else 0

    # ---- API -----------------------------------------------------------------------------------------------
    def submit(self, model: str, request: Any, preview_every: int = 0, inputs: dict | None = None) -> Job:
        """Queue a validated, resolved request; raise QueueFull (429) at the bound."""
        job = Job(uuid.uuid4().hex, model, request, preview_every, inputs)
        with self._cond:
            if not self.accepting:
                raise ServiceUnavailable("the server is shutting down; retry on another instance")
            if len(self._queue) >= self.config.queue_size:
                self.metrics.job_rejected(QueueFull.code)
                raise QueueFull(
                    f"the queue is full ({self.config.queue_size} jobs waiting); retry later",
                    retry_after=self.config.retry_after_s,
                )
            self.store.insert_job(job.id, model, request.to_dict())
            self._queue.append(job)
            self._remember(job)
            position = len(self._queue)
            self.metrics.job_submitted()
            self._cond.notify_all()
        job.publish("queued", {"job_id": job.id, "position": position})
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def cancel(self, job_id: str, reason: str = "user") -> str:
        """Cancel a queued job now, or ask the running one to stop at its next step. Returns the status after."""
        with self._cond:
            queued = next((j for j in self._queue if j.id == job_id), None)
            if queued is not None:
                self._queue.remove(queued)
            running = self._running if self._running is not None and self._running.id == job_id else None
        if queued is not None:
            self._finish_cancelled(queued, reason)
            self._publish_positions()
            return "cancelled"
        if running is not None:
            running.cancel_reason = running.cancel_reason or reason
            self.client.cancel(job_id)
            return "cancelling"
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"no job '{job_id}'", code="job_not_found")
        raise Conflict(f"job '{job_id}' already finished ({row['status']})", code="job_finished")

    def delete(self, job_id: str) -> None:
        """Delete a finished (or queued) job and only its own files, by the names the store recorded."""
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"no job '{job_id}'", code="job_not_found")
        if row["status"] == "queued":
            try:
                self.cancel(job_id)
            except Conflict:
                pass
        elif row["status"] == "running":
            raise Conflict("the job is running; cancel it first", code="job_active")
        for name in self.store.delete_job(job_id):
            (self.outputs_dir / name).unlink(missing_ok=True)
        with self._cond:
            self._jobs.pop(job_id, None)

    # ---- worker --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._queue.popleft()
                self._running = job
            try:
                self._publish_positions()
                if self.store.mark_running(job.id):
                    self._run(job)
            except BaseException:  # the worker must survive anything one job does
                log.exception("job %s: unexpected error in the worker", job.id)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        deadline = started + self.config.job_deadline_s
        job.publish("started", {"job_id": job.id})
        last_write = [0.0]
        steps_seen = [0, 0.0]  # steps, seconds between first and last step

        def on_event(ev: StepEvent) -> bool:
            now = time.monotonic()
            if job.cancel_reason is not None:
                return False
            if now > deadline:
                job.cancel_reason = "deadline"
                return False
            steps_seen[0] = ev.step
            steps_seen[1] = now - started
            eta = ev.elapsed / ev.step * (ev.total - ev.step) if ev.step else None
            job.publish("progress", {"step": ev.step, "total": ev.total, "elapsed": round(ev.elapsed, 4),
                                     "eta": None if eta is None else round(eta, 4)})
            if ev.preview is not None:
                job.publish("preview", {"step": ev.step, "images": [_png_b64(a) for a in ev.preview]})
            if now - last_write[0] > 0.5 or ev.step == ev.total:
                last_write[0] = now
                self.store.set_progress(job.id, ev.step, ev.total)
            return True

        try:
            result = self.client.submit(job.id, job.model, job.request, on_event, job.preview_every, job.inputs)
            outputs = self._write_outputs(result)
        except Cancelled:
            reason = job.cancel_reason or "user"
            if reason == "deadline":
                self._finish_failed(job, "deadline_exceeded",
                                    f"the job ran past its deadline of {self.config.job_deadline_s:g} s and was "
                                    "cancelled; use fewer steps or a smaller size", started)
            else:
                self._finish_cancelled(job, reason, started)
            return
        except QwenStudioError as e:
            self._finish_failed(job, e.code, redact_paths(e.message), started)
            return
        except Exception:
            log.exception("job %s failed", job.id)
            self._finish_failed(job, "internal_error", "the job failed with an internal error; see the server log",
                                started)
            return
        self.store.finish_job(job.id, "done", outputs=outputs)
        self.store.set_progress(job.id, steps_seen[0], steps_seen[0])
        step_s = sum(result.timings.get("steps", []) or []) if isinstance(result.timings, dict) else 0.0
        self.metrics.job_finished("done", time.monotonic() - started, steps=len(result.timings.get("steps", [])),
                                  step_seconds=step_s)
        job.publish("done", {"job_id": job.id, "outputs": [
            {"id": oid, "url": f"/api/outputs/{oid}", "metadata": meta} for oid, _, _, meta in outputs]})
        self._retire(job)

    def _write_outputs(self, result: Any) -> list[tuple[str, int, str, dict]]:
        """Save every image atomically under a random name; on any failure remove this job's files and fail."""
        from ..outputs import save_png

        written: list[tuple[str, int, str, dict]] = []
        try:
            for i, img in enumerate(result.images):
                name = secrets.token_hex(16) + ".png"
                save_png(img.image, img.metadata, self.outputs_dir / name)
                written.append((secrets.token_hex(16), i, name, img.metadata))
        except OSError:
            for _, _, name, _ in written:
                (self.outputs_dir / name).unlink(missing_ok=True)
            raise OutputWriteFailed("could not write the output image (disk full or outputs dir not writable)")
        return written

    # ---- helpers -------------------------------------------------------------------------------------------
    def _finish_cancelled(self, job: Job, reason: str, started: float | None = None) -> None:
        self.store.finish_job(job.id, "cancelled", error=("cancelled", f"cancelled ({reason})"))
        self.metrics.job_finished("cancelled", time.monotonic() - started if started else 0.0)
        job.publish("cancelled", {"job_id": job.id, "reason": reason})
        self._retire(job)

    def _finish_failed(self, job: Job, code: str, message: str, started: float) -> None:
        self.store.finish_job(job.id, "failed", error=(code, message))
        self.metrics.job_finished("failed", time.monotonic() - started, code=code)
        job.publish("failed", {"job_id": job.id, "error": {"code": code, "message": message}})
        self._retire(job)

    def _publish_positions(self) -> None:
        with self._cond:
            queued = list(self._queue)
        for pos, j in enumerate(queued, 1):
            j.publish("queued", {"job_id": j.id, "position": pos})

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEEP_FINISHED + self.config.queue_size + 1:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if oldest.terminal is None:
                break
            self._jobs.pop(oldest_id)

    def _retire(self, job: Job) -> None:
        """Drop preview payloads from a finished job's log, in place (readers hold indexes into it)."""
        with job._lock:
            for e in job.events:
                if e["event"] == "preview":
                    e["data"] = {"step": e["data"]["step"], "images": []}
        job.finished.set()


def _png_b64(array: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

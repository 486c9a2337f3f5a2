"""``JobManager``: the job API of the service (submit, follow, cancel, delete) and its lifecycle (register, start,
SIGTERM), with its roles in their own modules: ``events`` (the per-job event log), ``job_queue`` (store rows: claim,
lease, liveness), ``worker`` (runs claimed jobs through the EngineClient), ``watcher`` (heartbeat, leases, jobs other
workers run).

The queue lives in the store (SQLite or PostgreSQL): ``submit`` inserts a queued row (bound checked in the same
transaction) and the worker ``claim_next``-s the oldest one atomically, so several JobManagers (threads, processes,
nodes on one PostgreSQL store) share the queue and run each job exactly once (SECURITY 26). A job submitted here is also
kept in memory with a per-job event log (queued position, progress, previews, terminal state) that SSE readers and
waiting callers follow from asyncio through ``subscribe``: in one process the worker publishes straight into it (no
polling on the fast path); a job another worker runs is followed from the store by a watcher thread, which also
heartbeats this worker and marks running jobs of dead workers failed "interrupted".
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..engine.job import EngineJob
from .config import ServiceConfig
from .engine_client import EngineClient
from .errors import Conflict, NotFound, QueueFull, ServiceUnavailable
from .events import TERMINAL_EVENTS, Job, terminal_event
from .metrics import Metrics
from .scheduling import ModelAffinity
from .store import Store
from .watcher import STALE_S, Watcher
from .worker import Worker

__all__ = ["KEEP_FINISHED", "TERMINAL_EVENTS", "Job", "JobManager", "terminal_event"]

log = logging.getLogger("qwenstudio.service")

KEEP_FINISHED = 256  # finished jobs whose event log stays in memory for late SSE readers


class JobManager(Worker, Watcher):
    """One per app. ``worker=False`` makes an API-only manager (it queues and follows jobs; workers elsewhere run
    them). Several managers may share one store; each job is claimed by exactly one of them."""

    def __init__(self, store: Store, client: EngineClient, outputs_dir: Path, config: ServiceConfig, metrics: Metrics,
                 uploads: Any = None, *, worker: bool = True, worker_id: str | None = None):
        self.store, self.client, self.outputs_dir, self.config, self.metrics = (
            store, client, outputs_dir, config, metrics)
        self.uploads = uploads
        self.host = socket.gethostname()
        self.worker_id = (worker_id or f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}") if worker else None
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._wake = False
        self._accepting = True
        self._stopping = False
        self._halt = threading.Event()
        self._shutdown_started: float | None = None
        self._thread = threading.Thread(target=self._work, name="qwenstudio-jobs", daemon=True) if worker else None
        self.affinity = ModelAffinity(config.affinity_max_consecutive, config.affinity_max_wait_s)
        self._watcher = threading.Thread(target=self._watch, name="qwenstudio-jobs-watch", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def register(self) -> int:
        """Join the store (as a worker unless API-only) and mark jobs that dead workers left active failed
        "interrupted"; returns how many. Called once, before serving."""
        return self.store.register_worker(self.worker_id, self.host, os.getpid(), STALE_S)

    def start(self) -> None:
        self.outputs_dir.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files()  # left by a crash (kill -9 mid-write)
        if self._thread is not None:
            self._thread.start()
        self._watcher.start()

    def begin_shutdown(self) -> None:
        """Refuse new jobs and ask the running one to stop at its next check; cheap enough for a signal handler
        (no store access). ``stop`` does the rest."""
        if self._shutdown_started is None:
            self._shutdown_started = time.monotonic()
        self._accepting = False
        running = self._running
        if running is not None:
            running.cancel_reason = running.cancel_reason or "shutdown"
            self.client.cancel(running.id)

    def remove_temp_files(self) -> int:
        """Half-written outputs (``.tmp-*``) and uploads (``.up-*``): never anyone's file, safe to drop."""
        n = 0
        folders = [self.outputs_dir] + ([self.uploads.folder] if getattr(self.uploads, "folder", None) else [])
        for folder in folders:
            for p in (folder.glob(".tmp-*") if folder.is_dir() else ()):
                idle = self._running is None or time.time() - p.stat().st_mtime > 60  # not the running job's write
                if p.is_file() and not p.is_symlink() and idle:
                    p.unlink(missing_ok=True)
                    n += 1
            for p in (folder.glob(".up-*") if folder.is_dir() else ()):
                if p.is_file() and time.time() - p.stat().st_mtime > 60:
                    p.unlink(missing_ok=True)
                    n += 1
        return n

    def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs, cancel the queued ones submitted here and the running one, wait for the worker
        (bounded by what is left of the grace since ``begin_shutdown``), leave the store consistent: a job still
        running when the grace is over is recorded ``cancelled (shutdown)`` and its late result is never
        written (the lease). Called on SIGTERM through the app's lifespan."""
        self.begin_shutdown()
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        with self._cond:
            self._accepting = False
            mine = [j for j in self._jobs.values() if j.terminal is None]
            running = self._running
        for job in mine:
            if job is not running and self.store.cancel_queued(job.id, "shutdown"):
                self.metrics.job_finished("cancelled", 0.0)
                self._publish_cancelled(job, "shutdown")
        if running is not None:
            running.cancel_reason = running.cancel_reason or "shutdown"
            self.client.cancel(running.id)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(max(0.5, grace - (time.monotonic() - self._shutdown_started)))
        with self._cond:
            late = self._running
        if late is not None and self._thread is not None and self._thread.is_alive():
            log.warning("job %s did not stop within the shutdown grace; recorded cancelled (shutdown)", late.id)
            self.store.finish_owned(late.id, self.worker_id, "cancelled", error=("cancelled", "cancelled (shutdown)"))
        self.remove_temp_files()
        self._halt.set()
        if self._watcher.is_alive():
            self._watcher.join(5)
        if self.worker_id is not None:
            try:
                self.store.unregister_worker(self.worker_id)
            except Exception:  # noqa: BLE001 (the store may already be closed by a failed start)
                log.warning("could not unregister worker %s", self.worker_id)

    @property
    def accepting(self) -> bool:
        return self._accepting and not self._stopping

    @property
    def queue_depth(self) -> int:
        """Jobs waiting in the (shared) store queue."""
        return self.store.count_queued()

    @property
    def running_count(self) -> int:
        return 1 if self._running is not None else 0

    # ---- API -----------------------------------------------------------------------------------------------
    def submit(self, model: str, request: Any, preview_every: int = 0) -> Job:
        """Queue a validated, resolved request; raise QueueFull (429) at the bound."""
        self._check_caps(request)
        job = Job(uuid.uuid4().hex, model, request, preview_every)
        options = {"preview_every": preview_every, "kind": EngineJob(job.id, model, request).kind}
        with self._cond:
            if not self.accepting:
                raise ServiceUnavailable("the server is shutting down; retry on another instance")
            position = self.store.insert_job(job.id, model, request.to_dict(), options=options,
                                             max_queued=self.config.queue_size)
            if position is None:
                self.metrics.job_rejected(QueueFull.code)
                raise QueueFull(
                    f"the queue is full ({self.config.queue_size} jobs waiting); retry later",
                    retry_after=self.config.retry_after_s,
                )
            self._remember(job)
            self.metrics.job_submitted()
            job.position = position
            job.publish("queued", {"job_id": job.id, "position": position})  # before any worker can claim it
            self._wake = True
            self._cond.notify_all()
        return job

    def _check_caps(self, request: Any) -> None:
        """The operator's caps (ServiceConfig.max_steps/max_pixels/max_batch), on the resolved request."""
        from ..errors import InvalidRequest

        c = self.config
        if c.max_steps is not None and (request.steps or 0) > c.max_steps:
            raise InvalidRequest(f"steps {request.steps} is over this server's limit of {c.max_steps}",
                                 code="invalid_steps")
        if c.max_batch is not None and (request.batch or 1) > c.max_batch:
            raise InvalidRequest(f"batch {request.batch} is over this server's limit of {c.max_batch}",
                                 code="invalid_batch")
        if c.max_pixels is not None and (request.width or 0) * (request.height or 0) > c.max_pixels:
            raise InvalidRequest(f"{request.width}x{request.height} is over this server's limit of {c.max_pixels} "
                                 "pixels", code="invalid_size")

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._jobs.get(job_id)

    def follow(self, job_id: str) -> Job | None:
        """The in-memory job to stream events from: a job of this process, or one queued/run by another process
        (followed from the store from now on). None when the job is unknown or finished and not in memory."""
        job = self.get(job_id)
        if job is not None:
            return job
        row = self.store.get_job(job_id)
        if row is None or row["status"] not in ("queued", "running"):
            return None
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None:
                job = Job(job_id, row["model"], None, 0)
                self._remember(job)
        self._follow_foreign([job])
        return job

    def cancel(self, job_id: str, reason: str = "user") -> str:
        """Cancel a queued job now, or ask the running one (here or in another worker process) to stop at its next
        step. Returns the status after."""
        if self.store.cancel_queued(job_id, reason):
            job = self.get(job_id)
            self.metrics.job_finished("cancelled", 0.0)
            if job is not None:
                self._publish_cancelled(job, reason)
            self._publish_positions()
            return "cancelled"
        with self._cond:
            running = self._running if self._running is not None and self._running.id == job_id else None
        if running is not None:
            running.cancel_reason = running.cancel_reason or reason
            self.client.cancel(job_id)
            return "cancelling"
        row = self.store.get_job(job_id)
        if row is None:
            raise NotFound(f"no job '{job_id}'", code="job_not_found")
        if row["status"] == "running" and self.store.request_cancel(job_id):
            return "cancelling"
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
            row = self.store.get_job(job_id)
        if row is not None and row["status"] == "running":
            raise Conflict("the job is running; cancel it first", code="job_active")
        for name in self.store.delete_job(job_id):
            (self.outputs_dir / name).unlink(missing_ok=True)
        with self._cond:
            self._jobs.pop(job_id, None)

    def _publish_cancelled(self, job: Job, reason: str) -> None:
        job.publish("cancelled", {"job_id": job.id, "reason": reason})
        self._retire(job)

    def _publish_positions(self) -> None:
        ids = self.store.queued_ids()
        with self._cond:
            local = [(pos, self._jobs.get(jid)) for pos, jid in enumerate(ids, 1)]
        for pos, j in local:
            if j is not None and j.position != pos:
                j.position = pos
                j.publish("queued", {"job_id": j.id, "position": pos})

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > KEEP_FINISHED + self.config.queue_size + 1:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if oldest.terminal is None:
                break
            self._jobs.pop(oldest_id)

    def _retire(self, job: Job) -> None:
        """A finished job keeps its outcome, not its previews."""
        job.drop_previews()
        job.finished.set()

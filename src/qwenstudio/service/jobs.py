"""The job queue (rows in the store) and the worker that feeds the engine client.

The queue lives in the store (SQLite or PostgreSQL): ``submit`` inserts a queued row (bound checked in the same
transaction) and the worker ``claim_next``-s the oldest one atomically, so several JobManagers (threads, processes,
nodes on one PostgreSQL store) share the queue and run each job exactly once (SECURITY 26). A job submitted here is also
kept in memory with a per-job event log (queued position, progress, previews, terminal state) that SSE readers and
waiting callers follow from asyncio through ``subscribe``: in one process the worker publishes straight into it (no
polling on the fast path); a job another worker runs is followed from the store by a watcher thread, which also
heartbeats this worker and marks running jobs of dead workers failed "interrupted".
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.job import EngineJob
from ..errors import Cancelled, QwenStudioError
from .config import ServiceConfig
from .engine_client import EngineClient, LoadEvent, StepEvent
from .errors import Conflict, NotFound, OutputWriteFailed, QueueFull, ServiceUnavailable, redact_paths
from .metrics import Metrics
from .scheduling import ModelAffinity
from .store import Store

log = logging.getLogger("qwenstudio.service")

TERMINAL_EVENTS = ("done", "failed", "cancelled")
KEEP_FINISHED = 256  # finished jobs whose event log stays in memory for late SSE readers
POLL_S = 0.25  # idle worker: how often it looks for jobs other processes queued; watcher tick
HEARTBEAT_S = 1.0
STALE_S = 10.0  # a worker silent this long (or whose pid is gone, same host) is dead
REAP_EVERY_S = 5.0
CANCEL_CHECK_S = 0.25  # running job: how often the store's cross-process cancel flag is read


@dataclass
class Job:
    """In-memory state of a live (or recently finished) job; the store holds the durable record."""

    id: str
    model: str
    request: Any  # resolved GenerateRequest (an EditRequest, inputs by content id, for edits); None for a job
    # followed from the store; the typed error when a stored job cannot be rebuilt
    preview_every: int
    events: list[dict] = field(default_factory=list)
    cancel_reason: str | None = None  # user | disconnect | shutdown | deadline
    finished: threading.Event = field(default_factory=threading.Event)
    position: int | None = None  # last published queue position
    seen: tuple = ()  # (status, step) last published by the watcher for a job another worker runs
    deadline: float | None = None  # monotonic; set when the job starts running here
    lease_renewed: float | None = None  # monotonic time of this worker's last lease renewal
    _subscribers: set = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, event: str, data: dict) -> bool:
        """Append an event and wake readers. Nothing is appended after a terminal event (the worker and the
        watcher may both report an outcome; the first one wins)."""
        with self._lock:
            if self.events and self.events[-1]["event"] in TERMINAL_EVENTS:
                return False
            self.events.append({"event": event, "data": data})
            subs = list(self._subscribers)
        for loop, flag in subs:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # that event loop is gone
                pass
        return True

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

    def drop_previews(self) -> None:
        """Drop preview payloads from the event log, in place (readers hold indexes into it)."""
        with self._lock:
            for e in self.events:
                if e["event"] == "preview":
                    e["data"] = {"step": e["data"]["step"], "images": []}


def terminal_event(row: dict) -> tuple[str, dict]:
    """The outcome event of a finished job, from its store row (same shapes the worker publishes)."""
    status, job_id = row["status"], row["id"]
    if status == "done":
        return "done", {"job_id": job_id, "outputs": [
            {"id": o["id"], "url": f"/api/outputs/{o['id']}", "metadata": o["metadata"]} for o in row["outputs"]]}
    if status == "cancelled":
        msg = row.get("error_message") or ""
        reason = msg[len("cancelled ("):-1] if msg.startswith("cancelled (") and msg.endswith(")") else msg
        return "cancelled", {"job_id": job_id, "reason": reason or "user"}
    return "failed", {"job_id": job_id, "error": {"code": row.get("error_code") or "unknown",
                                                  "message": row.get("error_message") or f"job is {status}"}}


class JobManager:
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

    # ---- worker --------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._wake = False
                accepting = self._accepting
            row = None
            if accepting:
                try:
                    row = self._claim()
                except Exception:
                    log.exception("claiming a job failed")
            if row is None:
                with self._cond:
                    if not self._wake and not self._stopping:
                        self._cond.wait(POLL_S)
                continue
            with self._cond:
                job = self._jobs.get(row["id"])
                if job is None or job.request is None:  # queued by another process: rebuild it from the row
                    job = self._adopt(row, job)
                self._running = job
                if not self._accepting:  # stop() began between the claim and now
                    job.cancel_reason = "shutdown"
            try:
                self._publish_positions()
                self._run(job)
            except BaseException:  # the worker must survive anything one job does
                log.exception("job %s: unexpected error in the worker", job.id)
            finally:
                with self._cond:
                    self._running = None

    def _claim(self) -> dict | None:
        """The next job for a model the client serves; a client with several models loaded on demand
        (``resident_models``) gets its loaded models' jobs first, within ModelAffinity's bound."""
        served = [m.id for m in self.client.models()]
        resident = getattr(self.client, "resident_models", None)
        if resident is None:
            return self.store.claim_next(self.worker_id, served, lease_s=self.config.lease_s)
        return self.affinity.claim(self.store, self.worker_id, served, resident(), lease_s=self.config.lease_s)

    def _adopt(self, row: dict, job: Job | None) -> Job:
        """A Job for a row another process queued (call with the lock held). A request that cannot be rebuilt
        (an upload deleted meanwhile) fails the job when it runs, with the typed error."""
        options = row.get("options") or {}
        if job is None:
            job = Job(row["id"], row["model"], None, 0)
            self._remember(job)
        job.preview_every = int(options.get("preview_every") or 0)
        try:
            job.request = engine_job_of(row).request
        except QwenStudioError as e:
            job.request = e
        return job

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        deadline = job.deadline = started + self.config.job_deadline_s  # the watcher enforces it mid-stage too
        job.lease_renewed = started
        job.publish("started", {"job_id": job.id})
        if isinstance(job.request, QwenStudioError):
            self._finish_failed(job, job.request.code, redact_paths(job.request.message), started)
            return
        last_write = [0.0]
        last_cancel_check = [0.0]
        steps_seen = [0, 0.0]  # steps, seconds between first and last step

        def on_event(ev: StepEvent | LoadEvent) -> bool:
            if isinstance(ev, LoadEvent):  # the model is loading for this job: seconds to minutes, say so
                data = {"model": ev.model, "phase": ev.phase}
                if ev.phase == "done":
                    data.update(seconds=ev.seconds, evicted=list(ev.evicted))
                elif ev.fraction is not None:  # "progress": the loader's fraction of the model's bytes filled in
                    data["fraction"] = round(ev.fraction, 4)
                job.publish("loading", data)
                return True
            now = time.monotonic()
            if now - last_cancel_check[0] >= CANCEL_CHECK_S:  # a cancel asked through another process
                last_cancel_check[0] = now
                if job.cancel_reason is None and self.store.cancel_requested(job.id):
                    job.cancel_reason = "user"
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
            result = self.client.submit(EngineJob(job.id, job.model, job.request), on_event, job.preview_every)
            outputs = self._write_outputs(result, job)
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
        if not self.store.finish_owned(job.id, self.worker_id, "done", outputs=outputs):
            self._lost(job, outputs)
            return
        self.store.set_progress(job.id, steps_seen[0], steps_seen[0])
        step_s = sum(result.timings.get("steps", []) or []) if isinstance(result.timings, dict) else 0.0
        self.metrics.job_finished("done", time.monotonic() - started, steps=len(result.timings.get("steps", [])),
                                  step_seconds=step_s)
        job.publish("done", {"job_id": job.id, "outputs": [
            {"id": oid, "url": f"/api/outputs/{oid}", "metadata": meta} for oid, _, _, meta in outputs]})
        self._retire(job)

    def _write_outputs(self, result: Any, job: Job | None = None) -> list[tuple[str, int, str, dict]]:
        """Save every image atomically under a random name; on any failure remove this job's files and fail. A
        cancel (user, deadline, shutdown) is honoured between images: the files written so far are removed."""
        from ..outputs import save_png

        written: list[tuple[str, int, str, dict]] = []
        try:
            for i, img in enumerate(result.images):
                if job is not None and job.cancel_reason is not None:
                    for _, _, done_name, _ in written:
                        (self.outputs_dir / done_name).unlink(missing_ok=True)
                    raise Cancelled("cancelled while writing outputs", detail={"stage": "output_write"})
                name = secrets.token_hex(16) + ".png"
                save_png(img.image, img.metadata, self.outputs_dir / name)
                written.append((secrets.token_hex(16), i, name, img.metadata))
        except OSError:
            for _, _, name, _ in written:
                (self.outputs_dir / name).unlink(missing_ok=True)
            raise OutputWriteFailed("could not write the output image (disk full or outputs dir not writable)")
        return written

    # ---- watcher: heartbeat, dead workers, jobs other workers run ------------------------------------------
    def _watch(self) -> None:
        last_beat = last_reap = 0.0
        while not self._halt.wait(POLL_S):
            try:
                now = time.monotonic()
                if self.worker_id is not None and now - last_beat >= HEARTBEAT_S:
                    last_beat = now
                    self.store.heartbeat(self.worker_id)
                self._police_running(now)
                if now - last_reap >= REAP_EVERY_S:
                    last_reap = now
                    if n := self.store.reap_dead(self.host, STALE_S):
                        log.warning("marked %d job(s) of dead workers failed (interrupted)", n)
                with self._cond:
                    pending = [j for j in self._jobs.values() if j.terminal is None and j is not self._running]
                if pending:
                    self._follow_foreign(pending)
            except Exception:  # keep watching; a closed store at shutdown ends the loop through _halt
                if not self._halt.is_set():
                    log.exception("job watcher")

    def _police_running(self, now: float) -> None:
        """Make a deadline, a cancel asked through another process, or a shutdown reach the running job even in
        the middle of a long stage (the engine checks its stop flag at every layer, engine/stopping.py); the
        cancel is re-sent each tick, so one that raced the job's start still arrives."""
        with self._cond:
            job = self._running
        if job is None or job.deadline is None:
            return
        if job.cancel_reason is None and now > job.deadline:
            job.cancel_reason = "deadline"
        if job.cancel_reason is None and self.store.cancel_requested(job.id):
            job.cancel_reason = "user"
        if job.lease_renewed is None or now - job.lease_renewed >= self.config.lease_s / 5:
            job.lease_renewed = now
            if self.worker_id is not None and not self.store.renew_lease(job.id, self.worker_id, self.config.lease_s):
                job.cancel_reason = job.cancel_reason or "lease_lost"  # stop working on a job we no longer own
                self.store.fail_lost(job.id, self.worker_id)
        if job.cancel_reason is not None:
            self.client.cancel(job.id)

    def _follow_foreign(self, jobs: list[Job]) -> None:
        """Publish what the store says about jobs this process is not running: queue positions, start and progress
        in another worker, outcomes (including cancels and crash recovery done elsewhere)."""
        states = self.store.job_states([j.id for j in jobs])
        positions = {jid: i for i, jid in enumerate(self.store.queued_ids(), 1)}
        for job in jobs:
            st = states.get(job.id)
            if st is None:
                job.publish("failed", {"job_id": job.id, "error": {"code": "job_not_found",
                                                                   "message": "the job was deleted"}})
                self._retire(job)
                continue
            status = st["status"]
            if status == "queued":
                pos = positions.get(job.id)
                if pos is not None and pos != job.position:
                    job.position = pos
                    job.publish("queued", {"job_id": job.id, "position": pos})
            elif status == "running":
                if st["worker_id"] == self.worker_id and self.worker_id is not None:
                    continue  # ours: the worker publishes
                if job.seen[:1] != ("running",):
                    job.publish("started", {"job_id": job.id})
                if st["step"] and job.seen != ("running", st["step"]):
                    job.publish("progress", {"step": st["step"], "total": st["total"], "elapsed": None, "eta": None})
                job.seen = ("running", st["step"])
            else:
                with self._cond:
                    if job is self._running:
                        continue
                row = self.store.get_job(job.id)
                if row is not None:
                    job.publish(*terminal_event(row))
                    self._retire(job)

    # ---- helpers -------------------------------------------------------------------------------------------
    def _finish_cancelled(self, job: Job, reason: str, started: float | None = None) -> None:
        error = ("cancelled", f"cancelled ({reason})")
        if not self.store.finish_owned(job.id, self.worker_id, "cancelled", error=error):
            self._lost(job)
            return
        self.metrics.job_finished("cancelled", time.monotonic() - started if started else 0.0)
        self._publish_cancelled(job, reason)

    def _lost(self, job: Job, outputs: list | None = None) -> None:
        """This worker no longer owns the job (its lease ran out while it was stalled, or shutdown gave up on
        it): write nothing, remove what it wrote, and tell local followers what the store says."""
        log.warning("job %s: lease lost; its result is discarded", job.id)
        for _, _, name, _ in outputs or ():
            (self.outputs_dir / name).unlink(missing_ok=True)
        self.store.fail_lost(job.id, self.worker_id)
        row = self.store.get_job(job.id)
        if row is not None:
            job.publish(*terminal_event(row))
        self._retire(job)

    def _publish_cancelled(self, job: Job, reason: str) -> None:
        job.publish("cancelled", {"job_id": job.id, "reason": reason})
        self._retire(job)

    def _finish_failed(self, job: Job, code: str, message: str, started: float) -> None:
        if not self.store.finish_owned(job.id, self.worker_id, "failed", error=(code, message)):
            self._lost(job)
            return
        self.metrics.job_finished("failed", time.monotonic() - started, code=code)
        job.publish("failed", {"job_id": job.id, "error": {"code": code, "message": message}})
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


def engine_job_of(row: dict) -> EngineJob:
    """The EngineJob of a stored row: the resolved request as stored (an edit names its inputs by content id).
    Rows written before ``kind`` was stored mark an edit by their ``inputs`` (upload ids)."""
    options = row.get("options") or {}
    kind = options.get("kind") or ("edit" if options.get("inputs") else "generate")
    return EngineJob.from_dict({"id": row["id"], "model": row["model"], "kind": kind, "request": row["request"]})


def _png_b64(array: Any) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")

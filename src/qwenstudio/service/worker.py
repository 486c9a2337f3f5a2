"""The worker role of ``JobManager``: claim the next job from the store's queue (``job_queue.claim_for``), run it
through the ``EngineClient`` as a self-contained ``EngineJob``, turn the client's events into the job's event log,
write the outputs atomically and record the outcome — only while this worker still owns the job's lease.

A mixin: the state (store, client, config, the running job, the condition the API wakes it with) lives on
``JobManager`` (service/jobs.py), which starts ``_work`` on its worker thread.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from ..engine.job import EngineJob
from ..errors import Cancelled, QwenStudioError
from .engine_client import LoadEvent, StepEvent
from .errors import OutputWriteFailed, redact_paths
from .events import Job, loading_event, png_b64, terminal_event
from .job_queue import claim_for

log = logging.getLogger("qwenstudio.service")

POLL_S = 0.25  # idle worker: how often it looks for jobs other processes queued
CANCEL_CHECK_S = 0.25  # running job: how often the store's cross-process cancel flag is read


class Worker:
    """``JobManager``'s worker loop (see the module doc)."""

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
        return claim_for(self.store, self.client, self.affinity, self.worker_id, self.config.lease_s)

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
                job.publish("loading", loading_event(ev))
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
                job.publish("preview", {"step": ev.step, "images": [png_b64(a) for a in ev.preview]})
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

    def _finish_failed(self, job: Job, code: str, message: str, started: float) -> None:
        if not self.store.finish_owned(job.id, self.worker_id, "failed", error=(code, message)):
            self._lost(job)
            return
        self.metrics.job_finished("failed", time.monotonic() - started, code=code)
        job.publish("failed", {"job_id": job.id, "error": {"code": code, "message": message}})
        self._retire(job)


def engine_job_of(row: dict) -> EngineJob:
    """The EngineJob of a stored row: the resolved request as stored (an edit names its inputs by content id).
    Rows written before ``kind`` was stored mark an edit by their ``inputs`` (upload ids)."""
    options = row.get("options") or {}
    kind = options.get("kind") or ("edit" if options.get("inputs") else "generate")
    return EngineJob.from_dict({"id": row["id"], "model": row["model"], "kind": kind, "request": row["request"]})

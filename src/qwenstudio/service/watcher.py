"""The watcher role of ``JobManager`` (its own thread): heartbeat this worker, renew the running job's lease and push
a deadline, a cross-process cancel or a shutdown into it mid-stage, mark jobs of dead workers failed "interrupted",
and publish what the store says about jobs other workers run (queue positions, progress, outcomes) into their
event logs. A mixin: the state lives on ``JobManager`` (service/jobs.py).
"""

from __future__ import annotations

import logging
import time

from .events import Job, terminal_event

log = logging.getLogger("qwenstudio.service")

POLL_S = 0.25  # watcher tick
HEARTBEAT_S = 1.0
STALE_S = 10.0  # a worker silent this long (or whose pid is gone, same host) is dead
REAP_EVERY_S = 5.0


class Watcher:
    """``JobManager``'s watcher loop (see the module doc)."""

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

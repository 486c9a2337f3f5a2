"""The job queue's rows: bounded insert, the exactly-once claim, the owner's lease, cross-process cancel, and worker
liveness (register, heartbeat, reap the jobs of dead workers) — plus ``claim_for``, the worker's hook that asks the
store for the next job, preferring loaded models (``ModelAffinity``).

On SQLite the claim is a ``BEGIN IMMEDIATE`` transaction, on PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED``, both
through ``Database.transaction()`` (service/database.py), so concurrent claimers never take the same row (SECURITY
26). A running job carries its owner's lease (``lease_until``): a worker that stalls past it loses the job and
records nothing (SECURITY 32). ``register_worker`` at start marks what a crash left "queued"/"running" failed
"interrupted" (only dead workers' jobs while others are alive).
"""

from __future__ import annotations

import json
import time
from typing import Any

from .database import Rows, Tx
from .job_store import insert_outputs

LEASE_LOST = "the worker running this job stalled past its lease; submit it again"
INTERRUPTED = "the server stopped before this job finished; submit it again"
FAIL_INTERRUPTED = "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "


class QueueRows(Rows):
    """The queue's statements over ``self.db`` (a role of ``Store``)."""

    def recover(self) -> int:
        """Mark jobs a previous process left active as failed ("interrupted"); return how many."""
        return self.run(FAIL_INTERRUPTED + "WHERE status IN ('queued','running')",
                        (time.time(), INTERRUPTED)).rowcount

    def insert_job(self, job_id: str, model: str, request: dict[str, Any], *, options: dict | None = None,
                   max_queued: int | None = None) -> int | None:
        """Insert a queued job; return its queue position (1 = next), or None when ``max_queued`` jobs already wait.
        The count and the insert are one transaction under the "queue" lock, so concurrent submitters in any
        process (or node) can neither overfill the queue nor take the same ``seq``."""
        with self.db.transaction() as tx:
            tx.lock("queue")
            queued = tx.execute("SELECT COUNT(*) AS n FROM jobs WHERE status='queued'").scalar()
            if max_queued is not None and queued >= max_queued:
                return None
            seq = tx.execute("SELECT COALESCE(MAX(seq), 0) + 1 AS seq FROM jobs").scalar()
            tx.execute(
                "INSERT INTO jobs (id, seq, status, model, prompt, request, created_at, options) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (job_id, seq, "queued", model, request.get("prompt", ""), json.dumps(request), time.time(),
                 None if options is None else json.dumps(options)),
            )
        return queued + 1

    def claim_next(self, worker_id: str, models: list[str] | tuple[str, ...],
                   lease_s: float | None = None) -> dict[str, Any] | None:
        """Atomically move the oldest queued job for one of ``models`` to running, owned by ``worker_id``; None when
        nothing waits. SQLite's ``BEGIN IMMEDIATE`` takes the write lock before the read; PostgreSQL's ``FOR UPDATE
        SKIP LOCKED`` locks the row read and lets other claimers pass over it: either way two workers (threads,
        processes, nodes) never claim the same row, and each job runs exactly once."""
        if not models:
            return None
        marks = ",".join("?" * len(models))
        with self.db.transaction() as tx:
            row = tx.execute(f"SELECT id FROM jobs WHERE status='queued' AND model IN ({marks}) ORDER BY seq LIMIT 1"
                             f"{self.db.dialect.skip_locked}", tuple(models)).first()
            if row is not None:
                now = time.time()
                tx.execute("UPDATE jobs SET status='running', started_at=?, worker_id=?, lease_until=? "
                           "WHERE id=? AND status='queued'",
                           (now, worker_id, None if lease_s is None else now + lease_s, row["id"]))
        return None if row is None else self.get_job(row["id"])

    def renew_lease(self, job_id: str, worker_id: str, lease_s: float) -> bool:
        """Extend the owner's lease on its running job; False once it is lost (expired, reaped, or not its job):
        an expired lease is never revived, even before anyone reaped it."""
        now = time.time()
        return self.run("UPDATE jobs SET lease_until=? WHERE id=? AND worker_id=? AND status='running' AND "
                        "(lease_until IS NULL OR lease_until >= ?)", (now + lease_s, job_id, worker_id, now)
                        ).rowcount == 1

    def finish_owned(self, job_id: str, worker_id: str | None, status: str, *, error: tuple[str, str] | None = None,
                     outputs: list[tuple[str, int, str, dict]] = ()) -> bool:
        """``finish_job`` only while ``worker_id`` still holds the job's lease (conditional update, one
        transaction): a worker that lost its job records nothing. Returns whether it did."""
        now = time.time()
        code, message = error or (None, None)
        with self.db.transaction() as tx:
            n = tx.execute(
                "UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=? WHERE id=? AND "
                f"status='running' AND worker_id {self.db.dialect.same} ? AND (lease_until IS NULL OR "
                "lease_until >= ?)", (status, now, code, message, job_id, worker_id, now)).rowcount
            if n == 1:
                insert_outputs(tx, job_id, outputs, now)
        return n == 1

    def fail_lost(self, job_id: str, worker_id: str | None) -> None:
        """The owner noticed it lost the lease: record that (unless a reaper already did)."""
        self.run(FAIL_INTERRUPTED + f"WHERE id=? AND status='running' AND worker_id {self.db.dialect.same} ?",
                 (time.time(), LEASE_LOST, job_id, worker_id))

    def cancel_queued(self, job_id: str, reason: str) -> bool:
        """queued -> cancelled, atomically (a worker's claim and a cancel never both win)."""
        cur = self.run(
            "UPDATE jobs SET status='cancelled', finished_at=?, error_code='cancelled', error_message=? "
            "WHERE id=? AND status='queued'", (time.time(), f"cancelled ({reason})", job_id))
        return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> bool:
        """Flag a running job for its worker (in any process); it stops at its next step."""
        return self.run("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='running'", (job_id,)).rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        rows = self.rows("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self.rows("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    def oldest_queued(self, models: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The job ``claim_next`` would take for ``models`` (id, model, created_at), without claiming it: the
        worker's model-affinity choice looks at it (service/scheduling.py)."""
        if not models:
            return None
        rows = self.rows(f"SELECT id, model, created_at FROM jobs WHERE status='queued' AND model IN "
                         f"({','.join('?' * len(models))}) ORDER BY seq LIMIT 1", tuple(models))
        return dict(rows[0]) if rows else None

    def count_queued(self) -> int:
        return self.run("SELECT COUNT(*) AS n FROM jobs WHERE status='queued'").scalar()

    def job_states(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Status, progress and owner of some jobs in one query (for following jobs other workers run)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            rows = self.rows(f"SELECT id, status, step, total, worker_id FROM jobs WHERE id IN "
                             f"({','.join('?' * len(chunk))})", tuple(chunk))
            out.update({r["id"]: r for r in rows})
        return out

    # ---- workers (several processes on one store) ----------------------------------------------------------------
    def register_worker(self, worker_id: str | None, host: str, pid: int, stale_s: float) -> int:
        """Register a worker (None: an API-only process) and recover what dead workers left, in one transaction.

        A worker is alive when its heartbeat is fresh and, on this host, its pid still exists (so a restart right
        after kill -9 sees the old process as dead at once). With no other live worker, every queued/running job is
        left over from a stopped server and is marked failed "interrupted"; with live workers, only running jobs of
        dead workers are (queued ones stay for the live workers to run). Returns how many jobs were marked."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.lock("workers")  # two workers starting at once must not both think they are alone
            live = live_workers(tx, host, now, stale_s)
            if worker_id is not None:
                tx.execute("INSERT INTO workers (id, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?) "
                           "ON CONFLICT (id) DO UPDATE SET host=excluded.host, pid=excluded.pid, "
                           "started_at=excluded.started_at, heartbeat_at=excluded.heartbeat_at",
                           (worker_id, host, pid, now, now))
            if live:
                return interrupt_running_not_of(tx, live, now)
            return tx.execute(FAIL_INTERRUPTED + "WHERE status IN ('queued','running')",
                              (now, INTERRUPTED)).rowcount

    def heartbeat(self, worker_id: str) -> None:
        self.run("UPDATE workers SET heartbeat_at=? WHERE id=?", (time.time(), worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        self.run("DELETE FROM workers WHERE id=?", (worker_id,))

    def reap_dead(self, host: str, stale_s: float) -> int:
        """Mark running jobs whose worker died (kill -9, lost host) failed "interrupted"; return how many."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.lock("workers")
            return interrupt_running_not_of(tx, live_workers(tx, host, now, stale_s), now)

    def mark_running(self, job_id: str) -> bool:
        """queued -> running, atomically; False if the job is no longer queued (cancelled meanwhile)."""
        cur = self.run(
            "UPDATE jobs SET status='running', started_at=? WHERE id=? AND status='queued'", (time.time(), job_id)
        )
        return cur.rowcount == 1


def claim_for(store: Any, client: Any, affinity: Any, worker_id: str, lease_s: float | None) -> dict | None:
    """The next job for a model ``client`` serves; a client with several models loaded on demand
    (``resident_models``) gets its loaded models' jobs first, within ``affinity``'s bound (service/scheduling.py)."""
    served = [m.id for m in client.models()]
    resident = getattr(client, "resident_models", None)
    if resident is None:
        return store.claim_next(worker_id, served, lease_s=lease_s)
    return affinity.claim(store, worker_id, served, resident(), lease_s=lease_s)


def live_workers(tx: Tx, host: str, now: float, stale_s: float) -> list[str]:
    """Forget dead workers; return the live ones (inside a transaction holding the "workers" lock)."""
    live, dead = [], []
    for r in tx.execute("SELECT id, host, pid, heartbeat_at FROM workers").rows:
        # same host: the process exists (a stalled one too: its leases decide for its jobs); elsewhere: heartbeat
        alive = pid_alive(r["pid"]) if r["host"] == host else r["heartbeat_at"] >= now - stale_s
        (live if alive else dead).append(r["id"])
    for wid in dead:
        tx.execute("DELETE FROM workers WHERE id=?", (wid,))
    return live


def interrupt_running_not_of(tx: Tx, live: list[str], now: float) -> int:
    marks = ",".join("?" * len(live))
    owned = f"worker_id IS NOT NULL AND worker_id IN ({marks})" if live else "FALSE"
    n = tx.execute(FAIL_INTERRUPTED + f"WHERE status='running' AND NOT ({owned})",
                   (now, INTERRUPTED, *live)).rowcount
    return n + tx.execute(  # a live worker that stalled past its lease lost the job
        FAIL_INTERRUPTED + "WHERE status='running' AND lease_until IS NOT NULL AND lease_until < ?",
        (now, LEASE_LOST, now)).rowcount


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

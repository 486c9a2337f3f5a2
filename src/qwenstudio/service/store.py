"""The store for jobs, their outputs (the history: full reproducible metadata) and presets, on SQLite (a file, the
default) or PostgreSQL (``Store("postgresql://…")``, shared by several nodes); see ``database``. It is also the job
queue: ``insert_job`` (bounded) and ``claim_next`` let any number of worker threads, processes or nodes share one
store and run each job exactly once (SECURITY 26): on SQLite the claim is a ``BEGIN IMMEDIATE`` transaction, on
PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on, nor take, the same row.

``register_worker`` runs at start: jobs a crash left "queued"/"running" become "failed"/"interrupted" (only those of
dead workers when other workers are alive), finished rows and files are untouched. A running job also carries its
owner's lease (``lease_until``): a worker that stalls past it loses the job and records nothing (SECURITY 32).
Timestamps are each writer's ``time.time()``: nodes sharing a PostgreSQL store need synchronised clocks (NTP).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .database import Result, Tx, open_database

ACTIVE = ("queued", "running")
FINISHED = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at {real} NOT NULL,
    started_at {real},
    finished_at {real},
    error_code TEXT,
    error_message TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at {real} NOT NULL,
    heartbeat_at {real} NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    filename TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at {real} NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_job ON outputs(job_id);
CREATE TABLE IF NOT EXISTS presets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL,
    created_at {real} NOT NULL,
    updated_at {real} NOT NULL
)
"""

# Added for several workers on one store: who claimed a running job, a cross-process cancel request, and what a
# worker in another process needs to run a job (preview interval, edit inputs by upload id).
_JOB_COLUMNS = (("worker_id", "TEXT"), ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"), ("options", "TEXT"),
                ("lease_until", "{real}"))  # the owner's lease on a running job (SECURITY 32); worker_id = owner token
LEASE_LOST = "the worker running this job stalled past its lease; submit it again"
INTERRUPTED = "the server stopped before this job finished; submit it again"
_FAIL_INTERRUPTED = "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "


class Store:
    """``location``: a SQLite file path, or a ``postgresql://user@host/db`` URL (password: libpq's PGPASSWORD or
    ~/.pgpass rather than the URL)."""

    def __init__(self, location: Path | str):
        self.db = open_database(location)
        self.location = self.db.location  # a URL without its password
        self.backend = self.db.dialect.name  # "sqlite" | "postgresql"
        d = self.db.dialect
        with self.db.transaction() as tx:
            tx.lock("schema")  # PostgreSQL's CREATE ... IF NOT EXISTS races between processes; SQLite: no-op
            for statement in _SCHEMA.format(real=d.real).split(";"):
                tx.execute(statement)
            have = self.db.columns(tx, "jobs")
            for column, decl in _JOB_COLUMNS:  # stores written before these columns existed
                if column not in have:
                    tx.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl.format(real=d.real)}")
            tx.execute("CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, seq)")

    @property
    def path(self) -> Path | None:
        """The SQLite file (None on PostgreSQL)."""
        return Path(self.location) if self.backend == "sqlite" else None

    def close(self) -> None:
        self.db.close()

    def _exec(self, sql: str, args: tuple = ()) -> Result:
        return self.db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return self.db.execute(sql, args).rows

    # ---- jobs --------------------------------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark jobs a previous process left active as failed ("interrupted"); return how many."""
        return self._exec(_FAIL_INTERRUPTED + "WHERE status IN ('queued','running')",
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
        return self._exec("UPDATE jobs SET lease_until=? WHERE id=? AND worker_id=? AND status='running' AND "
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
                self._insert_outputs(tx, job_id, outputs, now)
        return n == 1

    def fail_lost(self, job_id: str, worker_id: str | None) -> None:
        """The owner noticed it lost the lease: record that (unless a reaper already did)."""
        self._exec(_FAIL_INTERRUPTED + f"WHERE id=? AND status='running' AND worker_id {self.db.dialect.same} ?",
                   (time.time(), LEASE_LOST, job_id, worker_id))

    def cancel_queued(self, job_id: str, reason: str) -> bool:
        """queued -> cancelled, atomically (a worker's claim and a cancel never both win)."""
        cur = self._exec(
            "UPDATE jobs SET status='cancelled', finished_at=?, error_code='cancelled', error_message=? "
            "WHERE id=? AND status='queued'", (time.time(), f"cancelled ({reason})", job_id))
        return cur.rowcount == 1

    def request_cancel(self, job_id: str) -> bool:
        """Flag a running job for its worker (in any process); it stops at its next step."""
        return self._exec("UPDATE jobs SET cancel_requested=1 WHERE id=? AND status='running'", (job_id,)).rowcount == 1

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._all("SELECT cancel_requested FROM jobs WHERE id=?", (job_id,))
        return bool(rows and rows[0]["cancel_requested"])

    def queued_ids(self) -> list[str]:
        return [r["id"] for r in self._all("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    def oldest_queued(self, models: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The job ``claim_next`` would take for ``models`` (id, model, created_at), without claiming it: the
        worker's model-affinity choice looks at it (service/scheduling.py)."""
        if not models:
            return None
        rows = self._all(f"SELECT id, model, created_at FROM jobs WHERE status='queued' AND model IN "
                         f"({','.join('?' * len(models))}) ORDER BY seq LIMIT 1", tuple(models))
        return dict(rows[0]) if rows else None

    def count_queued(self) -> int:
        return self._exec("SELECT COUNT(*) AS n FROM jobs WHERE status='queued'").scalar()

    def job_states(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Status, progress and owner of some jobs in one query (for following jobs other workers run)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            rows = self._all(f"SELECT id, status, step, total, worker_id FROM jobs WHERE id IN "
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
            live = self._live_workers(tx, host, now, stale_s)
            if worker_id is not None:
                tx.execute("INSERT INTO workers (id, host, pid, started_at, heartbeat_at) VALUES (?,?,?,?,?) "
                           "ON CONFLICT (id) DO UPDATE SET host=excluded.host, pid=excluded.pid, "
                           "started_at=excluded.started_at, heartbeat_at=excluded.heartbeat_at",
                           (worker_id, host, pid, now, now))
            if live:
                return self._interrupt_running_not_of(tx, live, now)
            return tx.execute(_FAIL_INTERRUPTED + "WHERE status IN ('queued','running')",
                              (now, INTERRUPTED)).rowcount

    def heartbeat(self, worker_id: str) -> None:
        self._exec("UPDATE workers SET heartbeat_at=? WHERE id=?", (time.time(), worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        self._exec("DELETE FROM workers WHERE id=?", (worker_id,))

    def reap_dead(self, host: str, stale_s: float) -> int:
        """Mark running jobs whose worker died (kill -9, lost host) failed "interrupted"; return how many."""
        now = time.time()
        with self.db.transaction() as tx:
            tx.lock("workers")
            return self._interrupt_running_not_of(tx, self._live_workers(tx, host, now, stale_s), now)

    @staticmethod
    def _live_workers(tx: Tx, host: str, now: float, stale_s: float) -> list[str]:
        """Forget dead workers; return the live ones (inside a transaction holding the "workers" lock)."""
        live, dead = [], []
        for r in tx.execute("SELECT id, host, pid, heartbeat_at FROM workers").rows:
            # same host: the process exists (a stalled one too: its leases decide for its jobs); elsewhere: heartbeat
            alive = _pid_alive(r["pid"]) if r["host"] == host else r["heartbeat_at"] >= now - stale_s
            (live if alive else dead).append(r["id"])
        for wid in dead:
            tx.execute("DELETE FROM workers WHERE id=?", (wid,))
        return live

    @staticmethod
    def _interrupt_running_not_of(tx: Tx, live: list[str], now: float) -> int:
        marks = ",".join("?" * len(live))
        owned = f"worker_id IS NOT NULL AND worker_id IN ({marks})" if live else "FALSE"
        n = tx.execute(_FAIL_INTERRUPTED + f"WHERE status='running' AND NOT ({owned})",
                       (now, INTERRUPTED, *live)).rowcount
        return n + tx.execute(  # a live worker that stalled past its lease lost the job
            _FAIL_INTERRUPTED + "WHERE status='running' AND lease_until IS NOT NULL AND lease_until < ?",
            (now, LEASE_LOST, now)).rowcount

    def mark_running(self, job_id: str) -> bool:
        """queued -> running, atomically; False if the job is no longer queued (cancelled meanwhile)."""
        cur = self._exec(
            "UPDATE jobs SET status='running', started_at=? WHERE id=? AND status='queued'", (time.time(), job_id)
        )
        return cur.rowcount == 1

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self._exec("UPDATE jobs SET step=?, total=? WHERE id=?", (step, total, job_id))

    def finish_job(
        self,
        job_id: str,
        status: str,
        *,
        error: tuple[str, str] | None = None,
        outputs: list[tuple[str, int, str, dict]] = (),
    ) -> None:
        """Record the end state and the job's outputs in one transaction."""
        now = time.time()
        code, message = error or (None, None)
        with self.db.transaction() as tx:
            self._insert_outputs(tx, job_id, outputs, now)
            tx.execute("UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=? WHERE id=?",
                       (status, now, code, message, job_id))

    @staticmethod
    def _insert_outputs(tx: Tx, job_id: str, outputs: list[tuple[str, int, str, dict]], now: float) -> None:
        for out_id, idx, filename, meta in outputs:
            tx.execute("INSERT INTO outputs (id, job_id, idx, filename, metadata, created_at) VALUES (?,?,?,?,?,?)",
                       (out_id, job_id, idx, filename, json.dumps(meta), now))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        rows = self._all("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self._job_dict(rows[0]) if rows else None

    def list_jobs(
        self, *, status: str | None = None, model: str | None = None, text: str | None = None,
        limit: int = 50, offset: int = 0,
    ) -> tuple[list[dict[str, Any]], int]:
        where, args = [], []
        if status:
            where.append("status=?")
            args.append(status)
        if model:
            where.append("model=?")
            args.append(model)
        if text:  # case-insensitive on both backends (SQLite's LIKE is; PostgreSQL's is not)
            where.append("LOWER(prompt) LIKE LOWER(?) ESCAPE '\\'")
            args.append("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = self._exec(f"SELECT COUNT(*) AS n FROM jobs{clause}", tuple(args)).scalar()
        rows = self._all(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self._job_dict(r) for r in rows], total

    def delete_job(self, job_id: str) -> list[str]:
        """Delete the job row and its output rows; return the output filenames to remove."""
        with self.db.transaction() as tx:
            names = [r["filename"] for r in tx.execute("SELECT filename FROM outputs WHERE job_id=?", (job_id,)).rows]
            tx.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
            tx.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return names

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self._all("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def _job_dict(self, row: dict[str, Any]) -> dict[str, Any]:
        d = dict(row)
        d["request"] = json.loads(d["request"])
        d["options"] = json.loads(d["options"]) if d.get("options") else None
        d["outputs"] = self.outputs_of(d["id"])
        return d

    # ---- outputs / history -------------------------------------------------------------------------------------
    def outputs_of(self, job_id: str) -> list[dict[str, Any]]:
        rows = self._all("SELECT id, idx, metadata FROM outputs WHERE job_id=? ORDER BY idx", (job_id,))
        return [{"id": r["id"], "index": r["idx"], "metadata": json.loads(r["metadata"])} for r in rows]

    def output_filename(self, output_id: str) -> str | None:
        rows = self._all("SELECT filename FROM outputs WHERE id=?", (output_id,))
        return rows[0]["filename"] if rows else None

    def history(self, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        total = self._exec("SELECT COUNT(*) AS n FROM outputs").scalar()
        rows = self._all(
            "SELECT o.id, o.job_id, o.idx, o.metadata, o.created_at, j.model FROM outputs o JOIN jobs j "
            "ON j.id = o.job_id ORDER BY o.created_at DESC, o.idx LIMIT ? OFFSET ?",
            (limit, offset),
        )
        items = [
            {"id": r["id"], "job_id": r["job_id"], "index": r["idx"], "model": r["model"],
             "created_at": r["created_at"], "metadata": json.loads(r["metadata"])}
            for r in rows
        ]
        return items, total

    # ---- presets -----------------------------------------------------------------------------------------------
    def list_presets(self) -> list[dict[str, Any]]:
        return [self._preset_dict(r) for r in self._all("SELECT * FROM presets ORDER BY name")]

    def get_preset(self, preset_id: str) -> dict[str, Any] | None:
        rows = self._all("SELECT * FROM presets WHERE id=?", (preset_id,))
        return self._preset_dict(rows[0]) if rows else None

    def find_preset(self, name_or_id: str) -> dict[str, Any] | None:
        """A preset by id, else by name (the most recently updated one of that name)."""
        rows = self._all("SELECT * FROM presets WHERE id=?", (name_or_id,)) or \
            self._all("SELECT * FROM presets WHERE name=? ORDER BY updated_at DESC LIMIT 1", (name_or_id,))
        return self._preset_dict(rows[0]) if rows else None

    def insert_preset(self, preset_id: str, name: str, params: dict, description: str = "", author: str = "") -> None:
        """Raises Conflict ("preset_exists") when the name is taken, on either backend."""
        now = time.time()
        self._unique_name(name, lambda: self._exec(
            "INSERT INTO presets (id, name, description, author, params, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?)",
            (preset_id, name, description, author, json.dumps(params), now, now),
        ))

    def update_preset(self, preset_id: str, name: str, params: dict, description: str = "", author: str = "") -> bool:
        cur = self._unique_name(name, lambda: self._exec(
            "UPDATE presets SET name=?, description=?, author=?, params=?, updated_at=? WHERE id=?",
            (name, description, author, json.dumps(params), time.time(), preset_id),
        ))
        return cur.rowcount == 1

    def delete_preset(self, preset_id: str) -> bool:
        return self._exec("DELETE FROM presets WHERE id=?", (preset_id,)).rowcount == 1

    def _unique_name(self, name: str, write) -> Result:
        from .errors import Conflict

        try:
            return write()
        except Exception as e:
            if self.db.is_unique_violation(e):
                raise Conflict(f"a preset named '{name}' exists", code="preset_exists") from None
            raise

    @staticmethod
    def _preset_dict(row: dict[str, Any]) -> dict[str, Any]:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        return d


def _pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True

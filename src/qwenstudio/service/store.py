"""SQLite store (WAL) for jobs, their outputs (the history: full reproducible metadata) and presets. It is also the
job queue: ``insert_job`` (bounded) and ``claim_next`` (``BEGIN IMMEDIATE``) let any number of worker threads or
processes share one store and run each job exactly once (SECURITY 26).

One connection guarded by a lock: the service writes from a handful of threads and SQLite serialises writers
anyway; WAL lets readers of other processes (a CLI, a second replica) read while we write. ``register_worker`` runs at
start: jobs a crash left "queued"/"running" become "failed"/"interrupted" (only those of dead workers when other
workers are alive), finished rows and files are untouched.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

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
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
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
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    filename TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outputs_job ON outputs(job_id);
CREATE TABLE IF NOT EXISTS presets (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL DEFAULT '',
    params TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Added for several workers on one store: who claimed a running job, a cross-process cancel request, and what a
# worker in another process needs to run a job (preview interval, edit inputs by upload id).
_JOB_COLUMNS = (("worker_id", "TEXT"), ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"), ("options", "TEXT"),
                ("lease_until", "REAL"))  # the owner's lease on a running job (SECURITY 32); worker_id = owner token
LEASE_LOST = "the worker running this job stalled past its lease; submit it again"
INTERRUPTED = "the server stopped before this job finished; submit it again"


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(jobs)")}
            for column, decl in _JOB_COLUMNS:  # stores written before these columns existed
                if column not in have:
                    try:
                        self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {decl}")
                    except sqlite3.OperationalError as e:  # another process added it first
                        if "duplicate column" not in str(e):
                            raise
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(status, seq)")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- jobs --------------------------------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark jobs a previous process left active as failed ("interrupted"); return how many."""
        cur = self._exec(
            "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "
            "WHERE status IN ('queued','running')",
            (time.time(), INTERRUPTED),
        )
        return cur.rowcount

    def insert_job(self, job_id: str, model: str, request: dict[str, Any], *, options: dict | None = None,
                   max_queued: int | None = None) -> int | None:
        """Insert a queued job; return its queue position (1 = next), or None when ``max_queued`` jobs already wait.
        The count and the insert are one ``BEGIN IMMEDIATE`` transaction, so concurrent submitters in any process
        can neither overfill the queue nor lose a job."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status='queued'").fetchone()[0]
                if max_queued is not None and queued >= max_queued:
                    self._db.execute("ROLLBACK")
                    return None
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
                self._db.execute(
                    "INSERT INTO jobs (id, seq, status, model, prompt, request, created_at, options) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (job_id, seq, "queued", model, request.get("prompt", ""), json.dumps(request), time.time(),
                     None if options is None else json.dumps(options)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return queued + 1

    def claim_next(self, worker_id: str, models: list[str] | tuple[str, ...],
                   lease_s: float | None = None) -> dict[str, Any] | None:
        """Atomically move the oldest queued job for one of ``models`` to running, owned by ``worker_id``; None when
        nothing waits. ``BEGIN IMMEDIATE`` takes the write lock before the read, so two workers (threads or
        processes) can never claim the same row: each job runs exactly once."""
        if not models:
            return None
        marks = ",".join("?" * len(models))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    f"SELECT id FROM jobs WHERE status='queued' AND model IN ({marks}) ORDER BY seq LIMIT 1",
                    tuple(models)).fetchone()
                if row is not None:
                    now = time.time()
                    self._db.execute("UPDATE jobs SET status='running', started_at=?, worker_id=?, lease_until=? "
                                     "WHERE id=?", (now, worker_id, None if lease_s is None else now + lease_s,
                                                    row[0]))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return None if row is None else self.get_job(row[0])

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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._db.execute(
                    "UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=? WHERE id=? AND "
                    "status='running' AND worker_id IS ? AND (lease_until IS NULL OR lease_until >= ?)",
                    (status, now, code, message, job_id, worker_id, now)).rowcount
                if n == 1:
                    for out_id, idx, filename, meta in outputs:
                        self._db.execute(
                            "INSERT INTO outputs (id, job_id, idx, filename, metadata, created_at) "
                            "VALUES (?,?,?,?,?,?)", (out_id, job_id, idx, filename, json.dumps(meta), now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n == 1

    def fail_lost(self, job_id: str, worker_id: str | None) -> None:
        """The owner noticed it lost the lease: record that (unless a reaper already did)."""
        self._exec("UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "
                   "WHERE id=? AND status='running' AND worker_id IS ?", (time.time(), LEASE_LOST, job_id, worker_id))

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
        return bool(rows and rows[0][0])

    def queued_ids(self) -> list[str]:
        return [r[0] for r in self._all("SELECT id FROM jobs WHERE status='queued' ORDER BY seq")]

    def oldest_queued(self, models: list[str] | tuple[str, ...]) -> dict[str, Any] | None:
        """The job ``claim_next`` would take for ``models`` (id, model, created_at), without claiming it: the
        worker's model-affinity choice looks at it (service/scheduling.py)."""
        if not models:
            return None
        rows = self._all(f"SELECT id, model, created_at FROM jobs WHERE status='queued' AND model IN "
                         f"({','.join('?' * len(models))}) ORDER BY seq LIMIT 1", tuple(models))
        return dict(rows[0]) if rows else None

    def count_queued(self) -> int:
        return self._all("SELECT COUNT(*) FROM jobs WHERE status='queued'")[0][0]

    def job_states(self, job_ids: list[str]) -> dict[str, dict[str, Any]]:
        """Status, progress and owner of some jobs in one query (for following jobs other workers run)."""
        out: dict[str, dict[str, Any]] = {}
        for i in range(0, len(job_ids), 500):
            chunk = job_ids[i:i + 500]
            rows = self._all(f"SELECT id, status, step, total, worker_id FROM jobs WHERE id IN "
                             f"({','.join('?' * len(chunk))})", tuple(chunk))
            out.update({r["id"]: dict(r) for r in rows})
        return out

    # ---- workers (several processes on one store) ----------------------------------------------------------------
    def register_worker(self, worker_id: str | None, host: str, pid: int, stale_s: float) -> int:
        """Register a worker (None: an API-only process) and recover what dead workers left, in one transaction.

        A worker is alive when its heartbeat is fresh and, on this host, its pid still exists (so a restart right
        after kill -9 sees the old process as dead at once). With no other live worker, every queued/running job is
        left over from a stopped server and is marked failed "interrupted"; with live workers, only running jobs of
        dead workers are (queued ones stay for the live workers to run). Returns how many jobs were marked."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                live = self._live_workers(host, now, stale_s)
                if worker_id is not None:
                    self._db.execute("INSERT OR REPLACE INTO workers (id, host, pid, started_at, heartbeat_at) "
                                     "VALUES (?,?,?,?,?)", (worker_id, host, pid, now, now))
                if live:
                    n = self._interrupt_running_not_of(live, now)
                else:
                    n = self._db.execute(
                        "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "
                        "WHERE status IN ('queued','running')", (now, INTERRUPTED)).rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def heartbeat(self, worker_id: str) -> None:
        self._exec("UPDATE workers SET heartbeat_at=? WHERE id=?", (time.time(), worker_id))

    def unregister_worker(self, worker_id: str) -> None:
        self._exec("DELETE FROM workers WHERE id=?", (worker_id,))

    def reap_dead(self, host: str, stale_s: float) -> int:
        """Mark running jobs whose worker died (kill -9, lost host) failed "interrupted"; return how many."""
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                n = self._interrupt_running_not_of(self._live_workers(host, now, stale_s), now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return n

    def _live_workers(self, host: str, now: float, stale_s: float) -> list[str]:
        """Forget dead workers; return the live ones (call with the lock held, inside a transaction)."""
        live, dead = [], []
        for r in self._db.execute("SELECT id, host, pid, heartbeat_at FROM workers").fetchall():
            # same host: the process exists (a stalled one too: its leases decide for its jobs); elsewhere: heartbeat
            alive = _pid_alive(r["pid"]) if r["host"] == host else r["heartbeat_at"] >= now - stale_s
            (live if alive else dead).append(r["id"])
        for wid in dead:
            self._db.execute("DELETE FROM workers WHERE id=?", (wid,))
        return live

    def _interrupt_running_not_of(self, live: list[str], now: float) -> int:
        marks = ",".join("?" * len(live))
        owned = f"worker_id IS NOT NULL AND worker_id IN ({marks})" if live else "0"
        n = self._db.execute(
            "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "
            f"WHERE status='running' AND NOT ({owned})", (now, INTERRUPTED, *live)).rowcount
        return n + self._db.execute(  # a live worker that stalled past its lease lost the job
            "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, error_message=? "
            "WHERE status='running' AND lease_until IS NOT NULL AND lease_until < ?", (now, LEASE_LOST, now)).rowcount

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
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for out_id, idx, filename, meta in outputs:
                    self._db.execute(
                        "INSERT INTO outputs (id, job_id, idx, filename, metadata, created_at) VALUES (?,?,?,?,?,?)",
                        (out_id, job_id, idx, filename, json.dumps(meta), now),
                    )
                self._db.execute(
                    "UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=? WHERE id=?",
                    (status, now, code, message, job_id),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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
        if text:
            where.append("prompt LIKE ? ESCAPE '\\'")
            args.append("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        clause = (" WHERE " + " AND ".join(where)) if where else ""
        total = self._all(f"SELECT COUNT(*) FROM jobs{clause}", tuple(args))[0][0]
        rows = self._all(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self._job_dict(r) for r in rows], total

    def delete_job(self, job_id: str) -> list[str]:
        """Delete the job row and its output rows; return the output filenames to remove."""
        with self._lock:
            names = [r[0] for r in self._db.execute("SELECT filename FROM outputs WHERE job_id=?", (job_id,))]
            self._db.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return names

    def count_by_status(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._all("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def _job_dict(self, row: sqlite3.Row) -> dict[str, Any]:
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
        return rows[0][0] if rows else None

    def history(self, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        total = self._all("SELECT COUNT(*) FROM outputs")[0][0]
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
        now = time.time()
        self._exec(
            "INSERT INTO presets (id, name, description, author, params, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?)",
            (preset_id, name, description, author, json.dumps(params), now, now),
        )

    def update_preset(self, preset_id: str, name: str, params: dict, description: str = "", author: str = "") -> bool:
        cur = self._exec(
            "UPDATE presets SET name=?, description=?, author=?, params=?, updated_at=? WHERE id=?",
            (name, description, author, json.dumps(params), time.time(), preset_id),
        )
        return cur.rowcount == 1

    def delete_preset(self, preset_id: str) -> bool:
        return self._exec("DELETE FROM presets WHERE id=?", (preset_id,)).rowcount == 1

    @staticmethod
    def _preset_dict(row: sqlite3.Row) -> dict[str, Any]:
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

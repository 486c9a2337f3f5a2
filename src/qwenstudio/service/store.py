"""SQLite store (WAL) for jobs, their outputs (the history: full reproducible metadata) and presets.

One connection guarded by a lock: the service writes from a handful of threads and SQLite serialises writers
anyway; WAL lets readers of other processes (a CLI, a second replica) read while we write. ``recover`` runs at open:
jobs a crash left "queued"/"running" become "failed"/"interrupted", finished rows and files are untouched.
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
            "UPDATE jobs SET status='failed', error_code='interrupted', finished_at=?, "
            "error_message='the server stopped before this job finished; submit it again' "
            "WHERE status IN ('queued','running')",
            (time.time(),),
        )
        return cur.rowcount

    def insert_job(self, job_id: str, model: str, request: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs").fetchone()[0]
                self._db.execute(
                    "INSERT INTO jobs (id, seq, status, model, prompt, request, created_at) VALUES (?,?,?,?,?,?,?)",
                    (job_id, seq, "queued", model, request.get("prompt", ""), json.dumps(request), time.time()),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

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

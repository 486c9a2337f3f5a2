"""The store: one database (``database.py``: SQLite, the default, or PostgreSQL shared by several nodes; its one
``transaction()`` helper) with the schema, and the role classes that speak to it, one module each:

- ``job_queue.QueueRows``: bounded insert, exactly-once claim, leases, cross-process cancel, worker liveness;
- ``job_store.JobRows``: job records, outputs, history;
- ``preset_store.PresetRows``: presets.

``Store`` is all three over the same ``db`` (so a caller holds one object, as before the split). Timestamps are each
writer's ``time.time()``: nodes sharing a PostgreSQL store need synchronised clocks (NTP).
"""

from __future__ import annotations

from pathlib import Path

from .database import open_database
from .job_queue import INTERRUPTED, LEASE_LOST, QueueRows
from .job_store import JobRows
from .preset_store import PresetRows

__all__ = ["ACTIVE", "FINISHED", "INTERRUPTED", "LEASE_LOST", "Store"]

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
# worker in another process needs to run a job (preview interval, job kind; an edit's inputs are in its request,
# by content id).
_JOB_COLUMNS = (("worker_id", "TEXT"), ("cancel_requested", "INTEGER NOT NULL DEFAULT 0"), ("options", "TEXT"),
                ("lease_until", "{real}"))  # the owner's lease on a running job (SECURITY 32); worker_id = owner token


class Store(QueueRows, JobRows, PresetRows):
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

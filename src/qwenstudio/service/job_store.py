"""Job records and their outputs (the history: full reproducible metadata), a role of ``Store``: progress, end state,
lookups, listing with filters, deletion (the file names to remove, by id only)."""

from __future__ import annotations

import json
import time
from typing import Any

from .database import Rows, Tx


class JobRows(Rows):
    """Job and output statements over ``self.db``."""

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self.run("UPDATE jobs SET step=?, total=? WHERE id=?", (step, total, job_id))

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
            insert_outputs(tx, job_id, outputs, now)
            tx.execute("UPDATE jobs SET status=?, finished_at=?, error_code=?, error_message=? WHERE id=?",
                       (status, now, code, message, job_id))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM jobs WHERE id=?", (job_id,))
        return self.job_dict(rows[0]) if rows else None

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
        total = self.run(f"SELECT COUNT(*) AS n FROM jobs{clause}", tuple(args)).scalar()
        rows = self.rows(f"SELECT * FROM jobs{clause} ORDER BY seq DESC LIMIT ? OFFSET ?", (*args, limit, offset))
        return [self.job_dict(r) for r in rows], total

    def delete_job(self, job_id: str) -> list[str]:
        """Delete the job row and its output rows; return the output filenames to remove."""
        with self.db.transaction() as tx:
            names = [r["filename"] for r in tx.execute("SELECT filename FROM outputs WHERE job_id=?", (job_id,)).rows]
            tx.execute("DELETE FROM outputs WHERE job_id=?", (job_id,))
            tx.execute("DELETE FROM jobs WHERE id=?", (job_id,))
        return names

    def count_by_status(self) -> dict[str, int]:
        return {r["status"]: r["n"] for r in self.rows("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}

    def job_dict(self, row: dict[str, Any]) -> dict[str, Any]:
        d = dict(row)
        d["request"] = json.loads(d["request"])
        d["options"] = json.loads(d["options"]) if d.get("options") else None
        d["outputs"] = self.outputs_of(d["id"])
        return d

    # ---- outputs / history -------------------------------------------------------------------------------------
    def outputs_of(self, job_id: str) -> list[dict[str, Any]]:
        rows = self.rows("SELECT id, idx, metadata FROM outputs WHERE job_id=? ORDER BY idx", (job_id,))
        return [{"id": r["id"], "index": r["idx"], "metadata": json.loads(r["metadata"])} for r in rows]

    def output_filename(self, output_id: str) -> str | None:
        rows = self.rows("SELECT filename FROM outputs WHERE id=?", (output_id,))
        return rows[0]["filename"] if rows else None

    def history(self, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        total = self.run("SELECT COUNT(*) AS n FROM outputs").scalar()
        rows = self.rows(
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


def insert_outputs(tx: Tx, job_id: str, outputs: list[tuple[str, int, str, dict]], now: float) -> None:
    for out_id, idx, filename, meta in outputs:
        tx.execute("INSERT INTO outputs (id, job_id, idx, filename, metadata, created_at) VALUES (?,?,?,?,?,?)",
                   (out_id, job_id, idx, filename, json.dumps(meta), now))

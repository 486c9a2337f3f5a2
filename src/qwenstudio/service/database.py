"""The SQL database under the store: SQLite (one file, the default, one machine) or PostgreSQL (a server that
several nodes share), behind one small interface so the store's queries, and its exactly-once claim, are written once.

- ``execute(sql, args)``: one statement, committed on its own.
- ``transaction()``: the one transaction helper; statements in it commit together or not at all. SQLite opens it
  with ``BEGIN IMMEDIATE`` (the database write lock, taken before the first read); PostgreSQL with a plain ``BEGIN``
  (READ COMMITTED), where ``claim_next`` locks its row with ``FOR UPDATE SKIP LOCKED`` and ``Tx.lock(name)``
  serialises the few read-then-write steps (queue bound, worker recovery) with a transaction-scoped advisory lock.

SQL is written with ``?`` placeholders and the types both dialects share; ``Dialect`` holds the few differences.
Rows come back as plain dicts (keys: column names or ``AS`` aliases) on both.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


@dataclass(frozen=True)
class Dialect:
    name: str
    real: str  # a float column (timestamps): SQLite REAL is 8 bytes, PostgreSQL REAL only 4
    same: str  # null-safe equality operator
    skip_locked: str  # row lock for a claim (SQLite: the transaction already holds the write lock)


SQLITE = Dialect("sqlite", "REAL", "IS", "")
POSTGRESQL = Dialect("postgresql", "DOUBLE PRECISION", "IS NOT DISTINCT FROM", " FOR UPDATE SKIP LOCKED")


@dataclass
class Result:
    rows: list[dict[str, Any]]
    rowcount: int

    def first(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return next(iter(self.rows[0].values())) if self.rows else None


class Tx:
    """An open transaction (from ``Database.transaction``)."""

    def __init__(self, run, lock):
        self.execute = run  # (sql, args=()) -> Result
        self.lock = lock  # (name) -> None: serialise with other transactions taking the same named lock


class Rows:
    """Base of the store's role classes (service/job_queue.py, job_store.py, preset_store.py): the database they
    share, as ``self.db``, and two shorthands for single statements."""

    db: SQLiteDatabase | PostgresDatabase

    def run(self, sql: str, args: tuple = ()) -> Result:
        return self.db.execute(sql, args)

    def rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return self.db.execute(sql, args).rows


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(POSTGRES_SCHEMES)


def redact_url(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_database(location: str | Path) -> SQLiteDatabase | PostgresDatabase:
    """A ``postgresql://`` URL opens PostgreSQL; ``sqlite:///path`` or a plain path, a SQLite file."""
    if is_postgres_url(location):
        return PostgresDatabase(str(location))
    if isinstance(location, str) and "://" in location:
        if not location.startswith("sqlite:///"):
            from ..errors import InvalidRequest

            raise InvalidRequest(f"unknown store '{redact_url(location).split('://')[0]}://': use a postgresql:// "
                                 "URL, sqlite:///path or a file path", code="invalid_store")
        location = location[len("sqlite://"):]
    return SQLiteDatabase(Path(location))


class SQLiteDatabase:
    """One connection guarded by a lock: SQLite serialises writers anyway; WAL lets readers in other processes (a
    CLI, a second worker) read while one writes."""

    dialect = SQLITE

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.location = str(path)
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._set_wal()
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA synchronous=NORMAL")

    def _set_wal(self, timeout: float = 30.0) -> None:
        """Switch to WAL. The switch needs the database to itself, and SQLite answers "database is locked" at once
        (without its busy timeout) while another connection opens the same new file: retry until ``timeout``."""
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _run(self, sql: str, args: tuple = ()) -> Result:
        cur = self._conn.execute(sql, args)
        rows = [dict(r) for r in cur.fetchall()] if cur.description else []
        return Result(rows, cur.rowcount)

    def execute(self, sql: str, args: tuple = ()) -> Result:
        with self._lock:
            return self._run(sql, args)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._run, lambda name: None)  # BEGIN IMMEDIATE already excludes every other writer
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @staticmethod
    def columns(tx: Tx, table: str) -> set[str]:
        return {r["name"] for r in tx.execute(f"PRAGMA table_info({table})").rows}

    def is_unique_violation(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "UNIQUE" in str(error)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresDatabase:
    """One psycopg connection (autocommit outside ``transaction()``) guarded by a lock, reopened once when the
    server dropped it (a restart, a failover): the store's callers are a handful of threads per process."""

    dialect = POSTGRESQL

    def __init__(self, url: str):
        from .errors import StoreUnavailable

        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreUnavailable("a postgresql:// store needs psycopg: pip install 'qwenstudio[postgres]'",
                                   code="missing_dependency") from None
        self.location = redact_url(url)
        self._url = url
        self._lock = threading.Lock()
        self._conn = self._connect()

    def _connect(self):
        import psycopg
        from psycopg.rows import dict_row

        from .errors import StoreUnavailable

        try:
            return psycopg.connect(self._url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except psycopg.Error as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise StoreUnavailable(f"cannot open the PostgreSQL store {self.location}: {first}") from None

    def _live(self):
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("%", "%%").replace("?", "%s")

    def _runner(self, cur):
        def run(sql: str, args: tuple = ()) -> Result:
            cur.execute(self._sql(sql), args)
            rows = cur.fetchall() if cur.description else []
            return Result(list(rows), cur.rowcount)

        return run

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        """A lost server is a typed 503 (not an internal error); the next call opens a new connection. Nothing is
        retried here: whether a statement whose reply was lost committed is unknown."""
        import psycopg

        from .errors import StoreUnavailable

        try:
            yield
        except psycopg.OperationalError as e:
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise StoreUnavailable(f"the PostgreSQL store {self.location} is unreachable ({first}); retry") from None

    def execute(self, sql: str, args: tuple = ()) -> Result:
        with self._lock, self._reachable(), self._live().cursor() as cur:
            return self._runner(cur)(sql, args)

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock, self._reachable():
            conn = self._live()
            with conn.transaction(), conn.cursor() as cur:
                run = self._runner(cur)
                yield Tx(run, lambda name: run("SELECT pg_advisory_xact_lock(?)", (_lock_key(name),)))

    @staticmethod
    def columns(tx: Tx, table: str) -> set[str]:
        rows = tx.execute("SELECT column_name FROM information_schema.columns WHERE table_name=? AND "
                          "table_schema=current_schema()", (table,)).rows
        return {r["column_name"] for r in rows}

    def is_unique_violation(self, error: BaseException) -> bool:
        import psycopg

        return isinstance(error, psycopg.errors.UniqueViolation)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def _lock_key(name: str) -> int:
    """A stable 63-bit advisory lock key for a lock name (advisory locks are per database)."""
    return zlib.crc32(f"qwenstudio:{name}".encode()) | (0x5157 << 32)

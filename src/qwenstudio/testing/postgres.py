"""A throwaway PostgreSQL server for tests (and local trials of ``serve --store``): ``initdb`` + ``pg_ctl`` into a
temp dir, listening on 127.0.0.1 only with trust auth, durability off (a test cluster), removed by ``stop``.

initdb refuses to run as root (CI containers): then the cluster belongs to the ``postgres`` user the Debian package
creates and every server command runs through ``runuser -u postgres --``.
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SERVER_SETTINGS = ("-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
                   "-c shared_buffers=32MB")


def find_bindir() -> Path | None:
    """Where initdb and pg_ctl are: PATH, else Debian's /usr/lib/postgresql/<version>/bin (newest); None if absent."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3])
                   if Path(p).parts[-3].isdigit() else 0)
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    bindir: Path
    datadir: Path
    port: int
    run_as: str | None  # "postgres" when we are root
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A fresh empty database on this server; returns its URL."""
        import psycopg

        name = f"qs_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            _run(self.run_as, [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
                 timeout=60)
        finally:
            shutil.rmtree(self.datadir.parent, ignore_errors=True)


def _run(user: str | None, cmd: list[str], timeout: float) -> None:
    full = (["runuser", "-u", user, "--"] if user else []) + cmd
    done = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({done.returncode}): "
                           f"{done.stdout.decode(errors='replace')[-2000:]}")


def start_postgres(bindir: Path | None = None) -> PostgresServer:
    """Create and start a cluster; raises RuntimeError when the binaries are missing or the server fails."""
    bindir = bindir or find_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    run_as = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="qwenstudio-pg-"))
    datadir = base / "data"
    if run_as:
        import pwd

        user = pwd.getpwnam(run_as)
        os.chmod(base, 0o755)
        datadir.mkdir(mode=0o700)
        os.chown(datadir, user.pw_uid, user.pw_gid)
    try:
        _run(run_as, [str(bindir / "initdb"), "-D", str(datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-locale", "--no-sync"], timeout=120)
        port = _free_port()
        options = f"-k {datadir} -p {port} -h 127.0.0.1 {SERVER_SETTINGS}"
        _run(run_as, [str(bindir / "pg_ctl"), "-D", str(datadir), "-l", str(datadir / "server.log"), "-w", "-t", "60",
                      "-o", options, "start"], timeout=90)
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise
    return PostgresServer(bindir, datadir, port, run_as)

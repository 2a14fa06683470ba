"""A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` package, a cluster
in a temporary directory, listening on a Unix socket only.

First-class test code like `whatsappd.testing.daemon`: the tests' session fixture and the
cluster benchmarks start the server the same way. initdb refuses to run as root, so as root the
cluster belongs to the `postgres` user the Debian package creates (any other user runs it as
itself). The server process is ours: it is stopped by its pid, never by name.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir"]

#: Who owns the cluster when the tests run as root (initdb refuses root).
SERVER_USER = "postgres"
#: The database role the tests connect as (trust authentication on the private socket).
ROLE = "whatsappd"


class PostgresUnavailable(Exception):
    """This machine cannot run a PostgreSQL server for the tests; the message says what to install."""


def find_bindir() -> Path:
    """The directory holding `initdb` and `postgres`, without naming a major version.

    initdb on PATH (resolved through Debian's symlinks) first, then the newest
    /usr/lib/postgresql/<major>/bin.
    """
    found = shutil.which("initdb")
    if found:
        bindir = Path(found).resolve().parent
        if (bindir / "postgres").exists():
            return bindir
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    raise PostgresUnavailable("no PostgreSQL server found (initdb, postgres): apt-get install -y postgresql")


def _run_as() -> dict[str, Any]:
    """Popen keyword arguments that run the server's programs as a user initdb accepts."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise PostgresUnavailable(f"running as root and there is no {SERVER_USER!r} user for initdb "
                                  "(apt-get install -y postgresql creates it)") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class PostgresServer:
    """One PostgreSQL cluster in a temporary directory, on a Unix socket in that directory.

    `start()` runs initdb and the server (fsync off: a test's data need not survive a power
    cut); `dsn(db)` is a URL for a database created with `create_database()`; `stop()` ends the
    server by its pid and removes the directory.
    """

    def __init__(self, base: Path | None = None, max_connections: int = 200) -> None:
        self.bindir = find_bindir()
        self.max_connections = max_connections  # a benchmark counting connections may need more
        self._popen = _run_as()
        # Not under pytest's tmp_path: as root its parents are 0700 and the postgres user could
        # not reach the directory.
        self.root = Path(tempfile.mkdtemp(prefix="whatsappd-pg-", dir=base or "/tmp"))
        self.data = self.root / "data"
        self.socket_dir = self.root  # the socket file: .s.PGSQL.5432 in here
        self.log_path = self.root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        if self._popen:
            os.chown(self.root, self._popen["user"], self._popen["group"])
        self.root.chmod(0o755)

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=120, cwd=self.root, stdin=subprocess.DEVNULL, **self._popen)

    def start(self, timeout: float = 30.0) -> PostgresServer:
        done = self._run("initdb", "--no-sync", "--auth=trust", f"--username={ROLE}", "--encoding=UTF8",
                         "--locale=C", "-D", str(self.data))
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({done.returncode}): {done.stderr.strip()}")
        log = open(self.log_path, "ab")  # noqa: SIM115 (the server keeps it)
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.socket_dir),
             "-c", "listen_addresses=", "-c", "fsync=off", "-c", "synchronous_commit=off",
             "-c", "full_page_writes=off", "-c", f"max_connections={self.max_connections}", "-c", "unix_socket_permissions=0777"],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=self.root, **self._popen)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PostgresUnavailable(f"postgres exited with {self.proc.returncode}:\n{self.logs()}")
            ready = self._run("pg_isready", "-h", str(self.socket_dir), "-d", "postgres", "-U", ROLE)
            if ready.returncode == 0:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise PostgresUnavailable(f"postgres did not accept connections within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def dsn(self, database: str = "postgres") -> str:
        """A URL (the form lib/pq, inside neonize, reads too) for database on the server's socket."""
        return f"postgresql://{ROLE}@/{database}?host={self.socket_dir}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a fresh name unless given); its DSN."""
        import psycopg  # the runtime dependency the PostgreSQL store uses

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')  # less WAL than copying it through the log
        return self.dsn(name)

    def stop(self, timeout: float = 20.0) -> None:
        """Immediate shutdown (SIGQUIT: no checkpoint, the data is thrown away) by pid, SIGKILL if
        it lingers; then remove the directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

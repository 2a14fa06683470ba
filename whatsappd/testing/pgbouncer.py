"""A real PgBouncer in front of a test PostgreSQL (whatsappd.testing.postgres), for benchmarks
that count connections: Debian's `pgbouncer` package, our own process on a Unix socket in a
temporary directory, transaction pooling, trust authentication. Stopped by its pid.

PgBouncer refuses to run as root, so as root it runs as the same user as the test server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from whatsappd.testing.postgres import ROLE, PostgresServer, PostgresUnavailable, _run_as

__all__ = ["PgBouncer"]

PORT = 6432


class PgBouncer:
    """PgBouncer for every database of `server`, pool_mode = transaction, on a Unix socket."""

    def __init__(self, server: PostgresServer, pool_size: int = 20, max_clients: int = 10_000) -> None:
        binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
        if not Path(binary).exists():
            raise PostgresUnavailable("no pgbouncer: apt-get install -y pgbouncer")
        self.binary, self.server = binary, server
        self._popen: dict[str, Any] = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="whatsappd-pgbouncer-"))
        self.root.chmod(0o755)
        if self._popen:
            os.chown(self.root, self._popen["user"], self._popen["group"])
        self.ini = self.root / "pgbouncer.ini"
        self.ini.write_text(
            "[databases]\n"
            f"* = host={server.socket_dir} port=5432\n"
            "[pgbouncer]\n"
            "listen_addr =\n"
            f"listen_port = {PORT}\n"
            f"unix_socket_dir = {self.root}\n"
            "unix_socket_mode = 0777\n"
            "auth_type = trust\n"
            f"auth_file = {self.root / 'users.txt'}\n"
            f"admin_users = {ROLE}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {pool_size}\n"
            f"max_client_conn = {max_clients}\n"
            "ignore_startup_parameters = extra_float_digits,search_path\n"
            f"logfile = {self.root / 'pgbouncer.log'}\n"
        )
        (self.root / "users.txt").write_text(f'"{ROLE}" ""\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> PgBouncer:
        self.proc = subprocess.Popen([self.binary, str(self.ini)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, cwd=self.root, **self._popen)
        deadline = time.monotonic() + timeout
        while not (self.root / f".s.PGSQL.{PORT}").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.root / "pgbouncer.log"
                raise PostgresUnavailable(f"pgbouncer did not start: {log.read_text() if log.exists() else ''}")
            time.sleep(0.05)
        return self

    def dsn(self, database: str, **params: str) -> str:
        """A URL to database through PgBouncer (the form lib/pq reads too)."""
        extra = "".join(f"&{k}={v}" for k, v in params.items())
        return f"postgresql://{ROLE}@/{database}?host={self.root}&port={PORT}{extra}"

    def show(self, what: str) -> list[list[str]]:
        """Rows of the admin console's SHOW <what> (psql: the console speaks the simple protocol only)."""
        psql = self.server.bindir / "psql"
        done = subprocess.run([str(psql) if psql.exists() else "psql", "-h", str(self.root), "-p", str(PORT), "-U", ROLE,
                               "-At", "-F", "\t", "-c", f"SHOW {what}", "pgbouncer"],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"SHOW {what}: {done.stderr.strip()}")
        return [line.split("\t") for line in done.stdout.splitlines() if line]

    def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # immediate shutdown (SIGINT would wait for clients)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)

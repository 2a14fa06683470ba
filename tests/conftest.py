"""Shared fixtures for the daemon-core tests: real daemons, real sockets, real users.

Nothing here fakes our own code. A daemon is `whatsappd run` in a subprocess
(`whatsappd.testing.daemon.DaemonProcess`); every one a test starts is killed at teardown if
the test did not stop it. Helpers that are not fixtures live in `whatsappd.testing.daemon`.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from whatsappd.testing.daemon import NOBODY, DaemonProcess, NotifySocket, user_switch
from whatsappd.testing.disk import SmallDisk
from whatsappd.testing.postgres import PostgresServer, PostgresUnavailable
from whatsappd.testing.scenario import SimDaemon, daemon_pool
from whatsappd.worker.relay import LOOPBACK_ONLY_ENV

# No test may let a real WhatsApp client dial past loopback, whatever its config says (a company
# with no proxy, or a typo in one): every daemon and worker a test starts inherits this, and the
# worker's relay then refuses any other destination (whatsappd/worker/relay.py).
os.environ[LOOPBACK_ONLY_ENV] = "1"


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked `root` act as a second user: skip them, saying why, when that is impossible."""
    if item.get_closest_marker("root") is None:
        return
    if os.geteuid() != 0:
        pytest.skip("needs root, to run a process as a second user (uid 65534)")
    try:
        pwd.getpwuid(NOBODY)
    except KeyError:
        pytest.skip(f"needs a user with uid {NOBODY} (nobody) on this system")


UserSwitch = tuple[list[str], dict[str, Any]]


@pytest.fixture
def second_user() -> Callable[..., UserSwitch]:
    """`second_user(gid=65534)` -> (command prefix, Popen kwargs) running a command as uid 65534.

    Skips the test, saying why, when this machine cannot do that.
    """

    def switch(gid: int = NOBODY) -> UserSwitch:
        way = user_switch(NOBODY, gid)
        if way is None:
            pytest.skip(f"cannot run this Python as uid {NOBODY} gid {gid} here (needs root and an "
                        "interpreter that user can run)")
        return list(way[0]), dict(way[1])

    return switch


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Make DaemonProcess objects under tmp_path (d0, d1, ...); kill survivors at teardown."""
    made: list[DaemonProcess] = []

    def make(config: str | None = "", root: Path | None = None, **kw: Any) -> DaemonProcess:
        daemon = DaemonProcess(root or tmp_path / f"d{len(made)}", config=config, **kw)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    """A bound datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that every user may enter and write (mode 0777).

    tmp_path's parents are 0700 when the tests run as root, so a second user could not reach a
    socket or a file there.
    """
    path = Path(tempfile.mkdtemp(prefix="whatsappd-test-", dir="/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo configure_logging after the test: the stdlib root logger and structlog are global.

    pytest adds and removes its own capture handlers around each phase, so only handlers that
    are not pytest's are saved and put back; the ones configure_logging added are closed.
    """
    root = logging.getLogger()

    def ours(handler: logging.Handler) -> bool:
        return not type(handler).__module__.startswith("_pytest")

    saved = [h for h in root.handlers if ours(h)]
    level = root.level
    access_level = logging.getLogger("aiohttp.access").level
    config = structlog.get_config()
    yield
    for handler in [h for h in root.handlers if ours(h) and h not in saved]:
        root.removeHandler(handler)
        handler.close()
    for handler in saved:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)
    structlog.configure(**config)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A real 4 MiB tmpfs of 256 inodes under tmp_path, unmounted at teardown (skipped without root)."""
    disk = SmallDisk(tmp_path / "disk", inodes=256)
    why = disk.mount()
    if why is not None:
        pytest.skip(why)
    try:
        yield disk
    finally:
        disk.umount()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the whole session (whatsappd.testing.postgres), on a Unix
    socket in a temporary directory; stopped by its pid at the end.

    Without PostgreSQL installed the tests that need it skip, saying what to install; in CI
    (CI=true, which installs it) that is a failure instead, so a missing package cannot hide.
    """
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield server
    server.stop()


@pytest.fixture
def pg_dsn(postgres: PostgresServer) -> str:
    """The DSN of a new, empty database on the session's PostgreSQL server (one per test)."""
    return postgres.create_database()


@pytest.fixture(scope="session")
def wm_template(postgres: PostgresServer) -> str:
    """A database migrated once with whatsappd's and whatsmeow's schemas (whatsmeow's migration
    runs neonize in a subprocess, seconds each): the template wm_dsn copies."""
    from whatsappd.store.postgresql import migrate

    dsn = postgres.create_database()
    migrate(dsn, whatsmeow=True)
    return dsn.split("@/", 1)[1].split("?", 1)[0]


@pytest.fixture
def wm_dsn(postgres: PostgresServer, wm_template: str) -> str:
    """A new database with whatsappd's and whatsmeow's schemas (as `whatsappd migrate` leaves it)."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}" TEMPLATE "{wm_template}" STRATEGY FILE_COPY')
    return postgres.dsn(name)


@pytest.fixture(scope="session")
def store_tables(request: pytest.FixtureRequest) -> Callable[[str], dict[str, str]]:
    """store_tables(backend) -> the [store] table for a scenario daemon on backend: {} for SQLite
    (the default), or a new database on the session's PostgreSQL server (started on first use)."""

    def make(backend: str) -> dict[str, str]:
        if backend == "sqlite":
            return {}
        server: PostgresServer = request.getfixturevalue("postgres")
        return {"backend": "postgresql", "dsn": server.create_database()}

    return make


@pytest.fixture
def store_table(request: pytest.FixtureRequest, store_tables: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """The [store] table for a test's daemon: SQLite unless the test is parametrized indirectly,
    `@pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)`."""
    return store_tables(getattr(request, "param", "sqlite"))


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., SimDaemon]]:
    """Make SimDaemons under tmp_path; any still running at teardown is killed. (A test module
    whose daemons need more, such as a store table, defines its own `daemons`.)"""
    with daemon_pool(tmp_path) as make:
        yield make

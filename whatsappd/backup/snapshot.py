"""Taking a backup: consistent snapshots of live stores, put into one archive written atomically.

Every SQLite file (the journal/outbox database, a whatsmeow `store.db`) is copied through
SQLite's online backup API from a read-only connection: one read transaction, so the copy is
the database as of one commit, whatever the daemon or a worker writes meanwhile (its -wal and
-shm files are never copied: the snapshot is one self-contained file). The other session files
are either replaced atomically by their writers (`simulator.json`, by rename) or appended
(`*.jsonl` send logs): a send log is cut after its last complete line.

Order matters for exactly-once sending: the journal/outbox is snapshotted first, the sessions
after it. A session's send log is therefore never older than the outbox beside it, so a message
the outbox has `sending` and the send log has sent is settled as sent after a restore, never
sent twice.

Used by the daemon (POST /v1/backup: it knows each company's state and JID) and by
`whatsappd backup` on a stopped state directory (reading both from the files).

With `[store] backend = "postgresql"` the journal and outbox live in the database, not in the
state directory: the archive then holds the sessions, companies.json and the config only, and
its manifest's `store` says where the journal is and that it is not in the archive (a
`whatsappd.sqlite` left in the state directory from before the switch is not the journal, and
is not archived as if it were). The database is backed up with pg_dump (README: Backups).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from whatsappd import __version__
from whatsappd.backup.archive import COMPANIES, CONFIG, FORMAT, FORMAT_VERSION, JOURNAL, fsync_dir, write_archive
from whatsappd.ids import session_dir
from whatsappd.sessions import LOCK_FILE
from whatsappd.sessionstore import (
    NEONIZE_STORE,
    SIMULATOR_FILE,
    SessionState,
    engine_of,
    read_simulator_store,
    session_state,
)
from whatsappd.timefmt import iso

__all__ = ["CompanyInfo", "build_archive", "disk_companies", "neonize_version", "registry_bytes", "save_atomically",
           "staging_dir", "store_record"]

_SQLITE_MAGIC = b"SQLite format 3\x00"
_SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
#: Prefix of the staging directories under STATE_DIR/tmp; a leftover one (a killed backup) is removed.
_STAGING_PREFIX = "backup-"


@dataclass(frozen=True)
class CompanyInfo:
    """One company as the manifest records it."""

    id: str
    engine: str
    state: str  # the daemon's state of the company ("stopped" for an offline backup)
    jid: str | None
    source: str  # config, runtime, discovered (or "disk" for an offline backup)


def store_record(backend: str, dsn: str) -> dict[str, Any]:
    """The manifest's `store`: which backend holds the journal and outbox, and for PostgreSQL the
    database (password hidden), which is not in the archive."""
    if backend != "postgresql":
        return {"backend": "sqlite"}
    from whatsappd.store.postgresql import redact

    return {"backend": "postgresql", "database": redact(dsn), "in_archive": False}


def neonize_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("neonize")
    except PackageNotFoundError:
        return None


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def snapshot_sqlite(source: Path, target: Path) -> None:
    """Copy the SQLite database at source to target through the online backup API.

    The source is opened read-only (its writer may be live); the copy is taken in one step, so
    it is the database as of one commit. The target is a new 0600 file.
    """
    uri = f"file:{urllib.parse.quote(str(source), safe='/')}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30)) as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        with contextlib.closing(sqlite3.connect(target)) as dst:
            src.backup(dst)
            # A self-contained file: no -wal beside it to be lost on the way.
            dst.execute("PRAGMA journal_mode = DELETE")


def journal_head(database: Path) -> int:
    """The last seq handed out by the journal in database (0 if none)."""
    with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(str(database), safe='/')}?mode=ro",
                                            uri=True, timeout=30)) as db:
        try:
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        except sqlite3.OperationalError:  # no table yet: nothing was ever journaled
            return 0
    return int(row[0]) if row else 0


def _copy_session(source: Path, target: Path) -> None:
    """A session directory's files into target: SQLite through the backup API, send logs up to
    their last complete line, the rest as they are. Lock files, links and SQLite's side files
    are left out."""
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        st = entry.lstat()
        name = entry.name
        if name == LOCK_FILE or stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode):
            if entry.parent == source:  # one level (simulator-media/), as the archive allows
                _copy_files(entry, target / name)
            continue
        if not stat.S_ISREG(st.st_mode) or any(name.endswith(s) for s in _SQLITE_SIDE_FILES):
            continue
        _copy_one(entry, target / name)


def _copy_files(source: Path, target: Path) -> None:
    target.mkdir(mode=0o700, exist_ok=True)
    for entry in sorted(source.iterdir()):
        if entry.is_file() and not entry.is_symlink():
            _copy_one(entry, target / entry.name)


def _copy_one(source: Path, target: Path) -> None:
    if is_sqlite(source):
        snapshot_sqlite(source, target)
        return
    try:
        data = source.read_bytes()
    except FileNotFoundError:  # replaced or removed meanwhile (a rename is atomic: retry once)
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            return
    if source.suffix == ".jsonl":
        data = data[:data.rfind(b"\n") + 1]  # a line being appended is not part of the snapshot
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with open(fd, "wb") as f:
        f.write(data)


def stored_jid(directory: Path) -> str | None:
    """The JID a session's credentials are for (None: not paired, or unreadable)."""
    try:
        if (directory / SIMULATOR_FILE).exists():
            device = read_simulator_store(directory / SIMULATOR_FILE)
            return device.jid if device else None
        store = directory / NEONIZE_STORE
        if not store.exists():
            return None
        uri = f"file:{urllib.parse.quote(str(store), safe='/')}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            row = db.execute("SELECT jid FROM whatsmeow_device LIMIT 1").fetchone()
        return str(row[0]) if row else None
    except (OSError, ValueError, sqlite3.Error):
        return None


def disk_companies(sessions_root: Path, configured: Iterable[tuple[str, str, str]]) -> list[CompanyInfo]:
    """Companies of a stopped state directory: the configured ones (id, engine, source) and every
    session directory on disk, with the JID their credentials hold."""
    found: dict[str, CompanyInfo] = {}
    for cid, engine, source in configured:
        directory = session_dir(sessions_root, cid)
        found[cid] = CompanyInfo(cid, engine, "stopped", stored_jid(directory), source)
    if sessions_root.is_dir():
        for child in sorted(sessions_root.glob("session-*")):
            cid = child.name.removeprefix("session-")
            if cid in found or child.is_symlink() or not child.is_dir():
                continue
            try:
                directory = session_dir(sessions_root, cid)
            except ValueError:
                continue
            if session_state(directory) is not SessionState.NONE:
                found[cid] = CompanyInfo(cid, engine_of(directory), "stopped", stored_jid(directory), "discovered")
    return [found[k] for k in sorted(found)]


def registry_bytes(path: Path, only: Iterable[str] | None) -> bytes | None:
    """companies.json's content (None if there is none), with only the companies named if given.

    The daemon replaces the file by rename, so one read is one consistent version of it.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if only is None:
        return raw
    keep = set(only)
    data = json.loads(raw)
    data["companies"] = [c for c in data.get("companies", []) if c.get("id") in keep]
    return None if not data["companies"] else json.dumps(data, indent=2).encode() + b"\n"


def staging_dir(tmp_root: Path) -> Path:
    """A new private directory under tmp_root for one backup's files; leftovers of killed ones go."""
    tmp_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    for leftover in tmp_root.glob(f"{_STAGING_PREFIX}*"):
        if leftover.is_dir() and not leftover.is_symlink() and time.time() - leftover.stat().st_mtime > 3600:
            shutil.rmtree(leftover, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=tmp_root))


def build_archive(out: IO[bytes], *, state_dir: Path, staging: Path, companies: list[CompanyInfo],
                  config_text: str, full: bool, registry: bytes | None, store: dict[str, Any]) -> dict[str, Any]:
    """Snapshot everything into staging, then write the archive to out; return its manifest.

    full: the journal/outbox database too (a backup of some companies holds only their sessions).
    registry: companies.json's content to include (None: there is none).
    store: `store_record(...)` of the configured backend; a journal not in the state directory
    (PostgreSQL) is recorded as such and left out.
    """
    now = time.time()
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_at": iso(now), "created_unix": int(now),
        "whatsappd_version": __version__, "neonize_version": neonize_version(),
        "scope": "full" if full else "companies", "journal": None, "store": store,
    }
    journal = state_dir / JOURNAL
    if full and store["backend"] == "sqlite" and journal.exists():
        snapshot_sqlite(journal, staging / JOURNAL)  # first: see the module docstring
        manifest["journal"] = {"file": JOURNAL, "last_seq": journal_head(staging / JOURNAL)}
    sessions_root = state_dir / "sessions"
    listed = []
    for company in companies:
        directory = session_dir(sessions_root, company.id)
        state = session_state(directory) if directory.is_dir() else SessionState.NONE
        entry: dict[str, Any] = {"id": company.id, "engine": company.engine, "state": company.state,
                                 "jid": company.jid, "source": company.source, "session": str(state)}
        if directory.is_dir() and not directory.is_symlink():
            _copy_session(directory, staging / "sessions" / directory.name)
        listed.append(entry)
    manifest["companies"] = listed
    if registry is not None:
        (staging / COMPANIES).write_bytes(registry)
    (staging / CONFIG).write_text(config_text, encoding="utf-8")
    write_archive(out, staging, manifest)
    return manifest


def save_atomically(target: Path, write: Callable[[IO[bytes], Path], None]) -> Path:
    """Call write(file, its path) on a 0600 temporary file beside target, fsync it, rename it to
    target and fsync the directory: target is either absent (or its old content) or the whole
    new file. Whatever write raises leaves nothing behind."""
    target = target.absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f, Path(tmp))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target

"""Restoring a backup archive into a state directory.

Everything is checked before anything is changed: the archive whole (manifest, checksums), then
the target (a whole restore needs the daemon stopped: the state directory's lock must be free;
each company's session lock must be free; a paired session, a journal or a companies.json
already there is replaced only with `overwrite`). Then, holding those locks, the archive is
extracted into a private staging directory beside the target (verified again as it is
written), each SQLite file is checked, and the files are moved into place by rename. What they
replace is moved, not deleted, to `STATE_DIR/replaced/<time>/`.

The journal's sequence: a reader may hold a cursor the old daemon handed out after the backup
was taken (those events are not in the archive). The restored journal therefore continues at
max(the archive's last seq, the replaced journal's last seq) + `seq_gap`: no seq is handed out
twice unless the old daemon wrote more than seq_gap events after the backup. A reader whose
cursor is within the gap gets the new events from the first one on; a cursor beyond the head
still gets 409 `cursor_ahead`.

With `[store] backend = "postgresql"` the journal and outbox live in the database: a restore
then never writes a `whatsappd.sqlite` (not even the one a SQLite backup holds), and says so;
the database is restored from its own dump (README: Backups).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from whatsappd import pidlock
from whatsappd.backup.archive import COMPANIES, JOURNAL, ArchiveRefused, Manifest, extract, fsync_dir, verify
from whatsappd.backup.snapshot import journal_head
from whatsappd.ids import session_dir
from whatsappd.sessions import LOCK_FILE, SessionState, session_state

__all__ = ["DEFAULT_SEQ_GAP", "RestoreRefused", "Restored", "restore"]

#: How far past the archive's last seq the restored journal continues (see the module docstring).
DEFAULT_SEQ_GAP = 1_000_000
STATE_LOCK_FILE = "whatsappd.lock"  # daemon.STATE_LOCK_FILE (the daemon module is not imported here)


class RestoreRefused(Exception):
    """The restore cannot be done; one sentence, and nothing was changed."""


@dataclass
class Restored:
    companies: list[str] = field(default_factory=list)
    journal_next_seq: int | None = None
    replaced: Path | None = None
    notes: list[str] = field(default_factory=list)


def _paired(directory: Path) -> bool:
    return directory.is_dir() and session_state(directory) is not SessionState.NONE


def _check_targets(manifest: Manifest, state_dir: Path, companies: list[str], whole: bool,
                   overwrite: bool, journal: bool) -> None:
    sessions_root = state_dir / "sessions"
    for cid in companies:
        directory = session_dir(sessions_root, cid)
        holder = pidlock.holder(directory / LOCK_FILE) if directory.is_dir() else None
        if holder is not None:
            raise RestoreRefused(f"company {cid} is running (pid {holder if holder > 0 else '?'} holds its session "
                                 f"lock): stop it first (DELETE /v1/companies/{cid} stops it and keeps "
                                 "its session); nothing was changed")
        if _paired(directory) and not overwrite:
            raise RestoreRefused(f"company {cid} already has a paired session in {directory}: add --overwrite "
                                 "to replace it (the old one is moved to STATE_DIR/replaced/); nothing was changed")
    if whole and not overwrite:
        for name in (JOURNAL, COMPANIES) if journal else (COMPANIES,):
            if name in manifest.files and (state_dir / name).exists():
                raise RestoreRefused(f"{state_dir / name} already exists: add --overwrite to replace it (the old "
                                     "one is moved to STATE_DIR/replaced/); nothing was changed")


def _set_next_seq(database: Path, last_seq: int) -> None:
    """Make the journal in database hand out last_seq + 1 next (AUTOINCREMENT's counter)."""
    with contextlib.closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'", (last_seq,))
        if db.execute("SELECT changes()").fetchone()[0] == 0:
            db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (last_seq,))
        db.execute("COMMIT")


def _quick_check(database: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"{database.absolute().as_uri()}?mode=ro", uri=True)) as db:
        found = [str(row[0]) for row in db.execute("PRAGMA integrity_check")]
    if found != ["ok"]:
        raise ArchiveRefused(f"{database.name} in the archive fails SQLite's integrity check ({found[0]}); "
                             "nothing was changed")


class _Mover:
    """Moves what a restore replaces to STATE_DIR/replaced/<time>/ (created on first use)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.root: Path | None = None

    def aside(self, path: Path, relative: str) -> None:
        if not path.exists() and not path.is_symlink():
            return
        if self.root is None:
            base = self.state_dir / "replaced"
            base.mkdir(mode=0o700, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%dT%H%M%SZ-", time.gmtime()), dir=base))
        target = self.root / relative
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.rename(path, target)


def restore(archive: Path, state_dir: Path, companies: list[str] | None = None, *, overwrite: bool = False,
            seq_gap: int = DEFAULT_SEQ_GAP, journal_in_state_dir: bool = True) -> Restored:
    """Restore archive into state_dir: every company and the journal (companies=None: the daemon
    must be stopped), or only the sessions of the companies named (each must be stopped).

    journal_in_state_dir: False when the configured store is PostgreSQL: no journal is written
    into state_dir, whatever the archive holds."""
    manifest = verify(archive)
    held = manifest.companies
    whole = companies is None
    wanted = sorted(held) if companies is None else list(dict.fromkeys(companies))
    for cid in wanted:
        if cid not in held:
            raise RestoreRefused(f"the archive holds no company {cid!r} (it holds: {', '.join(sorted(held)) or 'none'}); "
                                 "nothing was changed")
    state_lock: int | None = None
    holder = pidlock.holder(state_dir / STATE_LOCK_FILE) if whole and state_dir.exists() else None
    if holder is not None:
        raise RestoreRefused(f"whatsappd (pid {holder if holder > 0 else '?'}) is running on {state_dir}: stop it "
                             "first, or restore single stopped companies with --company; nothing was changed")
    _check_targets(manifest, state_dir, wanted, whole, overwrite, journal_in_state_dir)
    # Checked: from here on the target changes, under the locks that keep the daemon and the
    # companies' workers away while it does.
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    session_locks: list[int] = []
    staging = Path(tempfile.mkdtemp(prefix=".restore-", dir=state_dir))
    try:
        if whole:
            try:
                state_lock = pidlock.acquire(state_dir / STATE_LOCK_FILE)
            except pidlock.Held as exc:
                raise RestoreRefused(f"whatsappd (pid {exc.pid or '?'}) started on {state_dir} meanwhile: stop it "
                                     "first; nothing was changed") from None
        sessions_root = state_dir / "sessions"
        sessions_root.mkdir(mode=0o700, exist_ok=True)
        for cid in wanted:
            directory = session_dir(sessions_root, cid)
            directory.mkdir(mode=0o700, exist_ok=True)
            try:
                session_locks.append(pidlock.acquire(directory / LOCK_FILE))
            except pidlock.Held as exc:
                raise RestoreRefused(f"company {cid} started meanwhile (pid {exc.pid or '?'}): stop it first; "
                                     "nothing was changed") from None
        _check_targets(manifest, state_dir, [], whole, overwrite, journal_in_state_dir)
        for cid in wanted:  # again, under the locks
            if _paired(session_dir(sessions_root, cid)) and not overwrite:
                raise RestoreRefused(f"company {cid} was paired meanwhile: add --overwrite to replace it; nothing "
                                     "was changed")
        extract(archive, staging)
        journal = whole and journal_in_state_dir and (staging / JOURNAL).exists()
        if journal:
            _quick_check(staging / JOURNAL)
        for cid in wanted:
            for store in (staging / "sessions" / f"session-{cid}").glob("*.db"):
                _quick_check(store)
        result = _place(manifest, state_dir, staging, wanted, whole, seq_gap, journal)
        if whole:
            result.notes[:0] = _journal_notes(manifest, journal_in_state_dir)
        return result
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for fd in session_locks:
            os.close(fd)
        if state_lock is not None:
            os.close(state_lock)


def _journal_notes(manifest: Manifest, journal_in_state_dir: bool) -> list[str]:
    """What a whole restore says about a journal it did not restore (PostgreSQL on either side)."""
    notes = []
    if (database := manifest.external_journal) is not None:
        notes.append(f"the journal and outbox were in PostgreSQL ({database}) and are not in this archive: "
                     "restore them from your pg_dump of the whatsappd_* tables (README: Backups)")
    if not journal_in_state_dir:
        held = (f"; the archive's SQLite journal (up to seq {manifest.journal_last_seq}) was left out"
                if JOURNAL in manifest.files else "")
        notes.append(f"this configuration keeps the journal and outbox in PostgreSQL: no {JOURNAL} was written"
                     + held)
    return notes


def _place(manifest: Manifest, state_dir: Path, staging: Path, wanted: list[str], whole: bool,
           seq_gap: int, journal: bool) -> Restored:
    """Move the staged files into place; journal: the staged journal too (checked by the caller)."""
    result = Restored()
    mover = _Mover(state_dir)
    if journal:
        old = state_dir / JOURNAL
        last = max(manifest.journal_last_seq or 0, journal_head(old) if old.exists() else 0)
        _set_next_seq(staging / JOURNAL, last + seq_gap)
        for suffix in ("", "-wal", "-shm"):
            mover.aside(Path(f"{old}{suffix}"), f"{JOURNAL}{suffix}")
        os.rename(staging / JOURNAL, old)
        result.journal_next_seq = last + seq_gap + 1
    if whole and (staging / COMPANIES).exists():
        mover.aside(state_dir / COMPANIES, COMPANIES)
        os.rename(staging / COMPANIES, state_dir / COMPANIES)
    sessions_root = state_dir / "sessions"
    for cid in wanted:
        directory = session_dir(sessions_root, cid)
        staged = staging / "sessions" / directory.name
        for entry in sorted(directory.iterdir()):
            if entry.name != LOCK_FILE:  # ours, held: the directory stays locked until we are done
                mover.aside(entry, f"sessions/{directory.name}/{entry.name}")
        if staged.is_dir():
            for entry in sorted(staged.iterdir()):
                os.rename(entry, directory / entry.name)
        fsync_dir(directory)
        result.companies.append(cid)
        info = manifest.companies[cid]
        if info.get("source") == "config":
            result.notes.append(f"{cid} was defined in the backed-up config file (config.toml in the archive); "
                                "keep it in this host's config to keep its name and proxy")
    fsync_dir(sessions_root)
    fsync_dir(state_dir)
    result.replaced = mover.root
    return result

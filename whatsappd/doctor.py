"""`whatsappd doctor` and `GET /v1/doctor`: what is wrong with an installation, each with its fix.

A finding is data (`Finding`: check id, severity, subject, message, fix), so the CLI, the API's
JSON and the tests share one list. Two sources:

- `inspect_state_dir` reads the state directory and nothing else; it works whether the daemon
  runs or not, and never changes a file: stores are opened read-only with a short busy timeout,
  so a live writer is never held up (a store busy for longer is reported, not waited for).
  With `[store] backend = "postgresql"` the journal is not a file: `whatsappd.sqlite` is not
  looked for (a leftover one is not the journal), and the database is checked instead: that it
  answers, and that its schema is the one this whatsappd writes (`whatsappd migrate`).
- `inspect_live` looks at what only the running daemon knows: company states, and the last
  server time each worker saw (the supervisor passes `LiveCompany` records).

The check ids (`CHECKS`) are stable; scripts may match on them. Severity `error`: something is
broken or about to break; `warning`: worth a look, nothing is failing yet.
"""

from __future__ import annotations

import contextlib
import enum
import grp
import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whatsappd import pidlock
from whatsappd.config import Config
from whatsappd.ids import InvalidCompanyId, check_company_id
from whatsappd.legacy import LegacyError, format_size, scan_legacy
from whatsappd.sessions import LOCK_FILE
from whatsappd.sessionstore import NEONIZE_STORE, SessionState, session_state
from whatsappd.store import check_database, corrupt_fix
from whatsappd.supervisor import simdevice
from whatsappd.supervisor.devices import Device, PgDevices, Place, place
from whatsappd.timefmt import iso

__all__ = [
    "CHECKS", "CLOCK_SKEW_LIMIT", "JOURNAL_FILE", "Finding", "LiveCompany", "Severity", "expected_session_store_size",
    "inspect_live", "inspect_state_dir",
]

#: The daemon's journal/outbox database, and the lock it holds on the state directory.
JOURNAL_FILE = "whatsappd.sqlite"
STATE_LOCK = "whatsappd.lock"

#: Seconds a store may stay locked by a writer before its check gives up (a live daemon's
#: writer commits in milliseconds; the doctor must never make it wait).
BUSY_TIMEOUT = 1.0

#: WhatsApp refuses a client whose clock is far off (pairing and connecting fail with
#: cryptic errors); flagged beyond this many seconds between the server's time and ours.
CLOCK_SKEW_LIMIT = 30.0

#: Free space under which the state directory's filesystem is flagged: whichever is larger.
MIN_FREE_BYTES, MIN_FREE_FRACTION = 64 * 1024 * 1024, 0.02
MIN_FREE_INODES, MIN_FREE_INODE_FRACTION = 1000, 0.02

#: A session store (whatsmeow's store.db) is flagged above SESSION_BASE plus SESSION_PER_DAY
#: for each day since its session directory was created: the store grows with the contacts and
#: groups the number talks to (a Signal session and identity per device), never with the
#: messages themselves. 4 MiB + 64 KiB/day is about 27 MiB after a year. Where the filesystem
#: does not record the directory's birth time, the age counts as zero.
SESSION_BASE, SESSION_PER_DAY = 4 * 1024 * 1024, 64 * 1024
#: The journal is pruned (journal.max_age, journal.max_events), so its size does not grow with
#: age: flagged above JOURNAL_BASE plus JOURNAL_PER_EVENT for each event journal.max_events allows.
JOURNAL_BASE, JOURNAL_PER_EVENT = 64 * 1024 * 1024, 2048


class Severity(enum.StrEnum):
    ERROR = "error"
    WARNING = "warning"


#: Every check: its stable id and what it looks for.
CHECKS: dict[str, str] = {
    "state_dir_missing": "the state directory does not exist or is not a directory",
    "loose_mode": "a directory under the state directory open to group or others (want 0700), or a file (want 0600)",
    "wrong_owner": "an entry under the state directory owned by another user than the state directory's owner",
    "store_damaged": "PRAGMA integrity_check finds damage in a store (the journal/outbox or a session store)",
    "store_busy": "a store stayed locked by a writer too long to be checked",
    "store_large": "a store is larger than its age (sessions) or its limits (journal) explain",
    "store_unreachable": "the PostgreSQL store (store.dsn) does not answer",
    "store_schema": "the PostgreSQL store's schema is missing, older or newer than this whatsappd's",
    "legacy_browser": "a browser profile of the old CRM (whatsapp-web.js) under sessions/",
    "legacy_baileys": "a Baileys folder of the old CRM under sessions/",
    "orphan_session": "a session (on disk, or a device in PostgreSQL) that no company in the config or the registry owns",
    "no_session": "a company with no paired session where its sessions live (session directory, PostgreSQL, or the "
                  "shared simulator server)",
    "device_missing": "a company's recorded whatsmeow device (its JID in whatsappd_devices) has no row in PostgreSQL",
    "device_quarantined": "a company's PostgreSQL device mapping was moved aside (quarantined) and nothing replaced it",
    "session_unused": "a SQLite session store the daemon never reads: neonize sessions are in PostgreSQL",
    "foreign_lock": "a session's lock held by a process that is not one of the daemon's workers",
    "disk_space": "little free space on the state directory's filesystem",
    "disk_inodes": "few free inodes on the state directory's filesystem",
    "socket_mode": "the control socket's mode differs from control.socket_mode",
    "socket_group": "the control socket's group differs from control.socket_group",
    "clock_skew": "the system clock differs from the last server time a worker saw",
    "company_failed": "a company gave up (failed) and needs an operator",
    "company_banned": "a company is banned by WhatsApp",
    "company_outdated": "WhatsApp refuses the client version of a company",
}


@dataclass(frozen=True)
class Finding:
    check: str  # a key of CHECKS
    severity: Severity
    subject: str  # a path, a company id, or the daemon
    message: str
    fix: str

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "severity": str(self.severity), "subject": self.subject,
                "message": self.message, "fix": self.fix}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Finding:
        return cls(str(data["check"]), Severity(data["severity"]), str(data["subject"]), str(data["message"]),
                   str(data["fix"]))

    def line(self) -> str:
        """One line: severity, check, subject, what, and the fix."""
        return f"{self.severity.upper()} [{self.check}] {self.subject}: {self.message}. Fix: {self.fix}"


def _finding(check: str, severity: Severity, subject: object, message: str, fix: str) -> Finding:
    assert check in CHECKS, check
    return Finding(check, severity, str(subject), message, fix)


# ============================================================================ the state directory


def inspect_state_dir(config: Config, *, daemon_pid: int | None = None, now: float | None = None) -> list[Finding]:
    """Every finding about config's state directory and control socket; changes nothing.

    daemon_pid: the daemon's pid when the caller is the daemon; otherwise the holder of the
    state directory's lock, if any, is taken as the daemon.
    """
    root = config.daemon_state_dir
    if not root.is_dir():
        return [_finding("state_dir_missing", Severity.WARNING, root, "the state directory does not exist",
                         "start the daemon once (it creates it), or set daemon.state_dir to the right place")]
    now = time.time() if now is None else now
    if daemon_pid is None:
        daemon_pid = pidlock.holder(root / STATE_LOCK)
    found: list[Finding] = []
    found += _modes(root)
    found += _stores(config, now)
    database = _database(config)
    found += database
    found += _legacy(config.sessions_dir)
    found += _companies(config, database_ok=not any(f.check == "store_unreachable" for f in database))
    found += _locks(config.sessions_dir, daemon_pid)
    found += _disk(root)
    found += _socket(config)
    return found


def _walk(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """root and every entry beneath it, links not followed (a link is listed, never entered)."""
    stack = [root]
    while stack:
        path = stack.pop()
        try:
            st = path.lstat()
        except OSError:
            continue
        yield path, st
        if stat.S_ISDIR(st.st_mode):
            try:
                stack.extend(sorted(path.iterdir(), reverse=True))
            except OSError:
                continue


def _modes(root: Path) -> list[Finding]:
    found: list[Finding] = []
    owner = root.stat().st_uid
    for path, st in _walk(root):
        is_dir = stat.S_ISDIR(st.st_mode)
        if st.st_uid != owner:
            found.append(_finding(
                "wrong_owner", Severity.ERROR, path,
                f"owned by uid {st.st_uid}, not by the state directory's owner (uid {owner})",
                f"chown -R {owner} {root} (with the daemon stopped)"))
        if not (is_dir or stat.S_ISREG(st.st_mode)):
            continue
        mode = stat.S_IMODE(st.st_mode)
        want = 0o700 if is_dir else 0o600
        if mode & 0o077:
            found.append(_finding(
                "loose_mode", Severity.ERROR, path,
                f"mode {mode:04o} lets {'group and others' if mode & 0o007 else 'the group'} "
                f"{'list and enter it' if is_dir else 'read it'}; it holds session keys or messages",
                f"chmod {want:04o} {path}"))
    return found


def _stores(config: Config, now: float) -> list[Finding]:
    found: list[Finding] = []
    journal = config.daemon_state_dir / JOURNAL_FILE
    session_stores = _file_stores(config)
    in_state_dir = config.store_backend == "sqlite" and journal.is_file()
    for path in ([journal] if in_state_dir else []) + session_stores:
        is_journal = path == journal
        for problem in check_database(path, timeout=BUSY_TIMEOUT):
            busy = "locked" in problem or "busy" in problem
            if busy:
                found.append(_finding("store_busy", Severity.WARNING, path,
                                      f"could not be checked: {problem}",
                                      "run the doctor again; if it stays busy, see what holds it (fuser -v FILE)"))
                break
            fix = (corrupt_fix(path) if is_journal else
                   "restore the session from a backup with the daemon stopped (whatsappd restore); else the "
                   "daemon quarantines it at the company's next start and the company must be paired again")
            found.append(_finding("store_damaged", Severity.ERROR, path, f"integrity_check: {problem}", fix))
        size = _db_size(path)
        if is_journal:
            limit = JOURNAL_BASE + JOURNAL_PER_EVENT * config.journal_max_events
            age_text = f"journal.max_events = {config.journal_max_events}"
        else:
            age_days = max(0.0, now - born) / 86400 if (born := _birth_time(path.parent)) else 0.0
            limit = expected_session_store_size(age_days)
            age_text = f"a session {age_days:.0f} days old"
        if size > limit:
            tables = ", ".join(f"{name} {format_size(n)}" for name, n in _biggest_tables(path))
            fix = ("lower journal.max_age or journal.max_events; the space is reused, and VACUUM with the daemon "
                   "stopped gives it back" if is_journal else
                   "look at what fills those tables (a number in very many groups?); if it is not expected, "
                   "unlink the device and pair again (whatsappctl logout, then connect)")
            found.append(_finding(
                "store_large", Severity.WARNING, path,
                f"{format_size(size)} is more than the {format_size(limit)} expected for {age_text}"
                + (f"; biggest tables: {tables}" if tables else ""), fix))
    return found


def _file_stores(config: Config) -> list[Path]:
    """The whatsmeow SQLite stores that are sessions: none when neonize sessions are in PostgreSQL."""
    if place(config.whatsmeow_dsn, "neonize") is not Place.FILES:
        return []
    return sorted(config.sessions_dir.glob(f"session-*/{NEONIZE_STORE}"))


def _database(config: Config) -> list[Finding]:
    """The PostgreSQL store, when it is the configured one: does it answer, is its schema ours?
    (Read-only: one short connection; psycopg is imported only then.)"""
    if config.store_backend != "postgresql":
        return []
    import psycopg

    from whatsappd.store.postgresql import SCHEMA_VERSION, redact

    where = redact(config.store_dsn)
    try:
        with psycopg.connect(config.store_dsn, autocommit=True, connect_timeout=5) as db:
            exists = db.execute("SELECT to_regclass('whatsappd_meta') IS NOT NULL").fetchone()
            row = (db.execute("SELECT value FROM whatsappd_meta WHERE key = 'schema_version'").fetchone()
                   if exists and exists[0] else None)
    except psycopg.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [_finding("store_unreachable", Severity.ERROR, where, f"cannot connect: {reason.replace(config.store_dsn, where)}",
                         "check store.dsn, that the server runs and that the role may log in (a password "
                         "belongs in ~/.pgpass, not in the DSN)")]
    version = int(row[0]) if row else 0
    if version == SCHEMA_VERSION:
        return []
    if version > SCHEMA_VERSION:
        return [_finding("store_schema", Severity.ERROR, where,
                         f"schema {version} was written by a newer whatsappd (this one knows {SCHEMA_VERSION}); "
                         "the daemon refuses it", "upgrade whatsappd")]
    return [_finding("store_schema", Severity.WARNING, where,
                     f"schema {version or 'missing'}, this whatsappd writes {SCHEMA_VERSION}",
                     "run whatsappd migrate --config FILE (the daemon also migrates at start)")]


def expected_session_store_size(age_days: float) -> int:
    """The size above which a session store of this age is flagged (see SESSION_BASE)."""
    return int(SESSION_BASE + SESSION_PER_DAY * age_days)


def _db_size(path: Path) -> int:
    total = 0
    for name in (path.name, f"{path.name}-wal"):
        try:
            total += (path.parent / name).stat().st_size
        except OSError:
            pass
    return total


def _biggest_tables(path: Path, count: int = 3) -> list[tuple[str, int]]:
    """The tables (and indexes) taking the most bytes, from SQLite's dbstat; [] if unavailable."""
    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
    except sqlite3.Error:
        return []
    try:
        rows = db.execute("SELECT name, SUM(pgsize) AS size FROM dbstat GROUP BY name ORDER BY size DESC LIMIT ?",
                          (count,)).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    return [(str(name), int(size)) for name, size in rows]


def _birth_time(path: Path) -> float | None:
    """When path was created, where the kernel and filesystem record it (statx), else None."""
    import ctypes

    class _Timestamp(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("_pad", ctypes.c_int32)]

    class _Statx(ctypes.Structure):
        _fields_ = [("stx_mask", ctypes.c_uint32), ("stx_blksize", ctypes.c_uint32),
                    ("stx_attributes", ctypes.c_uint64), ("stx_nlink", ctypes.c_uint32),
                    ("stx_uid", ctypes.c_uint32), ("stx_gid", ctypes.c_uint32), ("stx_mode", ctypes.c_uint16),
                    ("_pad1", ctypes.c_uint16), ("stx_ino", ctypes.c_uint64), ("stx_size", ctypes.c_uint64),
                    ("stx_blocks", ctypes.c_uint64), ("stx_attributes_mask", ctypes.c_uint64),
                    ("stx_atime", _Timestamp), ("stx_btime", _Timestamp), ("_rest", ctypes.c_uint8 * 160)]

    statx_btime, at_fdcwd, at_symlink_nofollow = 0x800, -100, 0x100
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = _Statx()
        rc = libc.statx(at_fdcwd, os.fsencode(path), at_symlink_nofollow, statx_btime, ctypes.byref(buf))
    except (OSError, AttributeError):
        return None
    if rc != 0 or not buf.stx_mask & statx_btime or buf.stx_btime.tv_sec <= 0:
        return None
    return float(buf.stx_btime.tv_sec) + float(buf.stx_btime.tv_nsec) / 1e9


def _legacy(sessions_root: Path) -> list[Finding]:
    try:
        scan = scan_legacy(sessions_root)
    except LegacyError:
        return []  # no sessions directory yet
    found = []
    for session in scan.found:
        if session.kind == "browser":
            found.append(_finding(
                "legacy_browser", Severity.WARNING, session.path,
                f"a browser profile of the old CRM ({session.describe()}); whatsappd never uses it",
                "whatsappd clean-sessions --dry-run, then whatsappd clean-sessions"))
        else:
            company = session.company_id or "ID"
            found.append(_finding(
                "legacy_baileys", Severity.WARNING, session.path,
                f"a Baileys session of the old CRM ({session.describe()}), not moved to whatsappd",
                f"move it out of sessions/ and import it without a QR scan (whatsappd import-baileys --from DIR "
                f"--company {company}), or remove it (whatsappd clean-sessions)"))
    return found


def _registry(state_dir: Path) -> dict[str, str]:
    """Company id -> engine from companies.json, read without touching the file (an unreadable file: none)."""
    try:
        data = json.loads((state_dir / "companies.json").read_text(encoding="utf-8"))
        companies = data.get("companies") if isinstance(data, dict) else None
        return {c["id"]: str(c.get("engine", "neonize")) for c in companies or ()
                if isinstance(c, dict) and isinstance(c.get("id"), str)}
    except (OSError, ValueError):
        return {}


def _session_dirs(sessions_root: Path) -> Iterator[tuple[str, Path]]:
    """(company id, directory) of every session-{id} directory with a valid id, links skipped."""
    try:
        children = sorted(sessions_root.iterdir())
    except OSError:
        return
    for child in children:
        if not child.name.startswith("session-") or child.is_symlink() or not child.is_dir():
            continue
        try:
            yield check_company_id(child.name.removeprefix("session-")), child
        except InvalidCompanyId:
            continue


@dataclass
class _PgDevices:
    """What the PostgreSQL place holds (read once): every recorded device, every quarantined
    mapping, and the cluster's company registry."""

    devices: dict[str, Device]
    quarantined: list[tuple[str, str, str, Any]]
    registry: dict[str, str]


def _pg_devices(config: Config) -> _PgDevices | None:
    """None when neonize sessions are files, or the database cannot say (the store checks report why)."""
    if config.whatsmeow_dsn is None or place(config.whatsmeow_dsn, "neonize") is Place.FILES:
        return None
    import psycopg

    pg = PgDevices(config.store_dsn, config.whatsmeow_dsn)
    try:
        registry: dict[str, str] = {}
        if config.cluster_enabled:
            with contextlib.suppress(psycopg.errors.UndefinedTable), \
                    psycopg.connect(config.store_dsn, autocommit=True, connect_timeout=5) as db:
                registry = {str(c): str((conf or {}).get("engine", "neonize")) for c, conf in
                            db.execute("SELECT company, config FROM whatsappd_companies")}
        return _PgDevices(pg.all(), pg.quarantined(), registry)
    except psycopg.Error:
        return None  # no schema yet (store_schema says so) or no answer (store_unreachable)
    finally:
        pg.close()


def _companies(config: Config, database_ok: bool = True) -> list[Finding]:
    """Sessions no company owns, and companies without a session, each asked where its session
    lives (supervisor/devices.py's place: the session directory, PostgreSQL, or the shared
    simulator server, supervisor/simdevice.py)."""
    pg = _pg_devices(config) if database_ok else None
    known = {**_registry(config.daemon_state_dir), **(pg.registry if pg else {}),
             **{c.id: c.engine for c in config.companies}}
    found = []
    for company, directory in _session_dirs(config.sessions_dir):
        engine = "neonize" if (directory / NEONIZE_STORE).exists() else "simulator"
        state = session_state(directory)
        if place(config.whatsmeow_dsn, engine) is not Place.FILES:
            if state is not SessionState.NONE:
                found.append(_finding(
                    "session_unused", Severity.WARNING, directory / NEONIZE_STORE,
                    f"a whatsmeow SQLite store of company {company!r}, but neonize sessions are in PostgreSQL "
                    "([store] backend): the daemon never reads it",
                    f"keep it outside sessions/ as a backup (mv {directory / NEONIZE_STORE} somewhere safe); pair the "
                    f"company in PostgreSQL with whatsappctl connect {company}"))
            continue
        if company not in known and state is not SessionState.NONE:
            found.append(_finding(
                "orphan_session", Severity.WARNING, config.sessions_dir / f"session-{company}",
                f"a session of company {company!r}, which neither the config nor companies.json names; the "
                "daemon runs it as a discovered company",
                f"keep it: whatsappctl add {company} --name NAME; or remove it: whatsappctl remove {company} --wipe"))
    for company, recorded in sorted(pg.devices.items()) if pg else ():
        if company not in known and recorded.state is SessionState.PAIRED:
            found.append(_finding(
                "orphan_session", Severity.WARNING, company,
                f"a device in PostgreSQL (JID {recorded.jid}) recorded for company {company!r}, which neither the config "
                "nor the registry names; the daemon runs it as a discovered company",
                f"keep it: whatsappctl add {company} --name NAME; or remove it: whatsappctl remove {company} --wipe"))
    moved: dict[str, tuple[str, str, Any]] = {}
    for company, jid, reason, at in pg.quarantined if pg else ():
        moved.setdefault(company, (jid, reason, at))
    for company, engine in sorted(known.items()):
        shared = simdevice.shared_device(config.simulator_server_dir, company, engine)
        if shared is not None:
            state = shared.state()
        elif place(config.whatsmeow_dsn, engine) is Place.POSTGRESQL:
            if pg is None:
                continue  # the database did not answer: nothing can be said of its devices
            device = pg.devices.get(company)
            if device is not None and device.state is not SessionState.PAIRED:
                found.append(_finding(
                    "device_missing", Severity.ERROR, company,
                    f"its recorded device {device.jid} has no row in whatsmeow's PostgreSQL store (the phone unlinked "
                    "it, or the row was deleted), so the company is not paired",
                    f"pair it again: whatsappctl connect {company} (scan the QR; the new device is recorded), or "
                    f"whatsappctl pair-code {company} PHONE"))
                continue
            if device is None and company in moved:
                jid, reason, at = moved[company]
                found.append(_finding(
                    "device_quarantined", Severity.WARNING, company,
                    f"its device {jid} was quarantined ({reason}) at {iso(at.timestamp())}; its rows are kept in "
                    "whatsmeow_device, but no device is recorded for the company now",
                    f"if that device is sound, record it again: INSERT INTO whatsappd_devices (company, jid) VALUES "
                    f"('{company}', '{jid}'), then whatsappctl restart {company}; else pair: whatsappctl connect "
                    f"{company}"))
                continue
            state = device.state if device is not None else SessionState.NONE
        else:
            state = session_state(config.sessions_dir / f"session-{company}")
        if state is not SessionState.PAIRED:
            found.append(_finding(
                "no_session", Severity.WARNING, company, "the company has no paired session, so it cannot send",
                f"pair it: whatsappctl connect {company} (scan the QR), or whatsappctl pair-code {company} PHONE"))
    return found


def _ancestors(pid: int) -> Iterator[int]:
    """pid's parent, grandparent, ... from /proc."""
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 0)
        yield ppid
        pid = ppid


def _command_line(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120] or "?"


def _locks(sessions_root: Path, daemon_pid: int | None) -> list[Finding]:
    found = []
    for company, directory in _session_dirs(sessions_root):
        holder = pidlock.holder(directory / LOCK_FILE)
        if holder is None or holder == -1:
            continue
        if daemon_pid is not None and daemon_pid > 0 and daemon_pid in _ancestors(holder):
            continue  # one of the daemon's workers (or a zygote's child)
        whose = "no whatsappd is running on this state directory" if not daemon_pid else \
            f"it is not a worker of the daemon (pid {daemon_pid})"
        found.append(_finding(
            "foreign_lock", Severity.ERROR, directory / LOCK_FILE,
            f"pid {holder} ({_command_line(holder)}) holds company {company!r}'s session lock, and {whose}; the "
            "company cannot start while it does",
            f"find out what pid {holder} is and stop it (two processes must never use one session)"))
    return found


def _disk(root: Path) -> list[Finding]:
    try:
        fs = os.statvfs(root)
    except OSError:
        return []
    found = []
    free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    if free < max(MIN_FREE_BYTES, MIN_FREE_FRACTION * total):
        found.append(_finding(
            "disk_space", Severity.ERROR if free == 0 else Severity.WARNING, root,
            f"{format_size(free)} free of {format_size(total)}; at none, nothing can be queued or journaled "
            "(storage_full)", "free space on that filesystem, or move daemon.state_dir to a larger one"))
    # f_files 0: the filesystem does not count inodes
    if fs.f_files and fs.f_favail < max(MIN_FREE_INODES, MIN_FREE_INODE_FRACTION * fs.f_files):
        found.append(_finding(
            "disk_inodes", Severity.ERROR if fs.f_favail == 0 else Severity.WARNING, root,
            f"{fs.f_favail} free inodes of {fs.f_files}; new files (media, session stores) cannot be created",
            "remove many small files on that filesystem, or move daemon.state_dir to another one"))
    return found


def _socket(config: Config, path: Path | None = None) -> list[Finding]:
    path = path or config.control_socket_path
    try:
        st = path.lstat()
    except OSError:
        return []  # no daemon bound it (or systemd holds it elsewhere)
    if not stat.S_ISSOCK(st.st_mode):
        return []
    found = []
    mode, want = stat.S_IMODE(st.st_mode), config.control_socket_mode
    if mode != want:
        found.append(_finding(
            "socket_mode", Severity.ERROR if mode & ~want & 0o007 else Severity.WARNING, path,
            f"mode {mode:04o}, but control.socket_mode is {want:04o}",
            f"chmod {want:04o} {path} (the daemon sets it when it binds the socket: restart it; under systemd "
            "socket activation, set SocketMode= in whatsappd.socket)"))
    if config.control_socket_group:
        try:
            gid = grp.getgrnam(config.control_socket_group).gr_gid
        except KeyError:
            gid = None
        if gid != st.st_gid:
            found.append(_finding(
                "socket_group", Severity.ERROR, path,
                f"group {_group_name(st.st_gid)}, but control.socket_group is {config.control_socket_group!r}",
                f"chgrp {config.control_socket_group} {path} (or restart the daemon, which sets it; under systemd "
                "socket activation, set SocketGroup= in whatsappd.socket)"))
    return found


def _group_name(gid: int) -> str:
    try:
        return f"{grp.getgrgid(gid).gr_name!r} ({gid})"
    except KeyError:
        return str(gid)


# ============================================================================ the running daemon


@dataclass(frozen=True)
class LiveCompany:
    """What the running daemon knows of one company, for inspect_live."""

    id: str
    state: str
    since: float
    reason: str | None = None
    last_error: dict[str, Any] | None = None
    banned_until: float | None = None
    #: (server time, our clock when the worker saw it), both Unix times; None: never seen.
    server_clock: tuple[float, float] | None = None


def inspect_live(config: Config, socket_path: str, companies: Iterable[LiveCompany]) -> list[Finding]:
    """Findings only the running daemon can make: company states, clock skew, its own socket."""
    found = _socket(config, Path(socket_path)) if socket_path != str(config.control_socket_path) else []
    for c in companies:
        since = iso(c.since)
        error = c.last_error or {}
        detail = f": {error.get('message')} [{error.get('code')}]" if error.get("message") else \
            (f": {c.reason}" if c.reason else "")
        if c.state == "failed":
            found.append(_finding("company_failed", Severity.ERROR, c.id, f"failed since {since}{detail}",
                                  f"fix the cause, then whatsappctl restart {c.id} (whatsappctl status {c.id} "
                                  "shows the last error)"))
        elif c.state == "banned":
            until = f" until {iso(c.banned_until)}" if c.banned_until else ""
            found.append(_finding("company_banned", Severity.ERROR, c.id, f"banned since {since}{until}{detail}",
                                  "wait for the ban to end (the daemon retries then); do not reconnect by hand "
                                  "and review what the number sent"))
        elif c.state == "outdated":
            found.append(_finding("company_outdated", Severity.ERROR, c.id,
                                  f"WhatsApp refuses this client version since {since}",
                                  "upgrade whatsappd (it brings a newer WhatsApp library), then "
                                  f"whatsappctl restart {c.id}"))
        if c.server_clock is not None:
            server, local = c.server_clock
            skew = server - local
            if abs(skew) > CLOCK_SKEW_LIMIT:
                ahead = "behind" if skew > 0 else "ahead of"
                found.append(_finding(
                    "clock_skew", Severity.ERROR, c.id,
                    f"this machine's clock is {abs(skew):.0f} s {ahead} WhatsApp's server time (seen {iso(local)}); "
                    "WhatsApp refuses clients with a skewed clock",
                    "synchronise the clock (timedatectl set-ntp true, or chrony/ntpd), then "
                    f"whatsappctl restart {c.id}"))
    return found


# ============================================================================ output


def report_text(findings: Iterable[Finding]) -> str:
    """One line per finding (each field escaped: a path or a reason may hold anything), then a summary."""
    from whatsappd.terminal import escape

    findings = list(findings)
    if not findings:
        return "no problems found"
    errors = sum(1 for f in findings if f.severity is Severity.ERROR)
    return "\n".join([*(escape(f.line()) for f in findings),
                      f"{len(findings)} findings ({errors} errors, {len(findings) - errors} warnings)"])


def print_findings(findings: list[Finding], as_json: bool) -> int:
    """Print the findings (text or JSON) to stdout; the exit status: 0 clean, 1 anything found."""
    if as_json:
        print(json.dumps({"clean": not findings, "findings": [f.as_json() for f in findings]}, indent=2))
    else:
        print(report_text(findings))
    return 1 if findings else 0

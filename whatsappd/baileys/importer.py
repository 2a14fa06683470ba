"""One company's import, start to finish, with every safety rule; and a whole CRM root.

Order, so that a refusal at any step leaves everything as it was:

1. the target: refused if the company's worker holds the session lock or a session exists
   (looked at only: nothing is created);
2. the source: read once into memory (`source.read_snapshot`, refused if a file changed within
   `min_idle` seconds) and converted with every key checked (`convert.convert`);
3. the store: written to a temporary directory beside the sessions (same file system), checked
   (`integrity_check`, `foreign_key_check`), fsync'ed, then opened by neonize in a subprocess,
   which must list the expected JID;
4. the source is read again: any file added, removed or changed aborts;
5. under the session lock, with the target re-checked, the store and the provenance file are
   hard-linked into `session-{id}/` (a link never replaces an existing file), then fsync'ed.

A dry run stops after step 2 with the store built and checked in memory, writing nothing.

With the PostgreSQL store (`pg`: a neonize company's session is a device row there, see
supervisor/devices.py), steps 1-4 are the same (plus: refused if the company already has a
recorded JID or the JID already has a row), and step 5 copies the verified store's rows into
whatsmeow's PostgreSQL tables and records the JID, in one transaction (baileys/pgstore.py),
still under the session lock; only the provenance file goes into `session-{id}/`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whatsappd import __version__
from whatsappd.baileys.convert import Conversion, convert
from whatsappd.baileys.pgstore import PgTarget, check_target, copy_device
from whatsappd.baileys.report import ImportReport, Refused
from whatsappd.baileys.source import Snapshot, read_snapshot
from whatsappd.baileys.verify import listed_jids
from whatsappd.baileys.whatsmeow import build_in_memory, check_store, write_store
from whatsappd.errors import ErrorCode
from whatsappd.ids import InvalidCompanyId, check_company_id, session_dir
from whatsappd.legacy import LegacyError, scan_legacy
from whatsappd.sessions import LOCK_FILE, NEONIZE_STORE, SIMULATOR_FILE, lock_session
from whatsappd.timefmt import iso

__all__ = ["DEFAULT_MIN_IDLE", "PROVENANCE_FILE", "RootReport", "import_company", "import_root"]

DEFAULT_MIN_IDLE = 120.0
PROVENANCE_FILE = "baileys-import.json"
_SESSION_FILES = (NEONIZE_STORE, NEONIZE_STORE + "-wal", NEONIZE_STORE + "-shm", SIMULATOR_FILE)


def import_company(source: Path, company: str, sessions_root: Path, *, dry_run: bool = False,
                   min_idle: float = DEFAULT_MIN_IDLE, pg: PgTarget | None = None) -> ImportReport:
    """Import one Baileys folder as company's session; never raises for a refusal (see the report).

    pg: the company's session is in PostgreSQL (PgTarget.of: the config's place for neonize)."""
    report = ImportReport(company=company, source=str(source), target="", dry_run=dry_run)
    try:
        check_company_id(company)
        target = session_dir(sessions_root, company)
        report.target = str(target)
        _check_target(target, source, files=pg is None)
        snapshot = read_snapshot(source, min_idle)
        conversion = convert(snapshot)
        _fill(report, conversion)
        if pg is not None:
            report.target = f"{pg.where()}, device {conversion.device.jid}"
            check_target(pg, company, conversion.device.jid)
        if dry_run:
            build_in_memory(conversion)
            _unchanged(snapshot)
        else:
            _write(snapshot, conversion, sessions_root, target, report, pg, company)
    except InvalidCompanyId as exc:
        return report.refuse(Refused(ErrorCode.INVALID_COMPANY_ID, str(exc)))
    except Refused as exc:
        return report.refuse(exc)
    report.ok = True
    return report


def _check_target(target: Path, source: Path, files: bool = True) -> None:
    if target.is_symlink():
        raise Refused(ErrorCode.SESSION_EXISTS, f"{target} is a symbolic link; a session directory may not be one, and an "
                      "import never writes through a link: remove it first")
    if not target.exists():
        return
    with contextlib.suppress(OSError):
        if os.path.samefile(target, source):
            raise Refused(ErrorCode.SESSION_EXISTS, f"{target} is the Baileys folder itself: whatsappd's sessions directory "
                          "must not be the CRM's (point whatsappd's state_dir elsewhere)")
    if _locked(target):
        raise Refused(ErrorCode.COMPANY_RUNNING, f"the company's worker is running (it holds {target / LOCK_FILE}); stop "
                      "the company in whatsappd before importing")
    present = [name for name in _SESSION_FILES if (target / name).exists()] if files else []
    if present:
        raise Refused(ErrorCode.SESSION_EXISTS, f"{target} already holds a whatsappd session ({present[0]}); an import never "
                      "overwrites one: remove that session first (whatsappctl logout, or delete the directory)")


def _locked(target: Path) -> bool:
    """True if a process holds the session lock. Only looks: never creates the lock file."""
    try:
        fd = os.open(target / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may just have taken
    return False


def _fill(report: ImportReport, conversion: Conversion) -> None:
    d = conversion.device
    report.jid, report.lid, report.push_name, report.platform = d.jid, d.lid, d.push_name, d.platform
    report.creds_sha256 = conversion.creds_sha256
    report.baileys_layout = conversion.layout
    report.counts = conversion.counts()
    report.checks = {"key_pairs": conversion.key_pairs, "signatures": conversion.signatures}
    report.unmapped = list(conversion.unmapped)
    report.warnings = list(conversion.warnings)


def _unchanged(snapshot: Snapshot) -> None:
    change = snapshot.changes()
    if change is not None:
        raise Refused(ErrorCode.SOURCE_CHANGED, f"{snapshot.directory}: {change} during the import, so Baileys may still be "
                      "running; nothing was written: stop the CRM's WhatsApp module and run the import again")


def _write(snapshot: Snapshot, conversion: Conversion, sessions_root: Path, target: Path, report: ImportReport,
           pg: PgTarget | None, company: str) -> None:
    try:
        sessions_root.mkdir(mode=0o700, parents=True, exist_ok=True)  # as sessions.ensure_root, without logging
        work = Path(tempfile.mkdtemp(prefix=f".import-{target.name}-", dir=sessions_root))
    except OSError as exc:
        raise Refused(ErrorCode.WRITE_FAILED, f"cannot write in {sessions_root} ({exc.strerror})") from None
    try:
        store = work / NEONIZE_STORE
        _build(store, conversion)
        try:
            jids = listed_jids(store)
        except RuntimeError as exc:
            raise Refused(ErrorCode.NEONIZE_CHECK_FAILED, f"{exc}; nothing was written") from None
        if conversion.device.jid not in jids:
            raise Refused(ErrorCode.NEONIZE_CHECK_FAILED, f"neonize opened the converted store but lists {jids or 'no device'}, "
                          f"not {conversion.device.jid}; nothing was written")
        report.neonize_jid = conversion.device.jid
        provenance = work / PROVENANCE_FILE
        _write_file(provenance, json.dumps(_provenance(snapshot, report), indent=1, ensure_ascii=False).encode() + b"\n")
        _unchanged(snapshot)
        if pg is None:
            _place(work, target, (NEONIZE_STORE, PROVENANCE_FILE))
        else:
            jid = conversion.device.jid
            _place(work, target, (PROVENANCE_FILE,), put=lambda: copy_device(store, pg, company, jid))
        report.provenance = str(target / PROVENANCE_FILE)
    except OSError as exc:
        raise Refused(ErrorCode.WRITE_FAILED, f"the store could not be written ({exc.strerror or exc}); nothing was "
                      "put in place") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build(store: Path, conversion: Conversion) -> None:
    fd = os.open(store, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    os.close(fd)
    with contextlib.closing(sqlite3.connect(store)) as db:
        write_store(db, conversion)
        check_store(db)
    for suffix in ("-journal", "-wal", "-shm"):
        if Path(str(store) + suffix).exists():
            raise Refused(ErrorCode.STORE_CHECK_FAILED, f"SQLite left {store.name}{suffix} behind; the store is not complete")
    _fsync(store)


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place(work: Path, target: Path, names: tuple[str, ...], put: Callable[[], object] | None = None) -> None:
    """Link the finished files into target under its session lock; never replace anything.

    put: the session is elsewhere (PostgreSQL): put() puts it there, under the lock, and target
    only receives the provenance file (an older one is kept, renamed by its time).

    Run as root, the files are given to the owner of the sessions directory (the daemon's user),
    who must be able to open them: the daemon refuses session files owned by another user.
    """
    created = False
    try:
        target.mkdir(mode=0o700)
        created = True
    except FileExistsError:
        if target.is_symlink() or not target.is_dir():
            raise Refused(ErrorCode.SESSION_EXISTS, f"{target} became something other than a directory during the import; "
                          "nothing was put in place") from None
    os.chmod(target, 0o700)
    owner = target.parent.stat()
    if os.geteuid() == 0:
        for path in [*(work / name for name in names), *([target] if created else [])]:
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    lock_existed = (target / LOCK_FILE).exists()
    lock = lock_session(target)
    if lock is not None and not lock_existed and os.geteuid() == 0:
        os.chown(target / LOCK_FILE, owner.st_uid, owner.st_gid, follow_symlinks=False)
    if lock is None:
        raise Refused(ErrorCode.COMPANY_RUNNING, f"the company's worker started during the import (it holds "
                      f"{target / LOCK_FILE}); nothing was put in place")
    linked: list[Path] = []
    try:
        present = [name for name in _SESSION_FILES if (target / name).exists()] if put is None else []
        if present:
            raise Refused(ErrorCode.SESSION_EXISTS, f"{target} received a session ({present[0]}) during the import; it was "
                          "left alone and nothing was put in place")
        if put is not None:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    older = target / name
                    older.rename(older.with_name(f"{name}.{int(older.stat().st_mtime)}"))
            put()
        for name in names:
            try:
                os.link(work / name, target / name)
            except FileExistsError:
                raise Refused(ErrorCode.SESSION_EXISTS, f"{target / name} appeared during the import; it was left alone") from None
            linked.append(target / name)
        _fsync(target)
        if created:
            _fsync(target.parent)
    except BaseException:
        for path in linked:
            path.unlink(missing_ok=True)
        raise
    finally:
        os.close(lock)


def _provenance(snapshot: Snapshot, report: ImportReport) -> dict[str, Any]:
    return {
        "imported_at": iso(time.time()),
        "imported_by": f"whatsappd {__version__} import-baileys",
        "source": str(snapshot.directory.resolve()),
        "creds_sha256": report.creds_sha256,
        "files_sha256": {name: f.sha256 for name, f in sorted(snapshot.files.items())},
        "baileys_layout": report.baileys_layout,
        "jid": report.jid,
        "lid": report.lid,
        "counts": report.counts,
        "checks": report.checks,
        "skipped": [{"item": u.item, "reason": u.reason} for u in report.unmapped],
        "warnings": report.warnings,
    }


@dataclass
class RootReport:
    """`--from-root`: one report per Baileys folder taken, and what was passed over."""

    root: str
    reports: list[ImportReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.reports)


def import_root(root: Path, sessions_root: Path, companies: list[str] | None, *, dry_run: bool = False,
                min_idle: float = DEFAULT_MIN_IDLE, pg: PgTarget | None = None) -> RootReport:
    """Import the Baileys folders `session-{id}` under root (all, or only companies).

    Folders are classified as `whatsappd clean-sessions` does (whatsappd.legacy): browser
    profiles, folders that also hold whatsappd files, links and unreadable entries are passed
    over and reported; folders that are neither kind are not mentioned.
    """
    out = RootReport(str(root))
    try:
        scan = scan_legacy(root)
    except LegacyError as exc:
        raise Refused(ErrorCode.SOURCE_NOT_FOUND, str(exc)) from None
    wanted = None if companies is None else list(dict.fromkeys(companies))
    found: dict[str, Path] = {}
    for session in scan.found:
        if session.kind != "baileys":
            out.skipped.append({"path": str(session.path), "reason": "a browser profile (whatsapp-web.js): it holds "
                                "no keys to move; that company pairs with a QR code"})
        elif session.company_id is None:
            out.skipped.append({"path": str(session.path), "reason": "its name is not session-<company id>"})
        elif wanted is None or session.company_id in wanted:
            found[session.company_id] = session.path
    for skipped in scan.skipped:
        out.skipped.append({"path": str(skipped.path), "reason": skipped.reason})
    for company in wanted if wanted is not None else sorted(found):
        if company not in found:
            report = ImportReport(company=company, source=str(root / f"session-{company}"), target="", dry_run=dry_run)
            out.reports.append(report.refuse(Refused(ErrorCode.SOURCE_NOT_FOUND, f"{root} has no Baileys folder session-{company}")))
            continue
        out.reports.append(import_company(found[company], company, sessions_root, dry_run=dry_run, min_idle=min_idle,
                                          pg=pg))
    return out


"""Session directories on disk: `{state_dir}/sessions/session-{id}/`.

The one module that creates, inspects, wipes and quarantines them. Directories are 0700 and
files 0600; the worker holds `whatsappd.lock` while it runs the session, so no two processes
(not even two daemons on one state dir) ever use the same credentials.
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from whatsappd import pidlock
from whatsappd.ids import InvalidCompanyId, check_company_id, session_dir
from whatsappd.logs import get_logger
from whatsappd.sessionstore import NEONIZE_STORE, SIMULATOR_FILE, SessionState, engine_of, session_state

__all__ = [
    "LOCK_FILE",
    "NEONIZE_STORE",
    "SIMULATOR_FILE",
    "SessionProblem",
    "SessionState",
    "discover",
    "ensure_root",
    "fix_permissions",
    "has_session",
    "lock_session",
    "session_state",
    "stamp",
    "quarantine",
    "wipe",
]

log = get_logger()

LOCK_FILE = "whatsappd.lock"
QUARANTINE = "quarantine"


class SessionProblem(Exception):
    """A session directory cannot be used safely; the message says what and what to do."""


def ensure_root(sessions_root: Path) -> None:
    """Create the sessions directory 0700, or tighten it (other users must not list companies)."""
    sessions_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(sessions_root.stat().st_mode)
    if mode != 0o700:
        os.chmod(sessions_root, 0o700)
        log.warning("fixed session file permissions", change=f"{sessions_root}: {mode:04o} -> 0700")


def fix_permissions(directory: Path) -> list[str]:
    """Make one session directory 0700 and its files 0600; return what was fixed.

    Entries owned by another user are not ours to change, and a symlink could point anywhere:
    both raise SessionProblem, and that company (only that one) does not start.
    """
    fixed: list[str] = []
    uid = os.getuid()
    if not directory.exists():
        return fixed
    for path in [directory, *sorted(directory.rglob("*"))]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            raise SessionProblem(f"{path} is a symbolic link; a session may not contain links. Remove it.")
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            continue
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
        have = stat.S_IMODE(st.st_mode)
        if uid != 0 and st.st_uid != uid:
            raise SessionProblem(
                f"{path} belongs to uid {st.st_uid}, not to the daemon's uid {uid}; "
                "fix its owner (chown -R) so the daemon can keep it private"
            )
        if have != want:
            os.chmod(path, want, follow_symlinks=False)
            fixed.append(f"{path}: {have:04o} -> {want:04o}")
    for line in fixed:
        log.warning("fixed session file permissions", change=line)
    return fixed


def lock_session(directory: Path) -> int | None:
    """Take the session's exclusive lock (`whatsappd.lock`, created 0600 if missing) and return its
    fd, to hold for as long as the session is in use; None when another process holds it.

    The worker holds it for its whole life; `whatsappd import-baileys` holds it while it puts a
    converted store in place. Closing the fd (or dying) releases it.
    """
    try:
        return pidlock.acquire(directory / LOCK_FILE)
    except pidlock.Held:
        return None


def stamp(directory: Path) -> tuple[int, int, int]:
    """What changes when a session's files do: the directory's and the store's mtimes and size."""
    def one(path: Path) -> tuple[int, int]:
        try:
            st = path.stat()
        except OSError:
            return (0, 0)
        return (st.st_mtime_ns, st.st_size)

    d = one(directory)
    store = one(directory / NEONIZE_STORE)
    sim = one(directory / SIMULATOR_FILE)
    return (d[0], store[0] ^ sim[0], store[1] + sim[1])


def has_session(directory: Path) -> bool:
    """True if the directory holds paired credentials (simulator or neonize). Never raises."""
    return session_state(directory) is SessionState.PAIRED


@dataclass(frozen=True)
class Discovered:
    company: str
    engine: str


def discover(sessions_root: Path) -> list[Discovered]:
    """Companies that have a paired session on disk (session-{id} with valid ids only)."""
    found: list[Discovered] = []
    if not sessions_root.is_dir():
        return found
    for child in sorted(sessions_root.iterdir()):
        if not child.name.startswith("session-") or child.is_symlink() or not child.is_dir():
            continue
        try:
            company = check_company_id(child.name.removeprefix("session-"))
        except InvalidCompanyId:
            continue
        if session_state(child) is not SessionState.NONE:
            found.append(Discovered(company, engine_of(child)))
    return found


def wipe(sessions_root: Path, company: str) -> bool:
    """Remove every file of a company's session (store, WAL, SHM, lock). True if anything was there."""
    directory = session_dir(sessions_root, company)
    if not directory.exists():
        return False
    if directory.is_symlink():
        directory.unlink()
        return True
    shutil.rmtree(directory)
    return True


def quarantine(sessions_root: Path, company: str) -> Path | None:
    """Move an unusable session aside to sessions/quarantine/ (0700), timestamped; return where."""
    directory = session_dir(sessions_root, company)
    if not directory.exists():
        return None
    target_root = sessions_root / QUARANTINE
    target_root.mkdir(mode=0o700, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = target_root / f"{directory.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = target_root / f"{directory.name}-{stamp}-{n}"
    directory.rename(target)
    return target

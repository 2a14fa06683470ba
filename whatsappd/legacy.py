"""Finding and removing the old CRM's session directories (Chrome profiles and Baileys sessions).

The old CRM kept `sessions/session-{company_id}/` holding either a Chrome user-data dir
(whatsapp-web.js) or a Baileys multi-file auth state (`creds.json`). whatsappd keeps its own
sessions under the very same names, so telling them apart is the whole job of this module, and
every doubt resolves to "leave it alone": a directory that shows any sign of being whatsappd's is
never a candidate, a symlink is never followed, and each directory is classified again right
before it is deleted.

Intended output of `whatsappd clean-sessions` (written by the CLI on top of this API)::

    $ whatsappd clean-sessions --dry-run
    would remove /var/lib/whatsappd/sessions/session-acme (browser profile, 212.4 MiB)
    would remove /var/lib/whatsappd/sessions/session-42 (Baileys session, 8.1 KiB)
    skipped /var/lib/whatsappd/sessions/session-7: it has both legacy files (creds.json) and whatsappd
        files (whatsappd.lock); it is treated as whatsappd's and left alone
    2 legacy sessions, 212.5 MiB in all; dry run, nothing removed

    $ whatsappd clean-sessions
    removed /var/lib/whatsappd/sessions/session-acme (browser profile, 212.4 MiB)
    failed /var/lib/whatsappd/sessions/session-42: [Errno 13] Permission denied: 'creds.json'
    removed 1 of 2 legacy sessions, 212.4 MiB freed

which is, roughly::

    scan = scan_legacy(root)
    for s in scan.found: print(f"would remove {s.path} ({s.describe()})")
    for k in scan.skipped: print(f"skipped {k.path}: {k.reason}")
    for r in remove_legacy(scan.found, root): ...  # Removed or Failed, never raises
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from whatsappd.ids import InvalidCompanyId, check_company_id

__all__ = [
    "Failed",
    "LegacyError",
    "LegacyKind",
    "LegacySession",
    "Removed",
    "Scan",
    "SessionsRootMissing",
    "Skipped",
    "find_legacy",
    "format_size",
    "remove_legacy",
    "scan_legacy",
]

LegacyKind = Literal["browser", "baileys"]

_SESSION_PREFIX = "session-"

# Chrome user-data-dir markers; any one is enough (a crashed Chrome may leave only some).
_BROWSER_DIRS = frozenset({"Crashpad", "Default"})
_BROWSER_FILES = frozenset({"DevToolsActivePort"})
_BAILEYS_FILES = frozenset({"creds.json"})

# whatsappd's own files. Any of these makes a directory whatsappd's, whatever else it holds.
_WHATSAPPD_FILES = frozenset({"whatsappd.lock", "simulator.json"})
# The neonize store is SQLite: NAME.db plus its -wal/-shm/-journal companions.
_SQLITE_SUFFIXES = (".db", ".db-wal", ".db-shm", ".db-journal")
# ...but Chrome keeps SQLite files at the top of its user-data dir too; without this list every
# real browser profile would look like a mixed directory and never be cleaned. A file Chrome
# adds in a later version only makes a profile look mixed: skipped and reported, never wrong.
_CHROME_ROOT_DBS = frozenset({"first_party_sets.db", "heavy_ad_intervention_opt_out.db"})


class LegacyError(Exception):
    """The legacy sessions could not be scanned at all (the message says why and what to do)."""


class SessionsRootMissing(LegacyError, FileNotFoundError):
    """The directory to scan does not exist or is not a directory."""


@dataclass(frozen=True)
class LegacySession:
    """One legacy session directory, found directly under the scanned root."""

    path: Path
    kind: LegacyKind
    size_bytes: int  # apparent size of the regular files in it, symlinks not followed
    company_id: str | None  # from "session-{id}" when that id is valid, else None

    def describe(self) -> str:
        """E.g. "browser profile, 1.4 MiB" — for one line of CLI output."""
        what = "browser profile" if self.kind == "browser" else "Baileys session"
        return f"{what}, {format_size(self.size_bytes)}"


@dataclass(frozen=True)
class Skipped:
    """A child of the root that looked like a session but is left alone, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Scan:
    found: tuple[LegacySession, ...]
    skipped: tuple[Skipped, ...]

    @property
    def total_bytes(self) -> int:
        return sum(s.size_bytes for s in self.found)


@dataclass(frozen=True)
class Removed:
    session: LegacySession


@dataclass(frozen=True)
class Failed:
    session: LegacySession
    reason: str


def scan_legacy(root: Path) -> Scan:
    """Classify the immediate children of root (sorted by name); nothing is changed.

    Found: directories with legacy markers and no whatsappd file. Skipped (with a reason):
    symlinks, directories with both kinds of files, directories that cannot be read.
    Not reported at all: whatsappd's own sessions, unrelated directories, plain files.
    """
    root = _check_root(root)
    found: list[LegacySession] = []
    skipped: list[Skipped] = []
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        path = root / entry.name
        if entry.is_symlink():
            # Whatever it points to lies outside our control; deleting through it could reach
            # anywhere, deleting the link itself could break someone's deliberate setup.
            skipped.append(Skipped(path, "it is a symbolic link; links are never followed or removed"))
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        try:
            kind, legacy_names, ours = _classify(path)
        except OSError as exc:
            skipped.append(Skipped(path, f"it cannot be read ({exc.strerror or exc})"))
            continue
        if kind is None:
            continue
        if ours:
            skipped.append(
                Skipped(
                    path,
                    f"it has both legacy files ({', '.join(legacy_names)}) and whatsappd files "
                    f"({', '.join(ours)}); it is treated as whatsappd's and left alone",
                )
            )
            continue
        found.append(LegacySession(path, kind, _tree_size(path), _company_id(entry.name)))
    return Scan(tuple(found), tuple(skipped))


def find_legacy(root: Path) -> list[LegacySession]:
    """The legacy sessions directly under root; scan_legacy() also says what was skipped."""
    return list(scan_legacy(root).found)


def remove_legacy(sessions: Iterable[LegacySession], root: Path) -> list[Removed | Failed]:
    """Delete each session directory; one result per session, in order. Never raises per entry.

    Each one is checked again right before deletion — still a real directory directly under
    root, still the same kind of legacy session, still without whatsappd files — because time
    passes between the scan (often a --dry-run shown to a person) and this call.
    """
    root = _check_root(root)
    results: list[Removed | Failed] = []
    for session in sessions:
        problem = _recheck(session, root)
        if problem is not None:
            results.append(Failed(session, problem))
            continue
        try:
            # On Linux rmtree uses the fd-based walk (rmtree.avoids_symlink_attacks): it never
            # follows a symlink inside the tree and refuses a top directory swapped for a link
            # after our check, so the remaining race cannot reach outside the directory.
            shutil.rmtree(session.path)
        except OSError as exc:
            results.append(Failed(session, str(exc)))
        else:
            results.append(Removed(session))
    return results


def format_size(n: int) -> str:
    """Human size in binary units: "512 B", "1.4 MiB", "3.0 GiB"."""
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {n}")
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        # Round first, so 1048575 bytes reads "1.0 MiB" rather than "1024.0 KiB".
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def _check_root(root: Path) -> Path:
    # Resolve once: a root that is itself a symlink (sessions on another disk) is legitimate;
    # from here on every comparison uses the real path.
    try:
        resolved = root.resolve(strict=True)
    except FileNotFoundError:
        raise SessionsRootMissing(
            f"the sessions directory {root} does not exist: pass the directory that holds the "
            "old session-<id> folders with --path DIR"
        ) from None
    if not resolved.is_dir():
        raise SessionsRootMissing(
            f"{root} is not a directory: pass the directory that holds the old session-<id> "
            "folders with --path DIR"
        )
    return resolved


def _classify(path: Path) -> tuple[LegacyKind | None, list[str], list[str]]:
    """(legacy kind or None, legacy marker names, whatsappd file names) of one directory.

    Markers are looked at with lstat only: a symlink named "Default" is no Chrome profile.
    """
    browser: list[str] = []
    baileys: list[str] = []
    ours: list[str] = []
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if _is_whatsappd_name(name):
                ours.append(name)
            elif name in _BROWSER_DIRS and entry.is_dir(follow_symlinks=False):
                browser.append(name + "/")
            elif name in _BROWSER_FILES and entry.is_file(follow_symlinks=False):
                browser.append(name)
            elif name in _BAILEYS_FILES and entry.is_file(follow_symlinks=False):
                baileys.append(name)
    ours.sort()
    # A Chrome profile outranks creds.json: the browser kind is the bigger one to explain.
    if browser:
        return "browser", sorted(browser + baileys), ours
    if baileys:
        return "baileys", baileys, ours
    return None, [], ours


def _is_whatsappd_name(name: str) -> bool:
    if name in _WHATSAPPD_FILES:
        return True
    for suffix in _SQLITE_SUFFIXES:
        if name.endswith(suffix):
            return name[: len(name) - len(suffix)] + ".db" not in _CHROME_ROOT_DBS
    return False


def _recheck(session: LegacySession, root: Path) -> str | None:
    """Why session must not be deleted now, or None when it still may be."""
    path = session.path
    # scan_legacy builds every path on the resolved root, so an exact comparison is enough, and
    # anything else was not produced by a scan of this root.
    if path.parent != root or path.name in ("", ".", ".."):
        return f"it is not directly inside {root}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "it no longer exists"
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        return "it has become a symbolic link since the scan; links are never followed or removed"
    if not stat.S_ISDIR(st.st_mode):
        return "it is no longer a directory"
    try:
        kind, _, ours = _classify(path)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if ours:
        return f"whatsappd files appeared in it since the scan ({', '.join(ours)}); it was left alone"
    if kind != session.kind:
        return "it is no longer the same kind of legacy session as when scanned; scan again"
    return None


def _tree_size(path: Path) -> int:
    total = 0
    # followlinks=False keeps the walk inside the directory; errors only make the size a lower
    # bound, which is fine for a number shown to a person.
    for dirpath, _dirnames, filenames in os.walk(path, followlinks=False):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _company_id(name: str) -> str | None:
    if not name.startswith(_SESSION_PREFIX):
        return None
    try:
        return check_company_id(name[len(_SESSION_PREFIX) :])
    except InvalidCompanyId:
        return None

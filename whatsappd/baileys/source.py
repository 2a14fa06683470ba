"""Reading a Baileys `useMultiFileAuthState` folder without ever changing it.

The folder is read once into memory (a `Snapshot`: every file's bytes, size, mtime and sha256);
everything after works on that copy. Nothing here opens a file for writing, renames or deletes.
`Snapshot.changes()` reads the folder again at the end of an import: any file added, removed or
changed in between means Baileys (or someone) was still at work, and the import is abandoned.

File names are Baileys': `creds.json` and `{type}-{id}.json`, where `/` in the id was written
`__` and `:` was written `-`.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from whatsappd.baileys.report import Refused
from whatsappd.errors import ErrorCode

__all__ = ["KINDS", "MAX_FILE_BYTES", "SourceFile", "Snapshot", "as_bytes", "as_int", "read_snapshot", "sized"]

# Baileys' key types, longest prefix first ("sender-key-memory-" before "sender-key-").
KINDS = (
    "sender-key-memory",
    "sender-key",
    "app-state-sync-version",
    "app-state-sync-key",
    "pre-key",
    "session",
    "lid-mapping",
    "device-list",
    "tctoken",
    "identity-key",
)
MAX_FILE_BYTES = 16 * 1024 * 1024  # Baileys' files are a few KiB; anything this big is not one


@dataclass(frozen=True)
class SourceFile:
    name: str
    kind: str | None  # "creds", one of KINDS, or None for a file Baileys does not write
    key: str  # the id part of `{kind}-{key}.json`; "" for creds.json
    data: bytes
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class Snapshot:
    """What the folder held when it was read."""

    directory: Path
    files: dict[str, SourceFile] = field(default_factory=dict)
    others: list[tuple[str, str]] = field(default_factory=list)  # (name, why it is not read)

    def of_kind(self, kind: str) -> list[SourceFile]:
        return sorted((f for f in self.files.values() if f.kind == kind), key=lambda f: f.name)

    def changes(self) -> str | None:
        """Read the folder again: None if it is exactly as snapshotted, else what changed."""
        try:
            now = _scan(self.directory)
        except Refused as exc:
            return exc.message
        names = set(self.files)
        fresh = set(now.files)
        if fresh - names:
            return f"{sorted(fresh - names)[0]} appeared"
        if names - fresh:
            return f"{sorted(names - fresh)[0]} disappeared"
        for name, old in sorted(self.files.items()):
            new = now.files[name]
            if (new.size, new.mtime_ns, new.sha256) != (old.size, old.mtime_ns, old.sha256):
                return f"{name} changed"
        return None


def read_snapshot(directory: Path, min_idle: float) -> Snapshot:
    """Read every file of a Baileys folder; refuse a folder that is not one or that is in use.

    Refused (nothing read further) when: the path is a symbolic link or not a directory; it
    holds a symbolic link; it has no creds.json; a file changed less than min_idle seconds ago
    (Baileys may still run); a file changed while it was being read.
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        raise Refused(ErrorCode.SOURCE_NOT_FOUND, f"{directory} does not exist") from None
    except OSError as exc:
        raise Refused(ErrorCode.UNREADABLE_SOURCE, f"{directory} cannot be read ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise _linked(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise Refused(ErrorCode.NOT_BAILEYS, f"{directory} is not a directory")
    snapshot = _scan(directory)
    if "creds.json" not in snapshot.files:
        raise Refused(ErrorCode.NOT_BAILEYS, f"{directory} has no creds.json, so it is not a Baileys session folder")
    # the directory's own mtime moves when Baileys deletes a file (a used pre-key, a reset session)
    changes = [(f.mtime_ns, f.name) for f in snapshot.files.values()] + [(st.st_mtime_ns, "")]
    newest_ns, newest = max(changes)
    age = time.time() - newest_ns / 1e9
    if age < min_idle:
        what = f"{directory}/{newest}" if newest else f"the list of files in {directory}"
        raise Refused(
            ErrorCode.SOURCE_BUSY,
            f"{what} changed {max(age, 0):.0f} s ago, so Baileys may still be running: "
            f"stop the CRM's WhatsApp module and try again once nothing changed for {min_idle:g} s (--min-idle)",
        )
    return snapshot


def _linked(path: Path) -> Refused:
    return Refused(ErrorCode.NOT_BAILEYS, f"{path} is a symbolic link; a Baileys folder is a plain directory of "
                   "plain files, and links are never followed")


def _scan(directory: Path) -> Snapshot:
    """Every file, read through one descriptor of the directory opened without following a link,
    so the folder read is the folder named (a link swapped in meanwhile is refused, not followed)."""
    snapshot = Snapshot(directory)
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _linked(directory) from None
        if exc.errno == errno.ENOENT:
            raise Refused(ErrorCode.SOURCE_CHANGED, f"{directory} disappeared while it was read; Baileys (or "
                          "someone) may still be at work") from None
        raise Refused(ErrorCode.UNREADABLE_SOURCE, f"{directory} cannot be listed ({exc.strerror})") from None
    try:
        _scan_fd(dir_fd, snapshot)
    finally:
        os.close(dir_fd)
    return snapshot


def _scan_fd(dir_fd: int, snapshot: Snapshot) -> None:
    directory = snapshot.directory
    try:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise Refused(ErrorCode.UNREADABLE_SOURCE, f"{directory} cannot be listed ({exc.strerror})") from None
    for entry in entries:
        path = directory / entry.name
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            raise Refused(ErrorCode.SOURCE_CHANGED, f"{path} disappeared while the folder was read; "
                          "Baileys may still be running") from None
        if stat.S_ISLNK(st.st_mode):
            raise _linked(path)
        if not stat.S_ISREG(st.st_mode):
            snapshot.others.append((entry.name, "not a plain file; Baileys writes none"))
            continue
        if not entry.name.endswith(".json"):
            snapshot.others.append((entry.name, "not a .json file; Baileys writes none"))
            continue
        if st.st_size > MAX_FILE_BYTES:
            raise Refused(ErrorCode.MALFORMED_SOURCE, f"{path} is {st.st_size} bytes, far too big for a Baileys key file")
        data = _read(dir_fd, entry.name, path)
        kind, key = _classify(entry.name)
        snapshot.files[entry.name] = SourceFile(
            entry.name, kind, key, data, len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())


def _read(dir_fd: int, name: str, path: Path) -> bytes:
    """The file's bytes, read through a read-only descriptor; refused if it changes meanwhile."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _linked(path) from None
        raise Refused(ErrorCode.UNREADABLE_SOURCE, f"{path} cannot be read ({exc.strerror})") from None
    try:
        before = os.fstat(fd)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if (before.st_mtime_ns, before.st_size) != (after.st_mtime_ns, after.st_size) or len(data) != after.st_size:
        raise Refused(ErrorCode.SOURCE_CHANGED, f"{path} changed while it was being read; Baileys may still be running")
    return data


def _classify(name: str) -> tuple[str | None, str]:
    if name == "creds.json":
        return "creds", ""
    stem = name.removesuffix(".json")
    for kind in KINDS:
        if stem.startswith(kind + "-") and len(stem) > len(kind) + 1:
            return kind, stem[len(kind) + 1:]
    return None, stem


def as_bytes(value: Any, what: str) -> bytes:
    """Bytes from any of the shapes Baileys writes: a `{"type": "Buffer", "data": ...}` object
    (base64 or a list of byte values), a base64 string, or a list of byte values."""
    if isinstance(value, Mapping) and value.get("type") == "Buffer" and "data" in value:
        value = value["data"]
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{what} is not valid base64") from None
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and k.isdigit() for k in value):
        # a Uint8Array that went through plain JSON.stringify: {"0": 12, "1": 34, ...}
        value = [value[k] for k in sorted(value, key=int)]
    if isinstance(value, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in value):
        return bytes(value)
    raise ValueError(f"{what} is missing or is not a byte string")


def sized(value: Any, what: str, size: int) -> bytes:
    """as_bytes, and exactly size bytes long."""
    data = as_bytes(value, what)
    if len(data) != size:
        raise ValueError(f"{what} is {len(data)} bytes, not {size}")
    return data


def as_int(value: Any, what: str, low: int = 0, high: int = 2**32 - 1) -> int:
    """An integer in [low, high]; protobufjs Longs arrive as decimal strings."""
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{what} is {value!r}, not an integer from {low} to {high}")
    return value

"""The backup archive: a gzip'ed tar holding a manifest and the snapshot files it lists.

Layout (member names are relative, regular files only, written 0600):

    manifest.json            format, versions, per-file sha256 and size, companies, journal head,
                             store (which backend holds the journal; PostgreSQL's is not archived)
    manifest.sha256          the sha256 of manifest.json (a manifest edited by hand is refused)
    whatsappd.sqlite         the journal/outbox database (full backups of the SQLite store only)
    companies.json           the companies added at runtime (when there are any)
    config.toml              the effective configuration, for reference (restore never writes it)
    sessions/session-ID/...  each company's session files (SQLite stores as consistent snapshots)

Reading an archive (`verify`) checks everything before anyone writes anything: the manifest's
own checksum, its format, that the members are exactly the files it lists, and every file's
size and sha256. `extract` then writes the members under a directory, hashing them again as
they are written, so what lands on disk is what was verified.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from whatsappd.fsutil import fsync_dir
from whatsappd.ids import InvalidCompanyId, check_company_id

__all__ = [
    "FORMAT", "FORMAT_VERSION", "JOURNAL", "MANIFEST", "ArchiveRefused", "Manifest", "extract", "fsync_dir",
    "verify", "write_archive",
]


FORMAT = "whatsappd-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
JOURNAL = "whatsappd.sqlite"
COMPANIES = "companies.json"
CONFIG = "config.toml"
_CHUNK = 1024 * 1024
#: Member names a manifest may list: the fixed files, and files (or one directory level) of a session.
_NAME = re.compile(r"(whatsappd\.sqlite|companies\.json|config\.toml|"
                   r"sessions/session-[a-z0-9][a-z0-9_-]{0,63}/[A-Za-z0-9._-]{1,128}(/[A-Za-z0-9._-]{1,128})?)")


class ArchiveRefused(Exception):
    """The archive cannot be used; the message is one sentence saying why (nothing was changed)."""


@dataclass
class Manifest:
    """What manifest.json says (`data` is the whole document, as written)."""

    data: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def companies(self) -> dict[str, dict[str, Any]]:
        return {c["id"]: c for c in self.data.get("companies", [])}

    @property
    def external_journal(self) -> str | None:
        """The database holding the journal and outbox when they are not in the archive
        (PostgreSQL, password hidden); None: they are in it (or it is a company backup)."""
        store = self.data.get("store")
        if isinstance(store, dict) and store.get("backend") == "postgresql":
            return str(store.get("database"))
        return None

    @property
    def journal_last_seq(self) -> int | None:
        journal = self.data.get("journal")
        return int(journal["last_seq"]) if isinstance(journal, dict) else None


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_archive(out: IO[bytes], staging: Path, manifest: dict[str, Any]) -> None:
    """Write the archive to out: the manifest (with every file's sha256 and size filled in from
    staging, which holds the files under their member names), its checksum, then the files."""
    names = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    files: dict[str, dict[str, Any]] = {}
    for name in names:
        digest, size = sha256_file(staging / name)
        files[name] = {"sha256": digest, "size": size}
    manifest = {**manifest, "files": files}
    body = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
    mtime = int(manifest.get("created_unix", 0))
    # Level 3: SQLite pages compress well already; the higher levels cost much more CPU.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=3, mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, MANIFEST, body, mtime)
        _add_bytes(tar, MANIFEST_SUM, hashlib.sha256(body).hexdigest().encode() + b"\n", mtime)
        for name in names:
            info = _info(name, files[name]["size"], mtime)
            with open(staging / name, "rb") as f:
                tar.addfile(info, f)


def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mtime: int) -> None:
    tar.addfile(_info(name, len(data), mtime), io.BytesIO(data))


# ------------------------------------------------------------------------------------ reading


def _members(path: Path) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """Each member with a reader of its content, in archive order; ArchiveRefused if unreadable."""
    try:
        with tarfile.open(path, mode="r|gz") as tar:
            for info in tar:
                yield info, tar.extractfile(info) if info.isfile() else None
    except FileNotFoundError:
        raise ArchiveRefused(f"{path} does not exist") from None
    except IsADirectoryError:
        raise ArchiveRefused(f"{path} is a directory, not a backup archive") from None
    except PermissionError:
        raise ArchiveRefused(f"{path} cannot be read by uid {os.getuid()}: check its owner and mode") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveRefused(f"{path} is damaged or not a whatsappd backup archive ({exc}); "
                             "nothing was changed") from None


def _parse_manifest(path: Path, body: bytes, recorded: bytes | None) -> Manifest:
    if recorded is None or recorded.strip().decode(errors="replace") != hashlib.sha256(body).hexdigest():
        raise ArchiveRefused(f"{path}: the manifest does not match its checksum (it was edited or damaged); "
                             "nothing was changed")
    try:
        data = json.loads(body)
    except ValueError:
        raise ArchiveRefused(f"{path}: the manifest is not JSON; nothing was changed") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArchiveRefused(f"{path} is not a whatsappd backup archive; nothing was changed")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArchiveRefused(f"{path} is a backup of format version {data.get('format_version')!r}; this "
                             f"whatsappd reads version {FORMAT_VERSION}: restore it with a matching whatsappd")
    files = data.get("files")
    companies = data.get("companies")
    if not isinstance(files, dict) or not isinstance(companies, list):
        raise ArchiveRefused(f"{path}: the manifest lacks its file or company list; nothing was changed")
    for name, entry in files.items():
        if (not isinstance(name, str) or _NAME.fullmatch(name) is None or not isinstance(entry, dict)
                or any(part in (".", "..") for part in name.split("/"))
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int)):
            raise ArchiveRefused(f"{path}: the manifest lists a file it may not ({name!r}); nothing was changed")
    for company in companies:
        try:
            check_company_id(company.get("id") if isinstance(company, dict) else None)
        except InvalidCompanyId:
            raise ArchiveRefused(f"{path}: the manifest lists an invalid company; nothing was changed") from None
    return Manifest(data, files)


def _read_all(reader: IO[bytes] | None, limit: int) -> bytes:
    data = reader.read(limit + 1) if reader is not None else b""
    return data[:limit + 1]


def _check_member(path: Path, info: tarfile.TarInfo, manifest: Manifest, seen: set[str]) -> dict[str, Any]:
    entry = manifest.files.get(info.name)
    if not info.isfile() or entry is None:
        raise ArchiveRefused(f"{path} holds {info.name!r}, which its manifest does not list; nothing was changed")
    if info.name in seen:
        raise ArchiveRefused(f"{path} holds {info.name!r} twice; nothing was changed")
    seen.add(info.name)
    return entry


def _walk(path: Path, sink: Path | None) -> Manifest:
    """Read the whole archive, checking every member against the manifest; with sink, also write
    each member under it (0600 files, 0700 directories). ArchiveRefused at the first mismatch."""
    members = _members(path)
    # A stream: each member is read before the next is asked for.
    first = next(members, None)
    if first is None or first[0].name != MANIFEST or not first[0].isfile():
        raise ArchiveRefused(f"{path} does not begin with a whatsappd backup manifest; nothing was changed")
    body = _read_all(first[1], 16 * 1024 * 1024)
    second = next(members, None)
    if second is None or second[0].name != MANIFEST_SUM or not second[0].isfile():
        raise ArchiveRefused(f"{path} does not begin with a whatsappd backup manifest; nothing was changed")
    manifest = _parse_manifest(path, body, _read_all(second[1], 1024))
    seen: set[str] = set()
    for info, reader in members:
        entry = _check_member(path, info, manifest, seen)
        assert reader is not None
        digest = hashlib.sha256()
        size = 0
        with contextlib.ExitStack() as stack:
            out = None
            if sink is not None:
                target = sink / info.name
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                out = stack.enter_context(open(fd, "wb"))
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
            if out is not None:
                out.flush()
                os.fsync(out.fileno())
        if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
            raise ArchiveRefused(f"{path}: {info.name} does not match its checksum in the manifest (the archive "
                                 "was altered or damaged); nothing was changed")
    missing = sorted(set(manifest.files) - seen)
    if missing:
        raise ArchiveRefused(f"{path} lacks {missing[0]}, which its manifest lists; nothing was changed")
    return manifest


def verify(path: Path) -> Manifest:
    """Check the archive whole without writing anything: its manifest, or ArchiveRefused."""
    return _walk(path, None)


def extract(path: Path, directory: Path) -> Manifest:
    """Write the archive's files under directory (which must be empty), checking them again."""
    return _walk(path, directory)

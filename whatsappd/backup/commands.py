"""The bodies of `whatsappd backup`, `whatsappd restore` and `whatsappctl backup`.

`whatsappd backup` asks the running daemon (POST /v1/backup on its control socket), which
knows which stores are live and each company's state; when nothing answers there and no daemon
holds the state directory's lock, it takes the backup from the stopped state directory itself,
holding that lock so that no daemon starts meanwhile. Either way the archive is verified before
it is renamed into place, so a file at the target is always a whole, readable backup.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, BinaryIO

from whatsappd import pidlock
from whatsappd.backup.archive import ArchiveRefused, Manifest, verify
from whatsappd.backup.restore import DEFAULT_SEQ_GAP, RestoreRefused, restore
from whatsappd.backup.snapshot import (
    build_archive,
    disk_companies,
    registry_bytes,
    save_atomically,
    staging_dir,
    store_record,
)
from whatsappd.client import Client, DaemonUnavailable
from whatsappd.config import Config, render_config

__all__ = ["STDOUT", "STDOUT_IS_TERMINAL", "BackupFailed", "backup_offline", "fetch_backup", "stdout_target", "summary",
           "target_path", "to_file", "to_stdout"]

#: --to's value that writes the archive to stdout (for a pipe into age or gpg).
STDOUT = "-"

#: Writes an archive: called with the function that produces it, answers its verified manifest.
Save = Callable[[Callable[[IO[bytes]], None]], Manifest]


class BackupFailed(Exception):
    """The backup was not written; one sentence saying why (and the daemon's answer, if any)."""

    def __init__(self, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.body = body


def target_path(to: Path | None) -> Path:
    """--to: a file, a directory to put the archive in, or (absent) the current directory."""
    name = f"whatsappd-backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar.gz"
    if to is None:
        return Path.cwd() / name
    return to / name if to.is_dir() else to


def to_file(target: Path) -> Save:
    """Save the archive atomically at target (0600), verified before it is renamed into place."""

    def save(produce: Callable[[IO[bytes]], None]) -> Manifest:
        manifest: list[Manifest] = []

        def write(f: IO[bytes], tmp: Path) -> None:
            produce(f)
            f.flush()
            manifest.append(verify(tmp))

        save_atomically(target, write)
        return manifest[0]

    return save


class _Tee:
    """Writes to out and to a pipe the verifier reads; counts the bytes."""

    def __init__(self, out: BinaryIO, pipe: int) -> None:
        self.out, self.pipe, self.size = out, pipe, 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.pipe, view):]
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def to_stdout(out: BinaryIO) -> tuple[Save, Callable[[], int]]:
    """Write the archive to out (stdout: a pipe into age or gpg, so it never lies on disk unencrypted),
    verified as it streams by (BackupFailed if it came out damaged or short); and its size so far."""
    sizes: list[int] = [0]

    def save(produce: Callable[[IO[bytes]], None]) -> Manifest:
        read_end, write_end = os.pipe()
        outcome: list[Manifest | ArchiveRefused] = []

        def check() -> None:
            try:
                outcome.append(verify(Path(f"/dev/fd/{read_end}")))
            except ArchiveRefused as exc:
                outcome.append(exc)
            except Exception as exc:  # a bug in the check must not pass the archive as sound
                outcome.append(ArchiveRefused(f"it could not be checked: {exc}"))
            finally:
                while os.read(read_end, 1 << 16):  # the rest (a refusal stops reading): never block the writer
                    pass
                os.close(read_end)

        checker = threading.Thread(target=check, name="backup-verify", daemon=True)
        checker.start()
        tee = _Tee(out, write_end)
        try:
            produce(tee)  # type: ignore[arg-type]  # write and flush are all a producer uses
            out.flush()
        finally:
            os.close(write_end)
            checker.join()
            sizes[0] = tee.size
        result = outcome[0]
        if isinstance(result, ArchiveRefused):
            raise BackupFailed(f"the archive written to stdout is damaged or incomplete ({result}); discard it")
        return result

    return save, lambda: sizes[0]


def fetch_backup(client: Client, companies: list[str], target: Path | Save) -> Manifest:
    """POST /v1/backup (?company=...) and save the archive (a Path: atomically there), verified."""
    query = urllib.parse.urlencode([("company", c) for c in companies])

    def produce(f: IO[bytes]) -> None:
        resp = client.download("POST", "/v1/backup" + (f"?{query}" if query else ""), f)
        if not resp.ok:
            try:
                body = resp.json()
                message = f"{body['error']['message']} [{body['error']['code']}]"
            except (ValueError, KeyError, TypeError):
                body, message = None, f"HTTP {resp.status}"
            raise BackupFailed(message, body)

    return (to_file(target) if isinstance(target, Path) else target)(produce)


def _configured(config: Config) -> list[tuple[str, str, str]]:
    out = [(c.id, c.engine, "config") for c in config.companies]
    known = {c[0] for c in out}
    raw = registry_bytes(config.daemon_state_dir / "companies.json", None)
    if raw is not None:
        for company in json.loads(raw).get("companies", []):
            if company.get("id") not in known:
                out.append((company["id"], company.get("engine", "neonize"), "runtime"))
    return out


def backup_offline(config: Config, companies: list[str], target: Path | Save) -> Manifest:
    """Back up a stopped state directory, holding its lock so that no daemon starts meanwhile."""
    state_dir = config.daemon_state_dir
    if not state_dir.is_dir():
        raise BackupFailed(f"{state_dir} does not exist: there is nothing to back up")
    try:
        lock = pidlock.acquire(state_dir / "whatsappd.lock")
    except pidlock.Held as held:
        raise BackupFailed(f"whatsappd (pid {held.pid or '?'}) holds {state_dir} but nothing answers on "
                           f"{config.control_socket_path}: pass --socket with its socket, or wait until it "
                           "is up") from None
    try:
        found = disk_companies(config.sessions_dir, _configured(config))
        if companies:
            unknown = sorted(set(companies) - {c.id for c in found})
            if unknown:
                raise BackupFailed(f"no company {unknown[0]!r} in {state_dir} (neither configured nor on disk)")
            found = [c for c in found if c.id in companies]
        staging = staging_dir(state_dir / "tmp")
        try:

            def produce(f: IO[bytes]) -> None:
                registry = registry_bytes(state_dir / "companies.json", companies or None)
                build_archive(f, state_dir=state_dir, staging=staging, companies=found,
                              config_text=render_config(config), full=not companies, registry=registry,
                              store=store_record(config.store_backend, config.store_dsn))

            return (to_file(target) if isinstance(target, Path) else target)(produce)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)


def summary(manifest: Manifest, target: Path | None, size: int | None = None) -> str:
    """One line on what was written; target None: to stdout (size given)."""
    journal = manifest.journal_last_seq
    where = f"{target} ({target.stat().st_size} bytes, mode 0600)" if target is not None else f"stdout ({size} bytes)"
    if (database := manifest.external_journal) is not None:
        what = (f", sessions, companies and config only: the journal and outbox live in PostgreSQL ({database}) "
                "and are NOT in this archive; back them up with pg_dump (README: Backups)")
    elif journal is not None:
        what = f", journal up to seq {journal}"
    else:
        what = ", no journal (company backup)"
    return (f"backup written to {where}: {len(manifest.companies)} companies{what}"
            "; keep it encrypted and off public places (README: Backups)")


#: What --to - says when stdout is a terminal (an archive is binary, and holds credentials).
STDOUT_IS_TERMINAL = ("refusing to write the backup archive to a terminal: pipe it into an encryption tool "
                      "(--to - | age -r KEY -o backup.tar.gz.age) or give --to FILE")


def stdout_target() -> tuple[Save, Callable[[], int]] | None:
    """--to -: the stdout writer; None (say STDOUT_IS_TERMINAL) when stdout is a terminal."""
    if sys.stdout.isatty():
        return None
    return to_stdout(sys.stdout.buffer)


def run_backup(config: Config, socket_path: str | None, to: Path | None, companies: list[str]) -> int:
    """`whatsappd backup`: through the daemon if it answers, else from the stopped state directory.
    --to -: the archive to stdout, and every word to stderr."""
    piped = stdout_target() if to == Path(STDOUT) else None
    if to == Path(STDOUT) and piped is None:
        print(f"whatsappd: {STDOUT_IS_TERMINAL}", file=sys.stderr)
        return 1
    target: Path | Save = piped[0] if piped is not None else target_path(to)
    where = "stdout" if piped is not None else str(target)
    client = Client(socket_path or str(config.control_socket_path), timeout=None)
    try:
        try:
            manifest = fetch_backup(client, companies, target)
        except DaemonUnavailable:
            manifest = backup_offline(config, companies, target)
            print("whatsappd: the daemon is not running; backed up the stopped state directory", file=sys.stderr)
    except BackupFailed as exc:
        print(f"whatsappd: backup failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"whatsappd: backup failed: cannot write {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if piped is not None:
        print(summary(manifest, None, piped[1]()), file=sys.stderr)
    else:
        assert isinstance(target, Path)
        print(summary(manifest, target))
    return 0


def run_restore(config: Config, archive: Path, companies: list[str] | None, overwrite: bool,
                seq_gap: int = DEFAULT_SEQ_GAP) -> int:
    """`whatsappd restore`: one sentence and exit 1 on a refusal (nothing changed)."""
    from whatsappd.backup.archive import ArchiveRefused

    try:
        result = restore(archive, config.daemon_state_dir, companies, overwrite=overwrite, seq_gap=seq_gap,
                         journal_in_state_dir=config.store_backend != "postgresql")
    except (ArchiveRefused, RestoreRefused) as exc:
        print(f"whatsappd: restore refused: {exc}", file=sys.stderr)
        return 1
    for cid in result.companies:
        print(f"restored {cid}")
    if result.journal_next_seq is not None:
        print(f"restored the journal and outbox; the next event gets seq {result.journal_next_seq}")
    if result.replaced is not None:
        print(f"what was replaced is kept in {result.replaced}")
    for note in result.notes:
        print(f"note: {note}")
    if companies is None:
        print("start the daemon: the restored companies connect without a QR code")
    else:
        print("start them: whatsappctl connect ID (or restart the daemon)")
    return 0

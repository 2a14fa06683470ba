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
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any

from whatsappd import pidlock
from whatsappd.backup.archive import Manifest, verify
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

__all__ = ["BackupFailed", "backup_offline", "fetch_backup", "summary", "target_path"]


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


def fetch_backup(client: Client, companies: list[str], target: Path) -> Manifest:
    """POST /v1/backup (?company=...) and save the archive atomically at target, verified."""
    query = urllib.parse.urlencode([("company", c) for c in companies])
    manifest: list[Manifest] = []

    def write(f: IO[bytes], tmp: Path) -> None:
        resp = client.download("POST", "/v1/backup" + (f"?{query}" if query else ""), f)
        if not resp.ok:
            try:
                body = resp.json()
                message = f"{body['error']['message']} [{body['error']['code']}]"
            except (ValueError, KeyError, TypeError):
                body, message = None, f"HTTP {resp.status}"
            raise BackupFailed(message, body)
        f.flush()
        manifest.append(verify(tmp))

    save_atomically(target, write)
    return manifest[0]


def _configured(config: Config) -> list[tuple[str, str, str]]:
    out = [(c.id, c.engine, "config") for c in config.companies]
    known = {c[0] for c in out}
    raw = registry_bytes(config.daemon_state_dir / "companies.json", None)
    if raw is not None:
        for company in json.loads(raw).get("companies", []):
            if company.get("id") not in known:
                out.append((company["id"], company.get("engine", "neonize"), "runtime"))
    return out


def backup_offline(config: Config, companies: list[str], target: Path) -> Manifest:
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
            manifest: list[Manifest] = []

            def write(f: IO[bytes], tmp: Path) -> None:
                registry = registry_bytes(state_dir / "companies.json", companies or None)
                build_archive(f, state_dir=state_dir, staging=staging, companies=found,
                              config_text=render_config(config), full=not companies, registry=registry,
                              store=store_record(config.store_backend, config.store_dsn))
                f.flush()
                manifest.append(verify(tmp))

            save_atomically(target, write)
            return manifest[0]
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        os.close(lock)


def summary(manifest: Manifest, target: Path) -> str:
    journal = manifest.journal_last_seq
    size = target.stat().st_size
    if (database := manifest.external_journal) is not None:
        what = (f", sessions, companies and config only: the journal and outbox live in PostgreSQL ({database}) "
                "and are NOT in this archive; back them up with pg_dump (README: Backups)")
    elif journal is not None:
        what = f", journal up to seq {journal}"
    else:
        what = ", no journal (company backup)"
    return (f"backup written to {target} ({size} bytes, mode 0600): {len(manifest.companies)} companies{what}"
            "; keep it encrypted and off public places (README: Backups)")


def run_backup(config: Config, socket_path: str | None, to: Path | None, companies: list[str]) -> int:
    """`whatsappd backup`: through the daemon if it answers, else from the stopped state directory."""
    target = target_path(to)
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
        print(f"whatsappd: backup failed: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
        return 1
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

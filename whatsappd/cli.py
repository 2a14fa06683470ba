"""`whatsappd`: run | check-config | check-store | migrate | clean-sessions | import-baileys | backup | restore | doctor."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from types import TracebackType
from typing import TextIO

from whatsappd import __version__, pidlock
from whatsappd.config import Config, ConfigError, load_config, render_config
from whatsappd.exits import EX_CONFIG

__all__ = ["main"]



def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whatsappd",
        description="Keeps one WhatsApp connection alive per company; driven over a Unix control socket.",
    )
    parser.add_argument("--version", action="version", version=f"whatsappd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, metavar="PATH",
                       help="config file (default: /etc/whatsappd/whatsappd.toml if it exists, "
                            "else built-in defaults)")

    run = sub.add_parser("run", help="run the daemon in the foreground (or --daemonize)")
    add_config(run)
    run.add_argument("--daemonize", action="store_true",
                     help="detach from the terminal (for hosts without systemd); needs --pidfile")
    run.add_argument("--pidfile", type=Path, metavar="PATH", help="write and lock this pid file")
    run.add_argument("--log-file", type=Path, metavar="PATH",
                     help="with --daemonize: append logs here (default: STATE_DIR/whatsappd.log)")

    check = sub.add_parser("check-config", help="validate the config and print the effective settings")
    add_config(check)

    store = sub.add_parser("check-store", help="check the journal/outbox database and the session stores "
                           "for damage (read-only; safe while the daemon runs)")
    add_config(store)
    store.add_argument("--path", type=Path, metavar="FILE", action="append",
                       help="check this SQLite file instead (repeatable); default: STATE_DIR/whatsappd.sqlite "
                            "and every sessions/session-*/store.db")

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema (the daemon also does it at "
                             "start; under a lock, so concurrent starts never race)")
    add_config(migrate)

    clean = sub.add_parser("clean-sessions",
                           help="find and remove legacy browser-profile and Baileys sessions")
    add_config(clean)
    clean.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    clean.add_argument("--path", type=Path, metavar="DIR",
                       help="directory to scan (default: STATE_DIR/sessions), e.g. the old CRM's sessions/")

    imp = sub.add_parser("import-baileys",
                         help="move companies from the old CRM's Baileys sessions to whatsappd, without a new QR scan")
    add_config(imp)
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", type=Path, metavar="DIR",
                        help="one Baileys folder (the one holding creds.json); needs exactly one --company")
    source.add_argument("--from-root", type=Path, metavar="DIR",
                        help="the CRM's sessions directory, holding session-<id>/ folders")
    imp.add_argument("--company", action="append", metavar="ID",
                     help="the company to import (repeatable with --from-root)")
    imp.add_argument("--all", action="store_true", help="with --from-root: every Baileys folder in it")
    imp.add_argument("--dry-run", action="store_true", help="check and convert everything, write nothing")
    imp.add_argument("--json", action="store_true", help="print the report as JSON")
    imp.add_argument("--min-idle", type=float, default=120.0, metavar="SECONDS",
                     help="refuse a folder with a file changed less than this long ago (default 120: "
                          "Baileys may still be running)")

    bak = sub.add_parser("backup", help="write a consistent backup archive of the state directory (while the "
                         "daemon runs, or of a stopped one)")
    add_config(bak)
    bak.add_argument("--to", type=Path, metavar="FILE", help="the archive to write, or a directory for it "
                     "(default: ./whatsappd-backup-TIME.tar.gz); -: stdout, for a pipe into age or gpg")
    bak.add_argument("--company", action="append", default=[], metavar="ID",
                     help="only this company's session (repeatable; no journal)")
    bak.add_argument("--socket", metavar="PATH", help="the running daemon's control socket (default: the config's)")
    res = sub.add_parser("restore", help="restore a backup archive into a stopped state directory, or single "
                         "stopped companies")
    add_config(res)
    res.add_argument("archive", type=Path, metavar="FILE")
    res.add_argument("--company", action="append", metavar="ID",
                     help="restore only this company's session (repeatable; the daemon may run)")
    res.add_argument("--overwrite", action="store_true",
                     help="replace paired sessions and the journal already there (moved to STATE_DIR/replaced/)")
    res.add_argument("--seq-gap", type=int, default=None, metavar="N",
                     help="continue the journal N past the backup's last seq (default 1000000; README: Backups)")
    doctor = sub.add_parser("doctor", help="is anything wrong? one line per finding with its fix; exit 1 if any "
                            "(reads the state directory only; whatsappctl doctor also asks the running daemon)")
    add_config(doctor)
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    return parser


def _load(path: Path | None, err: TextIO) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"whatsappd: {exc}", file=err)
        return None


class PidFile:
    """A pid file held with an exclusive flock for the daemon's life (python-daemon's pidfile
    protocol: a context manager). A stale file left by a crash is no obstacle: its lock died
    with its process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid of a live process holding the lock, or None."""
        return pidlock.holder(self.path)

    def __enter__(self) -> PidFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = pidlock.acquire(self.path, 0o644)
        except pidlock.Held:
            raise SystemExit(f"whatsappd: another instance holds {self.path}") from None
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    if args.daemonize:
        if args.pidfile is None:
            print("whatsappd: --daemonize needs --pidfile PATH (a second instance is refused through it)",
                  file=sys.stderr)
            return 2
        return _daemonize(config, args)
    if args.pidfile is not None:
        with PidFile(args.pidfile):
            return _serve(config, args.config)
    return _serve(config, args.config)


def _daemonize(config: Config, args: argparse.Namespace) -> int:
    import daemon  # python-daemon: only needed on hosts without systemd

    pidfile = PidFile(args.pidfile.absolute())
    holder = pidfile.holder()
    if holder is not None:
        print(f"whatsappd: already running (pid {holder} holds {args.pidfile}); not starting a second "
              "instance", file=sys.stderr)
        return 1
    log_path = args.log_file or config.daemon_state_dir / "whatsappd.log"
    try:
        log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (kept for the daemon's life)
    except OSError as exc:
        print(f"whatsappd: cannot open the log file {log_path}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"whatsappd: detaching; logs go to {log_path}, pid file {args.pidfile}", file=sys.stderr)
    context = daemon.DaemonContext(
        pidfile=pidfile, stdout=log_file, stderr=log_file, umask=0o077, signal_map={},
    )
    with context:
        return _serve(config, args.config.absolute() if args.config else None)


def _serve(config: Config, config_path: Path | None) -> int:
    import faulthandler

    from whatsappd.logs import configure_logging

    # If the watchdog ever aborts us (SIGABRT), the journal shows where the event loop hung.
    faulthandler.enable()

    configure_logging(config.logging_format, config.logging_level)
    return asyncio.run(_main(config, config_path))


async def _main(config: Config, config_path: Path | None) -> int:
    from whatsappd.daemon import Daemon

    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        # Python 3.11's default child watcher keeps one thread per worker process; a pidfd
        # watcher waits for them all from the event loop (3.12 does this by itself).
        try:
            watcher = asyncio.PidfdChildWatcher()
            watcher.attach_loop(asyncio.get_running_loop())
            asyncio.get_event_loop_policy().set_child_watcher(watcher)
        except OSError:
            pass  # a kernel without pidfd_open: keep the default
    return await Daemon(config, config_path).run()


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    sys.stdout.write(render_config(config))
    print(f"# configuration OK ({config.source}); {len(config.companies)} companies", file=sys.stderr)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    """Create or upgrade the configured store's schema: one line on success; 1 if it cannot."""
    from whatsappd.store import StoreError
    from whatsappd.store.select import migrate_store

    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    try:
        print(migrate_store(config))
    except StoreError as exc:
        print(f"whatsappd: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_store(args: argparse.Namespace) -> int:
    """PRAGMA integrity_check on each store: one line per finding; 0 if all are sound, else 1."""
    from whatsappd.sessions import NEONIZE_STORE
    from whatsappd.store import check_database, corrupt_fix
    from whatsappd.supervisor.devices import Place, place

    paths: list[Path] = args.path or []
    damaged = 0
    if not paths:
        config = _load(args.config, sys.stderr)
        if config is None:
            return EX_CONFIG
        journal = config.daemon_state_dir / "whatsappd.sqlite"
        if config.store_backend == "postgresql":  # a leftover whatsappd.sqlite is not the journal
            from whatsappd.store.postgresql import redact

            print(f"the journal and outbox are in PostgreSQL ({redact(config.store_dsn)}), not in a file: "
                  "`whatsappd doctor` checks the database")
        elif journal.exists():
            paths.append(journal)
        else:
            print(f"{journal}: not created yet (the daemon creates it at its first start)")
        if place(config.whatsmeow_dsn, "neonize") is Place.POSTGRESQL:
            damaged = _check_pg_devices(config)
        else:
            paths += sorted(config.sessions_dir.glob(f"session-*/{NEONIZE_STORE}"))
    for path in paths:
        if not path.is_file():
            print(f"{path}: no such file")
            damaged += 1
            continue
        findings = check_database(path)
        for finding in findings:
            print(f"{path}: {finding}")
        if findings:
            damaged += 1
            fix = (corrupt_fix(path) if path.name == "whatsappd.sqlite" else
                   "restore it from a backup with the daemon stopped; else the daemon quarantines it "
                   "when the company starts, and the company must be paired again")
            print(f"{path}: DAMAGED ({len(findings)} findings); {fix}")
        else:
            print(f"{path}: ok")
    return 1 if damaged else 0


def _check_pg_devices(config: Config) -> int:
    """check-store for neonize sessions in PostgreSQL: each recorded device must have its row in
    whatsmeow's tables (there is no integrity_check to run: PostgreSQL keeps its own pages sound).
    One line per company; how many are not usable (a database that does not answer counts one)."""
    import psycopg

    from whatsappd.sessionstore import SessionState
    from whatsappd.store.postgresql import redact
    from whatsappd.supervisor.devices import PgDevices

    assert config.whatsmeow_dsn is not None
    where = redact(config.whatsmeow_dsn)
    print(f"neonize sessions are devices in whatsmeow's PostgreSQL store ({where}), selected by the JIDs "
          "recorded in whatsappd_devices; a store.db under sessions/ is not used and not checked")
    pg = PgDevices(config.store_dsn, config.whatsmeow_dsn)
    try:
        devices = pg.all()
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        for dsn in (config.store_dsn, config.whatsmeow_dsn):
            reason = reason.replace(dsn, redact(dsn))
        print(f"{where}: cannot read the recorded devices ({reason}); `whatsappd doctor` checks the database")
        return 1
    finally:
        pg.close()
    missing = 0
    for company, device in sorted(devices.items()):
        if device.state is SessionState.PAIRED:
            print(f"{company}: device {device.jid}: ok")
        else:
            missing += 1
            print(f"{company}: device {device.jid}: MISSING (no row in whatsmeow_device: unlinked by the phone, or "
                  f"deleted); pair the company again: whatsappctl connect {company}")
    if not devices:
        print(f"{where}: no device recorded yet")
    return missing


def _clean_sessions(args: argparse.Namespace) -> int:
    from whatsappd.legacy import Failed, LegacyError, format_size, remove_legacy, scan_legacy

    root = args.path
    if root is None:
        config = _load(args.config, sys.stderr)
        if config is None:
            return EX_CONFIG
        root = config.sessions_dir
    try:
        scan = scan_legacy(root)
    except LegacyError as exc:
        print(f"whatsappd: {exc}", file=sys.stderr)
        return 1
    for skipped in scan.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}")
    if not scan.found:
        print(f"no legacy sessions in {root}")
        return 0
    total = format_size(scan.total_bytes)
    if args.dry_run:
        for session in scan.found:
            print(f"would remove {session.path} ({session.describe()})")
        print(f"{len(scan.found)} legacy sessions, {total} in all; dry run, nothing removed")
        return 0
    results = remove_legacy(scan.found, root)
    freed = 0
    for result in results:
        if isinstance(result, Failed):
            print(f"failed {result.session.path}: {result.reason}", file=sys.stderr)
        else:
            freed += result.session.size_bytes
            print(f"removed {result.session.path} ({result.session.describe()})")
    removed = sum(1 for r in results if not isinstance(r, Failed))
    print(f"removed {removed} of {len(results)} legacy sessions, {format_size(freed)} freed")
    return 0 if removed == len(results) else 1


def _import_baileys(args: argparse.Namespace) -> int:
    import json

    from whatsappd.baileys import Refused, RootReport, import_company, import_root
    from whatsappd.baileys.pgstore import PgTarget

    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    pg = PgTarget.of(config)  # a neonize session's place: PostgreSQL, or the session directory
    if args.source is not None:
        if args.all or not args.company or len(args.company) != 1:
            print("whatsappd: --from DIR imports one company: give exactly one --company ID (and no --all)",
                  file=sys.stderr)
            return 2
        result = RootReport(str(args.source))
        result.reports.append(import_company(args.source, args.company[0], config.sessions_dir,
                                             dry_run=args.dry_run, min_idle=args.min_idle, pg=pg))
    else:
        if bool(args.all) == bool(args.company):
            print("whatsappd: --from-root needs either --company ID (repeatable) or --all", file=sys.stderr)
            return 2
        try:
            result = import_root(args.from_root, config.sessions_dir, None if args.all else args.company,
                                 dry_run=args.dry_run, min_idle=args.min_idle, pg=pg)
        except Refused as exc:
            print(f"whatsappd: {exc.message}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps({"companies": [r.as_json() for r in result.reports], "skipped": result.skipped},
                         indent=1, ensure_ascii=False))
    else:
        for skipped in result.skipped:
            print(f"skipped {skipped['path']}: {skipped['reason']}")
        for report in result.reports:
            print("\n".join(report.lines()))
        done = sum(1 for r in result.reports if r.ok)
        verb = "would import" if args.dry_run else "imported"
        print(f"{verb} {done} of {len(result.reports)} companies" + ("; dry run, nothing written" if args.dry_run else ""))
    return 0 if result.ok and result.reports else 1


def _backup(args: argparse.Namespace) -> int:
    from whatsappd.backup.commands import run_backup

    config = _load(args.config, sys.stderr)
    return EX_CONFIG if config is None else run_backup(config, args.socket, args.to, args.company)


def _restore(args: argparse.Namespace) -> int:
    from whatsappd.backup.commands import run_restore
    from whatsappd.backup.restore import DEFAULT_SEQ_GAP

    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    gap = DEFAULT_SEQ_GAP if args.seq_gap is None else args.seq_gap
    if gap < 1:
        print("whatsappd: --seq-gap must be at least 1", file=sys.stderr)
        return 2
    return run_restore(config, args.archive, args.company, args.overwrite, gap)


def _doctor(args: argparse.Namespace) -> int:
    from whatsappd.doctor import inspect_state_dir, print_findings

    config = _load(args.config, sys.stderr)
    if config is None:
        return EX_CONFIG
    return print_findings(inspect_state_dir(config), args.json)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"run": _run, "check-config": _check_config, "check-store": _check_store, "migrate": _migrate,
               "clean-sessions": _clean_sessions, "import-baileys": _import_baileys,
               "backup": _backup, "restore": _restore,
               "doctor": _doctor}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())

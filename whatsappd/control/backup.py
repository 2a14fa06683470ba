"""POST /v1/backup: a consistent snapshot of the state directory, streamed as one archive.

The daemon knows which companies there are, their state and JID, so it takes the snapshot
(whatsappd/backup/snapshot.py) in a thread, into a private temporary file under STATE_DIR/tmp,
then streams that file and removes it. One backup runs at a time; a second request waits.
`?company=ID` (repeatable) limits it to those companies' sessions (no journal).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from aiohttp import web

from whatsappd.backup.snapshot import (
    CompanyInfo,
    build_archive,
    registry_bytes,
    staging_dir,
    store_record,
    stored_jid,
)
from whatsappd.config import render_config
from whatsappd.control.bodies import check_company_ids
from whatsappd.control.services import services
from whatsappd.errors import ErrorCode, Failure
from whatsappd.logs import get_logger

__all__ = ["backup"]

log = get_logger()
_LOCK = web.AppKey("backup_lock", asyncio.Lock)
_CHUNK = 256 * 1024


def _lock(app: web.Application) -> asyncio.Lock:
    lock = app.get(_LOCK)
    if lock is None:
        lock = asyncio.Lock()
        app[_LOCK] = lock
    return lock


async def backup(request: web.Request) -> web.StreamResponse:
    parts = services(request)
    config = parts.config()
    wanted = check_company_ids(tuple(dict.fromkeys(request.query.getall("company", []))))
    runners = [parts.supervisor.get(cid) for cid in wanted] if wanted else [
        parts.supervisor.companies[cid] for cid in sorted(parts.supervisor.companies)]
    # The daemon's view now; a company that has not connected yet gets the JID its credentials hold.
    seen = [CompanyInfo(r.id, r.config.engine, str(r.state), r.jid or None, r.source) for r in runners]
    state_dir = config.daemon_state_dir
    tmp_root = state_dir / "tmp"
    async with _lock(request.app):
        started = time.monotonic()
        staging = await asyncio.to_thread(staging_dir, tmp_root)
        fd, name = tempfile.mkstemp(prefix="backup-", suffix=".tar.gz", dir=tmp_root)  # 0600
        archive = Path(name)
        try:
            def take() -> dict[str, object]:
                companies = [c if c.jid else dataclasses.replace(c, jid=stored_jid(r.session_dir))
                             for c, r in zip(seen, runners, strict=True)]
                with os.fdopen(fd, "wb") as out:
                    registry = registry_bytes(state_dir / "companies.json", wanted or None)
                    return build_archive(out, state_dir=state_dir, staging=staging, companies=companies,
                                         config_text=render_config(config), full=not wanted, registry=registry,
                                         store=store_record(config.store_backend, config.store_dsn))

            try:
                manifest = await asyncio.to_thread(take)
            except (OSError, sqlite3.Error) as exc:
                raise Failure(ErrorCode.BACKUP_FAILED, f"the backup could not be taken: {exc}") from None
            finally:
                await asyncio.to_thread(shutil.rmtree, staging, True)
            size = archive.stat().st_size
            journal = manifest.get("journal")
            log.info("backup taken", companies=len(runners), bytes=size,
                     journal_last_seq=journal.get("last_seq") if isinstance(journal, dict) else None,
                     seconds=round(time.monotonic() - started, 3))
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            response = web.StreamResponse(headers={
                "Content-Type": "application/gzip", "Content-Length": str(size), "Cache-Control": "no-store",
                "Content-Disposition": f'attachment; filename="whatsappd-backup-{stamp}.tar.gz"'})
            await response.prepare(request)
            with open(archive, "rb") as f:
                while chunk := await asyncio.to_thread(f.read, _CHUNK):
                    await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            archive.unlink(missing_ok=True)

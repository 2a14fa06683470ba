"""POST /v1/companies/{id}/import-baileys: move one company from the old CRM's Baileys session,
without a QR scan, as `whatsappd import-baileys` does (whatsappd.baileys), for a CRM that drives
the move company by company.

The source is always `{import.baileys_root}/session-{id}`, never a path from the request; the
route is off while that setting is empty. The company must be at rest with no worker, and stays
held (its act lock) for the whole import, so no connect starts under it; the importer's session
lock check is the second guard. The import (file reads, SQLite, neonize's check in a subprocess)
runs in a thread, off the event loop. After a real import the company is started like any
paired company: it restores its session and dials WhatsApp to log in.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from whatsappd.control.bodies import read_json
from whatsappd.control.services import company_runner, services
from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.states import RESTING

__all__ = ["import_baileys"]


def _dry_run(body: Any) -> bool:
    if not isinstance(body, dict) or set(body) != {"dry_run"} or not isinstance(body["dry_run"], bool):
        raise ApiError(ErrorCode.BAD_REQUEST, 'send {"dry_run": true} to check the Baileys folder and write nothing, '
                       'or {"dry_run": false} to import it')
    dry_run: bool = body["dry_run"]
    return dry_run


async def import_baileys(request: web.Request) -> web.Response:
    # Here, not at the top: the importer (cryptography, SQLite schema) is loaded only when used.
    from whatsappd.baileys import import_company
    from whatsappd.baileys.pgstore import PgTarget

    runner = company_runner(request)
    dry_run = _dry_run(await read_json(request))
    config = services(request).config()
    root = config.import_baileys_root
    if root is None:
        raise ApiError(ErrorCode.IMPORT_DISABLED, "importing from Baileys through the API is off: set import.baileys_root "
                       "in the config file to the CRM's Baileys sessions directory (the one holding session-<id>/ "
                       "folders), then reload (POST /v1/reload)")
    if runner.config.engine != "neonize":
        raise ApiError(ErrorCode.WRONG_ENGINE, f"company {runner.id!r} runs engine {runner.config.engine!r}; a Baileys "
                       'session can only be imported for engine "neonize" (change it with PUT /v1/companies/{id})')
    async with runner.act():
        if runner.state not in RESTING or runner.worker is not None:
            raise ApiError(ErrorCode.COMPANY_RUNNING, f"company {runner.id!r} is {runner.state}, not stopped, so nothing "
                           "was imported: stop it with DELETE /v1/companies/{id} (one added with PUT is removed by that: "
                           "PUT it again), then import")
        report = await asyncio.to_thread(import_company, root / f"session-{runner.id}", runner.id, config.sessions_dir,
                                         dry_run=dry_run, pg=PgTarget.of(config))
        if report.error is not None:
            raise Failure(ErrorCode.parse(report.error["code"]), report.error["message"])
        if not dry_run:
            runner.start("imported from Baileys")
    return web.json_response(report.as_json(), status=200 if dry_run else 201)

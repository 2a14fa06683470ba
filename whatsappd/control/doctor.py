"""GET /v1/doctor: the findings of `whatsappd doctor`, plus what only the running daemon knows."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from whatsappd.control.services import services
from whatsappd.doctor import LiveCompany, inspect_live, inspect_state_dir

__all__ = ["doctor"]


async def doctor(request: web.Request) -> web.Response:
    s = services(request)
    config = s.config()
    # Reading every store takes a while: off the event loop, so nothing else waits for it.
    found = await asyncio.to_thread(inspect_state_dir, config, daemon_pid=os.getpid())
    companies = [LiveCompany(r.id, str(r.state), r.since, r.reason, r.last_error, r.ban_until, r.server_clock)
                 for r in s.supervisor.companies.values()]
    found += inspect_live(config, str(s.health()["socket"]), companies)
    return web.json_response({"clean": not found, "findings": [f.as_json() for f in found]})

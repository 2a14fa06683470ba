"""GET /v1/metrics: the daemon's figures for Prometheus (whatsappd/metrics/collector.py).

Text format 0.0.4, or OpenMetrics when the Accept header asks for it (as Prometheus does).
"""

from __future__ import annotations

from aiohttp import web

from whatsappd.control.services import services

__all__ = ["metrics"]


async def metrics(request: web.Request) -> web.Response:
    body, content_type = await services(request).metrics.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})

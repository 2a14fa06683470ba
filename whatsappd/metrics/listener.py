"""The optional plain-HTTP metrics listener (`[metrics] listen`): GET /metrics and nothing else.

Prometheus cannot scrape a Unix socket. This listener serves only the exposition, never the
control API, and has no authentication: it binds where the operator wrote (loopback unless they
wrote otherwise, with a warning then). The socket is bound when the daemon starts, before
anything else is opened, so a port in use stops the start with one clear line; it serves once
the store is open.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

from whatsappd.logs import get_logger
from whatsappd.metrics.address import ListenAddress

__all__ = ["MetricsListener", "bind_listen_socket"]

log = get_logger()

Exposition = Callable[[str], Awaitable[tuple[bytes, str]]]


def bind_listen_socket(address: ListenAddress) -> socket.socket:
    """A listening TCP socket on address (OSError, e.g. the port is taken, for the caller to report)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address.host, address.port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class MetricsListener:
    """Serves GET /metrics on an already bound socket; every other path is a 404."""

    def __init__(self, sock: socket.socket, address: ListenAddress, exposition: Exposition) -> None:
        self.sock = sock
        self.address = address
        self._exposition = exposition
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = await self._exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock, shutdown_timeout=1.0).start()
        if self.address.loopback:
            log.info("serving metrics over HTTP", address=str(self.address), path="/metrics")
        else:
            log.warning("serving metrics over HTTP on a non-loopback address, without authentication",
                        address=str(self.address), path="/metrics",
                        hint="firewall the port to your Prometheus, or listen on 127.0.0.1 behind a proxy")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.sock.close()

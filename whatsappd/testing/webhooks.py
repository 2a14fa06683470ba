"""A real webhook receiver for tests and benchmarks: an aiohttp server in a background thread, on
127.0.0.1 or on a Unix socket, that checks each POST's signature and can be told to fail.

First-class test code like `whatsappd.testing.daemon`: the daemon POSTs to it over real sockets.
Modes: "ok" answers 200; "error" answers 500; "hang" never answers (the request stays open
until the receiver stops); "redirect" answers 307 to `redirect_to`. `delay` holds each answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

__all__ = ["Delivery", "Receiver"]


@dataclass
class Delivery:
    """One POST as the receiver saw it."""

    arrived: float  # time.time()
    headers: dict[str, str]
    body: bytes
    signature_ok: bool
    answered: int | None = None  # the status answered; None: never answered (hang)
    event: dict[str, Any] = field(default_factory=dict)


class Receiver:
    def __init__(self, secret: str, unix: Path | None = None) -> None:
        self.secret = secret
        self.unix = unix
        self.mode = "ok"
        self.delay = 0.0
        self.redirect_to = ""
        self.requests: list[Delivery] = []
        self.port = 0
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="webhook-receiver", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the webhook receiver did not start")

    @property
    def url(self) -> str:
        """The URL a webhook names to reach this receiver."""
        return f"unix:{self.unix}:/hook" if self.unix else f"http://127.0.0.1:{self.port}/hook"

    # ------------------------------------------------------------------------------ server

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site: web.BaseSite = (web.UnixSite(self._runner, str(self.unix)) if self.unix
                              else web.TCPSite(self._runner, "127.0.0.1", 0))
        await site.start()
        if not self.unix:
            server = site._server  # noqa: SLF001 (the only way to learn the port it bound)
            assert isinstance(server, asyncio.base_events.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        timestamp = request.headers.get("X-Whatsappd-Timestamp", "")
        expected = "sha256=" + hmac.new(self.secret.encode(), timestamp.encode() + b"." + body,
                                        hashlib.sha256).hexdigest()
        ok = hmac.compare_digest(expected, request.headers.get("X-Whatsappd-Signature", ""))
        delivery = Delivery(time.time(), dict(request.headers), body, ok, event=json.loads(body))
        mode = self.mode
        with self._cond:
            self.requests.append(delivery)
        if mode == "hang":
            await asyncio.sleep(3600)
        if self.delay:
            await asyncio.sleep(self.delay)
        status = {"ok": 200, "error": 500, "redirect": 307}[mode]
        with self._cond:
            delivery.answered = status
        if mode == "redirect":
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=status, text="ok" if status == 200 else "no")

    # ----------------------------------------------------------------------------- reading

    def accepted(self) -> list[Delivery]:
        """The POSTs answered 2xx, in the order they arrived."""
        with self._cond:
            return [d for d in self.requests if d.answered == 200]

    def wait_accepted(self, predicate: Any, timeout: float = 30.0, what: str = "") -> list[Delivery]:
        """Wait until predicate(accepted deliveries) holds; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.accepted()
            if predicate(got):
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}; "
                                   f"{len(got)} accepted of {len(self.requests)} received")
            time.sleep(min(remaining, 0.1))  # polled: a check per delivery would starve the receiver

    def clear(self) -> None:
        with self._cond:
            self.requests.clear()

    def close(self) -> None:
        async def stop() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]  # hung handlers
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Receiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

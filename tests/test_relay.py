"""The worker's SOCKS5 relay (whatsappd/worker/relay.py) and its connect gate, on real sockets.

The test plays whatsmeow's part with a small SOCKS5 client; the upstream is a fault-injecting
SOCKS5 listener or a small HTTP CONNECT proxy, both on 127.0.0.1. The real client goes through
the relay in tests/test_neonize_engine.py and tests/test_neonize_daemon.py.
"""

from __future__ import annotations

import base64
import os
import queue
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Iterator

import pytest

from whatsappd.testing.daemon import wait_until
from whatsappd.testing.socks5 import Socks5FaultProxy
from whatsappd.worker.gate import ConnectGate
from whatsappd.worker.relay import Relay

CHAT = ("web.whatsapp.com", 443)
MEDIA = ("mmg.whatsapp.net", 443)


def socks_connect(url: str, host: str, port: int, password: str | None = None) -> tuple[int, socket.socket]:
    """What whatsmeow does: greet with user/password, CONNECT host:port; (reply code, socket)."""
    parts = urllib.parse.urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(b"\x05\x01\x02")
    assert sock.recv(2) == b"\x05\x02"
    user, secret = (parts.username or "").encode(), (password or parts.password or "").encode()
    sock.sendall(bytes([1, len(user)]) + user + bytes([len(secret)]) + secret)
    if sock.recv(2) != b"\x01\x00":
        return -1, sock
    name = host.encode()
    sock.sendall(bytes([5, 1, 0, 3, len(name)]) + name + struct.pack(">H", port))
    reply = sock.recv(10)
    return reply[1], sock


class Grants:
    """The supervisor's side of a gate: records each request; the test grants by hand."""

    def __init__(self) -> None:
        self.requests: queue.SimpleQueue[float] = queue.SimpleQueue()
        self.gate = ConnectGate(lambda: self.requests.put(time.monotonic()), tokens=1)


@pytest.fixture
def grants() -> Grants:
    return Grants()


@pytest.fixture
def upstream() -> Iterator[Socks5FaultProxy]:
    with Socks5FaultProxy(mode="close") as proxy:
        yield proxy


def _background(call: object) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(call()), daemon=True)  # type: ignore[operator]
    thread.start()
    return thread, out


def test_each_connect_to_the_chat_server_spends_a_token_and_media_does_not(grants, upstream):
    """The first chat CONNECT uses the token the worker starts with; the next waits for a grant; media never waits."""
    relay = Relay(upstream.url, grants.gate).start()
    code, first = socks_connect(relay.url, *CHAT)
    assert code == 0 and grants.requests.empty()
    code, media = socks_connect(relay.url, *MEDIA)
    assert code == 0 and grants.requests.empty()
    thread, out = _background(lambda: socks_connect(relay.url, *CHAT))
    grants.requests.get(timeout=5)  # asked for a token ...
    time.sleep(0.3)
    assert thread.is_alive() and upstream.requests == [CHAT, MEDIA]  # ... and nothing went out meanwhile
    grants.gate.grant()
    thread.join(5)
    assert out[0][0] == 0  # type: ignore[index]
    assert upstream.requests == [CHAT, MEDIA, CHAT] and grants.gate.attempts == 2
    for sock in (first, media, out[0][1]):  # type: ignore[index]
        sock.close()
    relay.close()


def test_a_closed_gate_fails_a_held_attempt_at_once_and_nothing_goes_out(grants, upstream):
    """The worker ending (gate closed) answers a held CONNECT with a failure; the upstream never sees it."""
    relay = Relay(upstream.url, grants.gate).start()
    socks_connect(relay.url, *CHAT)[1].close()
    thread, out = _background(lambda: socks_connect(relay.url, *CHAT))
    grants.requests.get(timeout=5)
    grants.gate.close()
    thread.join(5)
    assert out[0][0] == 1  # type: ignore[index]
    out[0][1].close()  # type: ignore[index]
    assert upstream.requests == [CHAT]
    relay.close()


def test_an_upstream_refusal_is_passed_back_with_its_code(grants):
    """A proxy that refuses (SOCKS code 5): whatsmeow gets code 5 too, as if it had dialed the proxy itself."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        relay = Relay(proxy.url, grants.gate).start()
        code, sock = socks_connect(relay.url, *CHAT)
        sock.close()
        assert code == 5 and proxy.requests == [CHAT]
        relay.close()


def test_a_client_without_the_relays_secret_is_refused_and_nothing_goes_out(grants, upstream):
    """Another local user who finds the port cannot use the relay: wrong password, no upstream connection."""
    relay = Relay(upstream.url, grants.gate).start()
    code, sock = socks_connect(relay.url, *CHAT, password="guess")
    sock.close()
    assert code == -1
    time.sleep(0.2)
    assert upstream.connections == 0 and grants.gate.attempts == 0
    relay.close()


class HttpConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that records each request head and echoes the tunnel."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(1)
            self.heads.append(head)
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.close()


def test_an_http_proxy_with_credentials_gets_a_connect_and_the_tunnel_carries_bytes_both_ways(grants):
    """An HTTP proxy upstream with user:pass in its URL: CONNECT with Basic credentials (URL-decoded), then bytes flow both ways."""
    proxy = HttpConnectProxy()
    relay = Relay(f"http://crm%40acme:p%3Ass@127.0.0.1:{proxy.port}", grants.gate).start()
    code, sock = socks_connect(relay.url, *CHAT)
    assert code == 0
    sock.sendall(b"x" * 200_000)
    received = b""
    while len(received) < 200_000:
        received += sock.recv(65536)
    assert received == b"x" * 200_000
    sock.close()
    wait_until(lambda: proxy.heads, 5)
    head = proxy.heads[0].decode()
    assert head.startswith("CONNECT web.whatsapp.com:443 HTTP/1.1\r\n")
    assert f"Proxy-Authorization: Basic {base64.b64encode(b'crm@acme:p:ss').decode()}" in head
    proxy.listener.close()
    relay.close()


@pytest.mark.parametrize("upstream_url", [None, "socks5://proxy.example.com:1080", "http://proxy.example.org:3128"])
def test_loopback_only_refuses_any_dial_that_would_leave_the_machine_before_resolving_a_name(grants, upstream_url):
    """WHATSAPPD_LOOPBACK_ONLY: no proxy, or a proxy not on loopback, is 'not allowed' and nothing is dialed."""
    relay = Relay(upstream_url, grants.gate, loopback_only=True).start()
    try:
        code, sock = socks_connect(relay.url, *MEDIA)  # media: no gate token involved
        sock.close()
        assert code == 2  # SOCKS5 "connection not allowed by ruleset"
        grants.gate.grant()
        code, sock = socks_connect(relay.url, *CHAT)
        sock.close()
        assert code == 2
    finally:
        relay.close()


def test_loopback_only_still_reaches_a_proxy_on_loopback(grants):
    """WHATSAPPD_LOOPBACK_ONLY lets the tests' 127.0.0.1 listeners work: the proxy sees the CONNECT."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        relay = Relay(proxy.url, grants.gate, loopback_only=True).start()
        try:
            code, sock = socks_connect(relay.url, *MEDIA)
            sock.close()
            assert code == 5  # the proxy's own refusal, passed back
            assert proxy.requests == [MEDIA]
        finally:
            relay.close()


def test_the_test_suite_runs_with_loopback_only_and_daemons_it_starts_inherit_it():
    """conftest sets WHATSAPPD_LOOPBACK_ONLY=1, and clean_env keeps it for every daemon and worker."""
    from whatsappd.testing.daemon import clean_env
    from whatsappd.worker.relay import LOOPBACK_ONLY_ENV

    assert os.environ.get(LOOPBACK_ONLY_ENV) == "1"
    assert clean_env().get(LOOPBACK_ONLY_ENV) == "1"

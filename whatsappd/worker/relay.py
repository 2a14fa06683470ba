"""The real engine's way out: a SOCKS5 relay on 127.0.0.1 inside the worker process.

Why it exists: every connection attempt must spend a token of the supervisor's global
connect-rate limiter (whatsappd/worker/gate.py), and whatsmeow reconnects by itself after a
live drop (at once, then every 2·n seconds). neonize 0.5.2 exposes neither whatsmeow's
EnableAutoReconnect nor its AutoReconnectHook, so the engine cannot see those attempts coming,
let alone hold them. What it does control is where whatsmeow dials: the client is given this
relay as its proxy, and the relay holds each CONNECT to the chat server at the gate before
forwarding it. So no attempt, whoever makes it, reaches the network unpaced.

- whatsmeow dials ``socks5://whatsappd:SECRET@127.0.0.1:PORT``; the secret is random per
  process and only ever handed to the Go library in memory, so no other local user can use
  the relay (or spend its tokens).
- Each CONNECT goes on through the company's proxy (``socks5``, ``http`` or ``https``, with
  the user and password of its URL), or directly when it has none, and the two sockets are
  spliced. Host names are passed on, never resolved here (a SOCKS5 upstream resolves them).
- Only CONNECTs to the chat server (CHAT_SERVERS) are attempts; media uploads and downloads
  are not held.
- A refusal by the upstream proxy is passed back with the same SOCKS reply code; anything
  else that fails before the tunnel is up gets "general failure" (or the matching code).
- With ``WHATSAPPD_LOOPBACK_ONLY=1`` in the daemon's environment (a staging or test install
  that must never reach WhatsApp), the relay opens no connection but to a loopback address
  written as such (127.0.0.0/8, ::1, localhost): a company without a proxy, or with a proxy
  elsewhere, gets "not allowed", and no name is even resolved. The test suite runs with it.
"""

from __future__ import annotations

import base64
import contextlib
import hmac
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import threading
import urllib.parse
from typing import Any

from whatsappd.worker.gate import ConnectGate

__all__ = ["CHAT_SERVERS", "LOOPBACK_ONLY_ENV", "Relay", "RelayRefused"]

#: Where whatsmeow's chat websocket goes (whatsmeow socket.URL): connecting there is an attempt.
CHAT_SERVERS = frozenset({("web.whatsapp.com", 443)})

#: The environment variable that keeps every dial on loopback (see the module doc).
LOOPBACK_ONLY_ENV = "WHATSAPPD_LOOPBACK_ONLY"

_USER = "whatsappd"
_UPSTREAM_CONNECT_TIMEOUT = 30.0  # as whatsmeow's own dialer (net.Dialer Timeout 30 s)
_CLIENT_TIMEOUT = 30.0  # the local client's SOCKS handshake (it is whatsmeow, so it is quick)
_MAX_HTTP_HEADER = 16 * 1024
_CHUNK = 64 * 1024

# SOCKS5 (RFC 1928, 1929)
_VER = 0x05
_AUTH_NONE, _AUTH_USERPASS, _AUTH_REFUSED = 0x00, 0x02, 0xFF
_CMD_CONNECT = 0x01
_ATYP_IPV4, _ATYP_DOMAIN, _ATYP_IPV6 = 0x01, 0x03, 0x04
REP_OK, REP_FAILURE, REP_NOT_ALLOWED, REP_HOST_UNREACHABLE, REP_REFUSED, REP_BAD_COMMAND = 0, 1, 2, 4, 5, 7


class RelayRefused(Exception):
    """The tunnel could not be opened; `code` is the SOCKS5 reply to give the client."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        data += chunk
    return data


def _read_address(sock: socket.socket, atyp: int) -> str:
    if atyp == _ATYP_IPV4:
        return str(ipaddress.IPv4Address(_recv_exact(sock, 4)))
    if atyp == _ATYP_IPV6:
        return str(ipaddress.IPv6Address(_recv_exact(sock, 16)))
    if atyp == _ATYP_DOMAIN:
        return _recv_exact(sock, _recv_exact(sock, 1)[0]).decode("idna")
    raise RelayRefused(REP_FAILURE, f"unknown SOCKS address type {atyp}")


def _address_bytes(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return bytes([_ATYP_DOMAIN, len(name)]) + name
    return bytes([_ATYP_IPV4 if ip.version == 4 else _ATYP_IPV6]) + ip.packed


def _reply(sock: socket.socket, code: int) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(bytes([_VER, code, 0, _ATYP_IPV4, 0, 0, 0, 0, 0, 0]))


class _Upstream:
    """How to reach a destination: the company's proxy (parsed from its URL), or directly."""

    def __init__(self, url: str | None, loopback_only: bool) -> None:
        self.loopback_only = loopback_only
        self.scheme = ""
        self.host = ""
        self.port = 0
        self.user: str | None = None
        self.password: str | None = None
        if url:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("socks5", "http", "https") or not parts.hostname:
                raise ValueError("the proxy must be socks5://, http:// or https://HOST[:PORT]")
            self.scheme, self.host = parts.scheme, parts.hostname
            self.port = parts.port or {"socks5": 1080, "http": 80, "https": 443}[parts.scheme]
            self.user = urllib.parse.unquote(parts.username) if parts.username else None
            self.password = urllib.parse.unquote(parts.password) if parts.password else None

    def open(self, host: str, port: int) -> socket.socket:
        """A socket connected to host:port (through the proxy); raise RelayRefused."""
        target = (self.host, self.port) if self.scheme else (host, port)
        if self.loopback_only and not _is_loopback(target[0]):
            raise RelayRefused(REP_NOT_ALLOWED, f"{target[0]}:{target[1]} is not a loopback address, and "
                                                f"{LOOPBACK_ONLY_ENV}=1 allows no other")
        try:
            sock = socket.create_connection(target, timeout=_UPSTREAM_CONNECT_TIMEOUT)
        except ConnectionRefusedError as exc:
            raise RelayRefused(REP_REFUSED, f"{target[0]}:{target[1]} refused the connection") from exc
        except OSError as exc:
            raise RelayRefused(REP_HOST_UNREACHABLE, f"cannot reach {target[0]}:{target[1]}: {exc}") from exc
        # As whatsmeow's dialers: no deadline on the proxy's answers (a silent proxy holds the
        # attempt until the supervisor's connect_timeout ends the worker).
        sock.settimeout(None)
        try:
            if self.scheme == "socks5":
                self._socks5(sock, host, port)
            elif self.scheme in ("http", "https"):
                if self.scheme == "https":
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
                self._http_connect(sock, host, port)
        except BaseException:
            sock.close()
            raise
        return sock

    def _socks5(self, sock: socket.socket, host: str, port: int) -> None:
        methods = [_AUTH_NONE, _AUTH_USERPASS] if self.user is not None else [_AUTH_NONE]
        try:
            sock.sendall(bytes([_VER, len(methods), *methods]))
            version, method = _recv_exact(sock, 2)
            if version != _VER or method not in methods:
                raise RelayRefused(REP_NOT_ALLOWED, "the proxy accepts none of our SOCKS5 methods")
            if method == _AUTH_USERPASS:
                user, password = (self.user or "").encode(), (self.password or "").encode()
                sock.sendall(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
                if _recv_exact(sock, 2)[1] != 0:
                    raise RelayRefused(REP_NOT_ALLOWED, "the proxy refused our user and password")
            sock.sendall(bytes([_VER, _CMD_CONNECT, 0]) + _address_bytes(host) + struct.pack(">H", port))
            _, code, _, atyp = _recv_exact(sock, 4)
            if code != REP_OK:
                raise RelayRefused(code, f"the proxy answered SOCKS5 code {code}")
            _read_address(sock, atyp)
            _recv_exact(sock, 2)
        except (OSError, ConnectionError) as exc:
            raise RelayRefused(REP_FAILURE, f"the proxy broke off the SOCKS5 handshake: {exc}") from exc

    def _http_connect(self, sock: socket.socket, host: str, port: int) -> None:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if self.user is not None:
            token = base64.b64encode(f"{self.user}:{self.password or ''}".encode()).decode()
            lines.append(f"Proxy-Authorization: Basic {token}")
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = b""
            while b"\r\n\r\n" not in head:  # byte by byte: nothing of the tunnel is read here
                head += _recv_exact(sock, 1)
                if len(head) > _MAX_HTTP_HEADER:
                    raise RelayRefused(REP_FAILURE, "the proxy's answer to CONNECT is too long")
        except (OSError, ConnectionError) as exc:
            raise RelayRefused(REP_FAILURE, f"the proxy broke off the CONNECT: {exc}") from exc
        status = head.split(b"\r\n", 1)[0].split()
        if len(status) < 2 or not status[0].startswith(b"HTTP/") or status[1] != b"200":
            code = REP_NOT_ALLOWED if status[1:2] in ([b"403"], [b"407"]) else REP_REFUSED
            raise RelayRefused(code, f"the proxy answered CONNECT with {b' '.join(status[:3]).decode(errors='replace')}")


def _splice(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both sides are done, then close both."""

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    back = threading.Thread(target=pump, args=(b, a), name="relay-pump", daemon=True)
    back.start()
    pump(a, b)
    back.join()
    a.close()
    b.close()


def _is_loopback(host: str) -> bool:
    """host is a loopback address as written (a name other than localhost is never resolved)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Relay:
    """A SOCKS5 listener on 127.0.0.1 for this worker's WhatsApp client; see the module doc."""

    def __init__(self, upstream: str | None, gate: ConnectGate, log: Any = None,
                 loopback_only: bool | None = None) -> None:
        if loopback_only is None:
            loopback_only = os.environ.get(LOOPBACK_ONLY_ENV) == "1"
        self._upstream = _Upstream(upstream, loopback_only)
        self._gate = gate
        self._log = log
        self._secret = secrets.token_hex(16)
        self._listener: socket.socket | None = None

    def start(self) -> Relay:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept_loop, args=(listener,), name="relay-accept", daemon=True).start()
        return self

    def close(self) -> None:
        """Stop accepting (tunnels already open live on until the process ends)."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None

    @property
    def url(self) -> str:
        """What to give whatsmeow as its proxy (it carries the secret: never log it)."""
        assert self._listener is not None, "start() the relay first"
        return f"socks5://{_USER}:{self._secret}@127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="relay-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            host, port = self._handshake(conn)
        except (OSError, ConnectionError, RelayRefused, UnicodeError):
            conn.close()
            return
        try:
            if (host, port) in CHAT_SERVERS and not self._gate.acquire("reconnect" if self._gate.attempts else "connect"):
                raise RelayRefused(REP_FAILURE, "the worker is ending: no more connection attempts")
            upstream = self._upstream.open(host, port)
        except RelayRefused as exc:
            if self._log is not None:
                self._log.info("relay_refused", destination=f"{host}:{port}", reply=exc.code, reason=str(exc))
            _reply(conn, exc.code)
            conn.close()
            return
        conn.settimeout(None)
        _reply(conn, REP_OK)
        _splice(conn, upstream)

    def _handshake(self, conn: socket.socket) -> tuple[str, int]:
        """Greeting, user/password (ours), CONNECT request: the destination."""
        conn.settimeout(_CLIENT_TIMEOUT)
        version, count = _recv_exact(conn, 2)
        methods = _recv_exact(conn, count)
        if version != _VER or _AUTH_USERPASS not in methods:
            conn.sendall(bytes([_VER, _AUTH_REFUSED]))
            raise RelayRefused(REP_NOT_ALLOWED, "client without our user and password")
        conn.sendall(bytes([_VER, _AUTH_USERPASS]))
        _, user_len = _recv_exact(conn, 2)
        user = _recv_exact(conn, user_len)
        password = _recv_exact(conn, _recv_exact(conn, 1)[0])
        if not (hmac.compare_digest(user, _USER.encode()) and hmac.compare_digest(password, self._secret.encode())):
            conn.sendall(b"\x01\x01")
            raise RelayRefused(REP_NOT_ALLOWED, "wrong user or password")
        conn.sendall(b"\x01\x00")
        version, command, _, atyp = _recv_exact(conn, 4)
        host = _read_address(conn, atyp)
        (port,) = struct.unpack(">H", _recv_exact(conn, 2))
        if version != _VER or command != _CMD_CONNECT:
            _reply(conn, REP_BAD_COMMAND)
            raise RelayRefused(REP_BAD_COMMAND, "only CONNECT is relayed")
        return host, port

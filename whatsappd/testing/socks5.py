"""A fault-injecting SOCKS5 sink on 127.0.0.1, for pointing the real WhatsApp library at.

Tests and benchmarks route the neonize client through this listener
(``ProxySettings(proxy_address=proxy.url)``) so that nothing ever leaves the machine and the
network failures the supervisor must survive can be produced on demand. It never forwards
anything anywhere: every connection ends here.

Modes (changeable at run time through ``proxy.mode``; a connection uses the mode current when
it was accepted):

``refuse``
    Answers the greeting, reads the CONNECT request (recorded), replies "connection refused"
    (REP=0x05) and closes. The client's dial fails at once.
``close``
    Completes the SOCKS handshake (greeting, CONNECT recorded, success reply), then closes the
    tunnel before any byte of the client's TLS/WebSocket handshake is answered.
``silent``
    Accepts the TCP connection and never answers, not even the greeting. Nothing is recorded
    but the connection. The client's dial hangs (neonize's ``connect()`` never returns).
``stall``
    Answers the greeting, reads the CONNECT request (recorded), then never answers.

For plain "connection refused" at the TCP level (no SOCKS peer at all) use :class:`ClosedPort`.

Usable from synchronous code and from an asyncio program alike: the listener runs in its own
threads.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from types import TracebackType
from typing import NamedTuple

__all__ = ["MODES", "ClosedPort", "Destination", "Socks5FaultProxy"]

MODES = ("refuse", "close", "silent", "stall")

_VERSION = 0x05
_NO_AUTH = 0x00
_NO_ACCEPTABLE_METHOD = 0xFF
_CMD_CONNECT = 0x01
_ATYP_IPV4 = 0x01
_ATYP_DOMAIN = 0x03
_ATYP_IPV6 = 0x04
REP_SUCCEEDED = 0x00
REP_CONNECTION_REFUSED = 0x05
REP_COMMAND_NOT_SUPPORTED = 0x07

#: How long a handler waits for the client's next SOCKS bytes before giving up on it.
_HANDSHAKE_TIMEOUT = 10.0


class Destination(NamedTuple):
    """One CONNECT request: what the client asked the proxy to reach (compares equal to a tuple)."""

    host: str
    port: int


class _ClientGone(Exception):
    """The client closed, or sent something that is not SOCKS5."""


class Socks5FaultProxy:
    """A SOCKS5 listener on 127.0.0.1 that fails on purpose and records what it was asked.

    >>> with Socks5FaultProxy(mode="refuse") as proxy:   # doctest: +SKIP
    ...     client.connect(ProxySettings(proxy_address=proxy.url))
    ...     assert proxy.requests == [("web.whatsapp.com", 443)]
    """

    def __init__(self, mode: str = "silent", *, port: int = 0, refuse_code: int = REP_CONNECTION_REFUSED) -> None:
        self._check_mode(mode)
        self._mode = mode
        self._requested_port = port
        self.refuse_code = refuse_code
        self._lock = threading.Condition()
        self._requests: list[Destination] = []
        self._connections = 0
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---------------------------------------------------------------- life

    def start(self) -> Socks5FaultProxy:
        """Bind 127.0.0.1 (an ephemeral port unless one was given) and start accepting."""
        if self._listener is not None:
            raise RuntimeError("the proxy is already started")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self._requested_port))
        listener.listen(128)
        listener.settimeout(0.1)
        self._listener = listener
        self._stopping.clear()
        self._acceptor = threading.Thread(target=self._accept_loop, name="socks5-fault-accept", daemon=True)
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every connection it holds, and join its threads."""
        self._stopping.set()
        if self._acceptor is not None:
            self._acceptor.join(5)
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            held = list(self._open)
            threads = list(self._threads)
        for conn in held:
            _close_quietly(conn)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> Socks5FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- facts

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("the proxy is not started")
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        """``socks5://127.0.0.1:PORT``, ready for ``ProxySettings(proxy_address=...)``."""
        return f"socks5://127.0.0.1:{self.port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._check_mode(value)
        with self._lock:
            self._mode = value

    @property
    def requests(self) -> list[Destination]:
        """Every CONNECT destination asked of this proxy, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted so far."""
        with self._lock:
            return self._connections

    @property
    def open_connections(self) -> int:
        """How many connections the proxy still holds open (silent and stalled ones)."""
        with self._lock:
            return len(self._open)

    def wait_for_connections(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least `count` connections were accepted; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._connections >= count, timeout)

    def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block until at least `count` CONNECT requests were recorded; False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: len(self._requests) >= count, timeout)

    # ---------------------------------------------------------------- internals

    @staticmethod
    def _check_mode(mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed
            with self._lock:
                self._connections += 1
                self._open.add(conn)
                mode = self._mode
                thread = threading.Thread(
                    target=self._serve, args=(conn, mode), name=f"socks5-fault-{mode}", daemon=True
                )
                self._threads.add(thread)
                self._lock.notify_all()
            thread.start()

    def _serve(self, conn: socket.socket, mode: str) -> None:
        keep_open = False
        try:
            if mode == "silent":
                keep_open = True
                return
            conn.settimeout(_HANDSHAKE_TIMEOUT)
            self._greet(conn)
            destination = self._read_connect(conn)
            if destination is None:
                conn.sendall(_reply(REP_COMMAND_NOT_SUPPORTED))
                return
            with self._lock:
                self._requests.append(destination)
                self._lock.notify_all()
            if mode == "refuse":
                conn.sendall(_reply(self.refuse_code))
            elif mode == "close":
                conn.sendall(_reply(REP_SUCCEEDED))
            elif mode == "stall":
                keep_open = True
        except (_ClientGone, OSError):
            pass
        finally:
            if keep_open:
                self._hold(conn)
            else:
                self._release(conn)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _greet(self, conn: socket.socket) -> None:
        version, count = _recv_exact(conn, 2)
        if version != _VERSION:
            raise _ClientGone("not SOCKS5")
        methods = _recv_exact(conn, count)
        if _NO_AUTH not in methods:
            conn.sendall(bytes([_VERSION, _NO_ACCEPTABLE_METHOD]))
            raise _ClientGone("no acceptable authentication method")
        conn.sendall(bytes([_VERSION, _NO_AUTH]))

    @staticmethod
    def _read_connect(conn: socket.socket) -> Destination | None:
        version, command, _reserved, atyp = _recv_exact(conn, 4)
        if version != _VERSION:
            raise _ClientGone("not SOCKS5")
        if atyp == _ATYP_IPV4:
            host = str(ipaddress.IPv4Address(_recv_exact(conn, 4)))
        elif atyp == _ATYP_IPV6:
            host = str(ipaddress.IPv6Address(_recv_exact(conn, 16)))
        elif atyp == _ATYP_DOMAIN:
            (length,) = _recv_exact(conn, 1)
            host = _recv_exact(conn, length).decode("ascii", "replace")
        else:
            raise _ClientGone("bad address type")
        (port,) = struct.unpack("!H", _recv_exact(conn, 2))
        if command != _CMD_CONNECT:
            return None
        return Destination(host, port)

    def _hold(self, conn: socket.socket) -> None:
        """Keep a silent/stalled connection open, unanswered, until the client or stop() ends it."""
        conn.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                if not conn.recv(65536):
                    break  # the client gave up
            except TimeoutError:
                continue
            except OSError:
                break
        self._release(conn)

    def _release(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.discard(conn)
        _close_quietly(conn)


class ClosedPort:
    """A 127.0.0.1 port that refuses TCP connections (bound, never listening), held until closed.

    Holding the bound socket keeps the port from being reused by anyone else meanwhile, so the
    refusal is reliable, unlike "bind, read the port, close".
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ClosedPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reply(code: int) -> bytes:
    # VER REP RSV ATYP=IPv4 BND.ADDR=0.0.0.0 BND.PORT=0
    return bytes([_VERSION, code, 0x00, _ATYP_IPV4, 0, 0, 0, 0, 0, 0])


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
    while len(data) < size:
        if time.monotonic() > deadline:
            raise _ClientGone("handshake timed out")
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise _ClientGone("client closed")
        data += chunk
    return data


def _close_quietly(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()

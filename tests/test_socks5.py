"""The fault-injecting SOCKS5 sink, driven with plain sockets."""

from __future__ import annotations

import socket
import struct

import pytest

from whatsappd.testing.socks5 import (
    REP_CONNECTION_REFUSED,
    REP_SUCCEEDED,
    ClosedPort,
    Destination,
    Socks5FaultProxy,
)


def _connect(proxy: Socks5FaultProxy) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
    sock.settimeout(2)
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {size} bytes")
        data += chunk
    return data


def _greet(sock: socket.socket) -> bytes:
    sock.sendall(b"\x05\x01\x00")
    return _recv_exact(sock, 2)


def _connect_domain(sock: socket.socket, host: str, port: int) -> None:
    raw = host.encode()
    sock.sendall(b"\x05\x01\x00\x03" + bytes([len(raw)]) + raw + struct.pack("!H", port))


def _assert_eof(sock: socket.socket) -> None:
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def test_url_and_port() -> None:
    """The listener binds 127.0.0.1 on a free port, names itself as a socks5:// URL and starts silent."""
    with Socks5FaultProxy() as proxy:
        assert proxy.url == f"socks5://127.0.0.1:{proxy.port}"
        assert proxy.port > 0
        assert proxy.mode == "silent"


def test_unknown_mode_is_rejected() -> None:
    """A fault mode it does not know is refused, at construction and when set later."""
    with pytest.raises(ValueError):
        Socks5FaultProxy(mode="forward")
    with Socks5FaultProxy() as proxy, pytest.raises(ValueError):
        proxy.mode = "forward"


def test_refuse_answers_connect_with_a_failure_and_records_it() -> None:
    """In refuse mode a CONNECT gets "connection refused", is recorded, and the connection closes."""
    with Socks5FaultProxy(mode="refuse") as proxy, _connect(proxy) as sock:
        assert _greet(sock) == b"\x05\x00"
        _connect_domain(sock, "web.whatsapp.com", 443)
        reply = _recv_exact(sock, 10)
        assert reply[0] == 5
        assert reply[1] == REP_CONNECTION_REFUSED
        _assert_eof(sock)
        assert proxy.wait_for_requests(1)
        assert proxy.requests == [("web.whatsapp.com", 443)]
        assert proxy.requests == [Destination("web.whatsapp.com", 443)]
        assert proxy.connections == 1


def test_close_completes_the_handshake_then_closes() -> None:
    """In close mode the CONNECT succeeds, then the connection closes before any TLS."""
    with Socks5FaultProxy(mode="close") as proxy, _connect(proxy) as sock:
        assert _greet(sock) == b"\x05\x00"
        _connect_domain(sock, "web.whatsapp.com", 443)
        reply = _recv_exact(sock, 10)
        assert reply[1] == REP_SUCCEEDED
        try:
            sock.sendall(b"\x16\x03\x01 client hello")  # what a TLS client would send next
        except OSError:
            pass
        _assert_eof(sock)
        assert proxy.requests == [("web.whatsapp.com", 443)]


def test_silent_never_answers_and_records_only_the_connection() -> None:
    """In silent mode nothing is answered, not even the greeting; only the connection is counted."""
    with Socks5FaultProxy(mode="silent") as proxy, _connect(proxy) as sock:
        sock.sendall(b"\x05\x01\x00")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert proxy.wait_for_connections(1)
        assert proxy.connections == 1
        assert proxy.requests == []
        assert proxy.open_connections == 1


def test_stall_records_the_request_and_never_replies() -> None:
    """In stall mode the CONNECT is read and recorded but never answered."""
    with Socks5FaultProxy(mode="stall") as proxy, _connect(proxy) as sock:
        assert _greet(sock) == b"\x05\x00"
        _connect_domain(sock, "example.invalid", 5222)
        assert proxy.wait_for_requests(1)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert proxy.requests == [("example.invalid", 5222)]


def test_records_ipv4_and_ipv6_destinations() -> None:
    """CONNECT requests by IPv4 and IPv6 address are recorded as such (nothing is dialled)."""
    with Socks5FaultProxy(mode="refuse") as proxy:
        with _connect(proxy) as sock:
            _greet(sock)
            sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("192.0.2.7") + struct.pack("!H", 443))
            _recv_exact(sock, 10)
        with _connect(proxy) as sock:
            _greet(sock)
            sock.sendall(b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack("!H", 80))
            _recv_exact(sock, 10)
        assert proxy.wait_for_requests(2)
        assert proxy.requests == [("192.0.2.7", 443), ("2001:db8::1", 80)]


def test_refuses_clients_that_offer_no_unauthenticated_method() -> None:
    """A client that offers only username/password authentication is refused at the greeting."""
    with Socks5FaultProxy(mode="refuse") as proxy, _connect(proxy) as sock:
        sock.sendall(b"\x05\x01\x02")  # username/password only
        assert _recv_exact(sock, 2) == b"\x05\xff"
        _assert_eof(sock)
        assert proxy.requests == []


def test_mode_changes_at_run_time() -> None:
    """A new mode applies to new connections; a connection already held keeps its own."""
    with Socks5FaultProxy(mode="silent") as proxy:
        with _connect(proxy) as silent:
            assert proxy.wait_for_connections(1)
            proxy.mode = "refuse"
            with _connect(proxy) as refused:
                assert _greet(refused) == b"\x05\x00"
                _connect_domain(refused, "web.whatsapp.com", 443)
                assert _recv_exact(refused, 10)[1] == REP_CONNECTION_REFUSED
            silent.settimeout(0.3)
            with pytest.raises(TimeoutError):  # the earlier connection keeps its mode
                silent.recv(1)
        assert proxy.connections == 2


def test_stop_closes_held_connections() -> None:
    """stop() closes every connection it holds open."""
    proxy = Socks5FaultProxy(mode="silent").start()
    sock = _connect(proxy)
    try:
        assert proxy.wait_for_connections(1)
        proxy.stop()
        _assert_eof(sock)
        assert proxy.open_connections == 0
    finally:
        sock.close()
        proxy.stop()


def test_closed_port_refuses_tcp() -> None:
    """ClosedPort names a 127.0.0.1 port on which nothing listens, so a dial is refused at once."""
    with ClosedPort() as closed:
        assert closed.url == f"socks5://127.0.0.1:{closed.port}"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", closed.port), timeout=2)

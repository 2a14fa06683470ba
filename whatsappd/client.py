"""A small synchronous client for the control API (HTTP/1.1 over the Unix socket).

Used by whatsappctl and by the tests; stdlib only, so whatsappctl starts fast.
"""

from __future__ import annotations

import grp
import http.client
import json
import os
import pwd
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["Client", "DaemonUnavailable", "Response", "StreamRefused"]


class DaemonUnavailable(Exception):
    """Nothing answers on the socket. The message says which socket and what to do."""


class StreamRefused(Exception):
    """The daemon answered a stream request with an error instead of a stream."""

    def __init__(self, response: Response) -> None:
        super().__init__(f"HTTP {response.status}")
        self.response = response


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _gatekeeper_group(path: Path) -> str:
    """The group whose members get through to path: the socket's own group if this user may see
    the socket, else that of the directory on the way this user may not search."""
    for candidate in (path, *path.parents):
        try:
            gid = os.stat(candidate).st_gid
        except OSError:
            continue
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)
    return "whatsappd"


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return str(os.getuid())


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Client:
    def __init__(self, socket_path: str, timeout: float | None = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    def _connect(self, method: str, path: str, body: Any, headers: dict[str, str] | None) -> _UnixHTTPConnection:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        data: bytes | None = None
        all_headers = {"Accept": "application/json", **(headers or {})}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=all_headers)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            why = "no socket file there" if isinstance(exc, FileNotFoundError) else "connection refused"
            raise DaemonUnavailable(
                f"the daemon is not running: nothing answers on {self.socket_path} ({why}). Start it "
                "(systemctl start whatsappd, or whatsappd run) or point --socket at its socket"
            ) from None
        except PermissionError:
            conn.close()
            group = _gatekeeper_group(Path(self.socket_path))
            raise DaemonUnavailable(
                f"permission denied on {self.socket_path}: add yourself to group {group} "
                f"(usermod -aG {group} {_user_name()}, then log in again) or run as root"
            ) from None
        except (BrokenPipeError, ConnectionResetError):
            # The daemon answered and closed before reading the request (its 503 at the
            # connection cap does that): that answer is still there for getresponse() to read.
            pass
        return conn

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
        conn = self._connect(method, path, body, headers)
        try:
            resp = conn.getresponse()
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body=body, **kw)

    def download(self, method: str, path: str, sink: IO[bytes]) -> Response:
        """Send a request and copy a 200 answer's body into sink as it arrives (the returned
        Response's body is then empty); any other answer is returned whole."""
        conn = self._connect(method, path, None, None)
        try:
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.status != 200:
                return Response(resp.status, headers, resp.read())
            while chunk := resp.read(256 * 1024):
                sink.write(chunk)
            return Response(resp.status, headers, b"")
        finally:
            conn.close()

    def stream_lines(self, path: str) -> Iterator[bytes]:
        """GET a newline-delimited stream; yields each line without its newline."""
        conn = self._connect("GET", path, None, None)
        try:
            resp = conn.getresponse()
            if resp.status != 200:
                raise StreamRefused(Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()))
            while line := resp.readline():
                yield line.rstrip(b"\n")
        finally:
            conn.close()

"""Test helpers for the messaging API: event stream readers and a keep-alive API session.

First-class test code like `whatsappd.testing.daemon`: real sockets to a real daemon, nothing
of ours faked. Used by the outbox, event and crash tests.

- `EventReader` follows `GET /v1/events` in a background thread and keeps every line with the
  time it arrived (for latency and gap/duplicate checks).
- `StalledReader` asks for the stream and then never reads a byte: the reader the daemon must
  never wait for.
- `ApiSession` sends many requests over one keep-alive connection (queueing 1,000 messages
  one by one, in a known order, takes well under a second).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from whatsappd.client import Response, _UnixHTTPConnection

__all__ = ["ApiSession", "EventReader", "StalledReader", "StreamLine", "message_statuses", "wait_message"]


class StreamLine(dict[str, Any]):
    """One parsed stream line; `.arrived` is the monotonic time the reader got it, `.arrived_wall`
    the wall-clock time (comparable with an event's `at`)."""

    arrived: float = 0.0
    arrived_wall: float = 0.0


class EventReader:
    """`GET /v1/events?{query}` read line by line in a thread.

    If the daemon answers with an error instead of a stream, `status` and `error` say so and no
    thread runs. `delay` makes a slow reader: it sleeps that long before each line it reads;
    `paused=True` one that reads nothing until `resume()`.
    """

    def __init__(self, socket_path: str, query: str = "", delay: float = 0.0, timeout: float = 60.0,
                 paused: bool = False) -> None:
        self.path = "/v1/events" + (f"?{query}" if query else "")
        self.delay = delay
        self._go = threading.Event()
        if not paused:
            self._go.set()
        self.lines: list[StreamLine] = []
        self.ended = threading.Event()  # EOF (the daemon closed the stream) or a read error
        self.failure: BaseException | None = None
        self._cond = threading.Condition()
        self._conn = _UnixHTTPConnection(str(socket_path), timeout)
        self._conn.request("GET", self.path, headers={"Accept": "application/x-ndjson"})
        self._resp = self._conn.getresponse()
        self.status = self._resp.status
        self.headers = {k.lower(): v for k, v in self._resp.getheaders()}
        self.error: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        if self.status != 200:
            self.error = json.loads(self._resp.read())["error"]
            self._conn.close()
            self.ended.set()
            return
        self._thread = threading.Thread(target=self._read, name="event-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                self._go.wait()
                if self.delay:
                    time.sleep(self.delay)
                raw = self._resp.readline()
                if not raw:
                    break
                line = StreamLine(json.loads(raw))
                line.arrived, line.arrived_wall = time.monotonic(), time.time()
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 (close() from another thread breaks http.client oddly)
            if not self._closing:
                self.failure = exc
        finally:
            self.ended.set()
            with self._cond:
                self._cond.notify_all()

    def resume(self) -> None:
        """Start reading (a reader made with paused=True)."""
        self._go.set()

    # ------------------------------------------------------------------------------ reading

    def events(self) -> list[StreamLine]:
        """The journal events read so far (lines with a seq), in order."""
        with self._cond:
            return [line for line in self.lines if "seq" in line]

    def seqs(self) -> list[int]:
        return [int(line["seq"]) for line in self.events()]

    def of_type(self, type_: str) -> list[StreamLine]:
        with self._cond:
            return [line for line in self.lines if line.get("type") == type_]

    def wait_for(self, predicate: Callable[[StreamLine], bool], timeout: float = 10.0,
                 what: str = "") -> StreamLine:
        """The first line (read so far or later) for which predicate holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            checked = 0
            while True:
                for line in self.lines[checked:]:
                    if predicate(line):
                        return line
                checked = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.ended.is_set() and checked == len(self.lines)):
                    state = "the stream ended" if self.ended.is_set() else f"timed out after {timeout}s"
                    raise TimeoutError(f"{state} waiting for {what or predicate} on {self.path}; "
                                       f"last lines: {self.lines[-5:]}")
                self._cond.wait(min(remaining, 0.5))

    def wait_count(self, n: int, timeout: float = 10.0, type_: str | None = None) -> list[StreamLine]:
        """Wait until at least n events (of type_, if given) were read; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.events() if type_ is None else self.of_type(type_)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline or (self.ended.is_set() and len(got) < n):
                raise TimeoutError(f"read {len(got)} of {n} events of {type_ or 'any type'} on {self.path}"
                                   f"{' (the stream ended)' if self.ended.is_set() else ''}; "
                                   f"last lines: {self.lines[-3:]}")
            with self._cond:
                self._cond.wait(0.2)

    def close(self) -> None:
        """Hang up (the daemon notices on its next write)."""
        self._closing = True
        self._go.set()
        sock = self._conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conn.close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> EventReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StalledReader:
    """Asks for the event stream, then never reads: its socket buffers fill and stay full."""

    def __init__(self, socket_path: str, query: str = "") -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The smallest receive buffer the kernel allows: the daemon's writes back up quickly.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
        self.sock.connect(str(socket_path))
        path = "/v1/events" + (f"?{query}" if query else "")
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StalledReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ApiSession:
    """Many requests over one keep-alive connection (reconnecting if the daemon closed it)."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._conn: _UnixHTTPConnection | None = None

    def request(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            all_headers["Content-Type"] = "application/json"
        while True:
            reused = self._conn is not None
            if self._conn is None:
                self._conn = _UnixHTTPConnection(self.socket_path, self.timeout)
            try:
                self._conn.request(method, path, body=data, headers=all_headers)
                resp = self._conn.getresponse()
                out = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()
                if not reused:
                    raise
                continue  # the daemon closed an idle keep-alive connection: once more on a new one
            if out.headers.get("connection", "").lower() == "close":
                self.close()
            return out

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Response:
        return self.request("POST", path, body, headers)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ApiSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def message_statuses(socket_path: str, company: str, message_id: str, final: str,
                     timeout: float = 10.0) -> list[str]:
    """The statuses a message went through, from its message.status events in the journal, up to
    and including the first `final` one (waiting for it)."""
    query = f"since=0&company={company}&type=message.status"
    with EventReader(socket_path, query) as reader:
        if reader.error is not None:
            raise AssertionError(f"the stream was refused: {reader.status} {reader.error}")
        reader.wait_for(lambda line: line.get("message_id") == message_id and line.get("status") == final,
                        timeout, what=f"{message_id} to be {final}")
        return [str(e["status"]) for e in reader.events() if e.get("message_id") == message_id]


def wait_message(socket_path: str, company: str, message_id: str, *statuses: str,
                 timeout: float = 10.0) -> dict[str, Any]:
    """Poll GET .../messages/{id} until its status is one of statuses; return the message."""
    path = f"/v1/companies/{company}/messages/{message_id}"
    seen: list[Any] = []
    deadline = time.monotonic() + timeout
    with ApiSession(socket_path) as api:
        while True:
            response = api.get(path)
            body = response.json()
            seen[:] = [body]
            if response.status == 200 and body["status"] in statuses:
                return dict(body)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message_id} did not become {'/'.join(statuses)} within {timeout}s; "
                                   f"last: {body}")
            time.sleep(0.02)

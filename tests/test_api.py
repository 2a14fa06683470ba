"""The control API over a real daemon's Unix socket: errors, limits, peer checks, OpenAPI."""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd import __version__
from whatsappd.config import build_config
from whatsappd.control.app import Services, build_app
from whatsappd.control.openapi import openapi_document
from whatsappd.daemon import Daemon
from whatsappd.errors import CODES
from whatsappd.testing.daemon import DaemonProcess, clean_env, wait_until
from whatsappd.testing.metrics import metric_value

COMPANY = '[[companies]]\nid = "acme"\nname = "ACME"\nengine = "simulator"\n'
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture
def small(daemon_factory: Callable[..., DaemonProcess]) -> Iterator[DaemonProcess]:
    """A daemon with a 1 KiB body limit, debug logging and one company."""
    daemon = daemon_factory('[control]\nmax_body_size = "1KiB"\n[logging]\nlevel = "debug"\n' + COMPANY).start()
    yield daemon
    assert daemon.stop() == 0


def _raw(path: Path, request: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; return (status, headers, body) of the answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return int(lines[0].split()[1]), headers, body


def _error(body: bytes) -> dict[str, Any]:
    """The error object of a JSON error body, checked for the documented shape."""
    document = json.loads(body)
    assert set(document) == {"error"}
    error = document["error"]
    assert error["code"] in CODES and isinstance(error["message"], str) and error["message"]
    return error


# ---------------------------------------------------------------------------------------------
# Errors and limits.


def test_oversized_body_gets_413(small: DaemonProcess) -> None:
    """A body over control.max_body_size is answered 413 body_too_large, and nothing is reloaded."""
    response = small.client.post("/v1/reload", body=b"{" + b" " * 2000 + b"}")
    assert response.status == 413
    assert response.headers["content-type"].startswith("application/json")
    error = _error(response.body)
    assert error["code"] == "body_too_large" and "control.max_body_size (1024 bytes)" in error["message"]
    assert small.client.get("/v1/health").json()["config"]["last_reload"] is None


def test_oversized_chunked_body_gets_413(small: DaemonProcess) -> None:
    """A chunked body (no Content-Length) over the limit is cut off with 413 as well."""
    chunk = b"x" * 500
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    status, headers, body = _raw(small.socket_path, b"POST /v1/reload HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
    assert status == 413 and _error(body)["code"] == "body_too_large"


def test_oversized_body_on_a_route_that_reads_none_gets_413(small: DaemonProcess) -> None:
    """The limit holds even for handlers that never read the body (GET with a body)."""
    response = small.client.request("GET", "/v1/health", body=b"x" * 4096)
    assert response.status == 413 and _error(response.body)["code"] == "body_too_large"


def test_body_at_the_limit_is_accepted(small: DaemonProcess) -> None:
    """Exactly max_body_size bytes is still fine."""
    body = b"{}" + b" " * 1022
    assert len(body) == 1024
    response = small.client.post("/v1/reload", body=body)
    assert response.status == 200, response.body


@pytest.mark.parametrize("path", ["/v1/nope", "/", "/v2/health", "/v1/health/extra"])
def test_unknown_route_gets_404_json(small: DaemonProcess, path: str) -> None:
    """Unknown paths get 404 not_found as JSON, pointing at the OpenAPI document."""
    response = small.client.get(path)
    assert response.status == 404
    error = _error(response.body)
    assert error["code"] == "not_found"
    assert error["message"] == f"no such route: GET {path}; see GET /v1/openapi.json"


def test_wrong_method_gets_405_json_with_allow(small: DaemonProcess) -> None:
    """A known path with a method it lacks: 405 method_not_allowed, with an Allow header."""
    response = small.client.request("DELETE", "/v1/health")
    assert response.status == 405
    assert _error(response.body)["code"] == "method_not_allowed"
    assert set(response.headers["allow"].split(",")) == {"GET", "HEAD"}
    response = small.client.get("/v1/reload")
    assert response.status == 405 and response.headers["allow"] == "POST"


def test_invalid_json_body_gets_400(small: DaemonProcess) -> None:
    """A malformed JSON body on /v1/reload is refused with 400 invalid_json, and nothing is reloaded."""
    response = small.client.post("/v1/reload", body=b'{"force": tru')
    assert response.status == 400
    error = _error(response.body)
    assert error["code"] == "invalid_json" and error["message"].startswith("the body is not valid JSON")
    assert small.client.get("/v1/health").json()["config"]["last_reload"] is None


def test_form_body_gets_415(small: DaemonProcess) -> None:
    """A multipart form body where JSON is expected is refused with 415 unsupported_media_type."""
    response = small.client.post("/v1/reload", body=b"--b\r\n\r\nx\r\n--b--\r\n",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.status == 415 and _error(response.body)["code"] == "unsupported_media_type"


_JSON_ROUTES = [("POST", "/v1/reload"), ("PUT", "/v1/companies/acme"), ("POST", "/v1/companies/acme/pair-code"),
                ("POST", "/v1/companies/acme/simulate"), ("POST", "/v1/companies/acme/messages")]


@pytest.fixture
def roomy(daemon_factory: Callable[..., DaemonProcess]) -> Iterator[DaemonProcess]:
    """A daemon with the default 16 MiB body limit and one simulator company."""
    daemon = daemon_factory(COMPANY).start()
    yield daemon
    assert daemon.stop() == 0


@pytest.mark.parametrize(("method", "path"), _JSON_ROUTES)
def test_deeply_nested_json_gets_400_on_every_json_route(roomy: DaemonProcess, method: str, path: str) -> None:
    """A 200 KB run of "[" (under the body limit) and a 40-level object are 400 invalid_json, never a 500."""
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 40 + b"1" + b"}" * 40):
        response = roomy.client.request(method, path, body=body)
        assert response.status == 400, response.body
        error = _error(response.body)
        assert error["code"] == "invalid_json" and error["message"] == "the body nests deeper than 32 levels"
    assert not [e for e in roomy.log_events() if e["level"] == "error"]


def test_json_constants_that_are_not_numbers_get_400(roomy: DaemonProcess) -> None:
    """NaN and Infinity are not JSON: 400 invalid_json, whatever field they stand in."""
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        response = roomy.client.post("/v1/companies/acme/messages",
                                     body=b'{"to": "+5511999999999", "text": "hi", "ttl": %s}' % constant)
        assert response.status == 400 and _error(response.body)["code"] == "invalid_json", response.body


@pytest.mark.parametrize("ttl", [True, False, [60], {"s": 60}, None])
def test_ttl_must_be_a_duration_or_a_number_not_a_boolean(roomy: DaemonProcess, ttl: Any) -> None:
    """"ttl": true is not 1 s: anything but a duration string or a number is 400 invalid_message, nothing queued."""
    response = roomy.client.post("/v1/companies/acme/messages", body={"to": "+5511999999999", "text": "hi", "ttl": ttl})
    assert response.status == 400, response.body
    error = _error(response.body)
    assert error["code"] == "invalid_message" and error["message"].startswith("ttl must be a duration")
    assert metric_value(roomy.client.get("/v1/metrics").body.decode(), "whatsappd_outbox_messages", status="queued") == 0
    accepted = roomy.client.post("/v1/companies/acme/messages", body={"to": "+5511999999999", "text": "hi", "ttl": 60})
    assert accepted.status == 202 and accepted.json()["expires_at"]


_MALFORMED = {
    "bare CR in a header": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
    "Content-Length with chunked": b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "a 20 KB header": b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "not HTTP at all": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
}


@pytest.mark.parametrize("request_bytes", list(_MALFORMED.values()), ids=list(_MALFORMED))
def test_malformed_http_gets_a_json_400_and_one_warning(small: DaemonProcess, request_bytes: bytes) -> None:
    """What aiohttp cannot parse is answered 400 bad_request as JSON, logged once at warning with the peer, no traceback."""
    status, headers, body = _raw(small.socket_path, request_bytes)
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = _error(body)
    assert error["code"] == "bad_request" and error["message"].startswith("the request is not valid HTTP/1.1: ")
    assert small.client.get("/v1/health").status == 200

    def refused() -> list[dict[str, Any]]:
        return [e for e in small.log_events() if e["event"] == "malformed HTTP request refused"]

    (line,) = wait_until(refused, timeout=5, what="the warning line")
    assert line["level"] == "warning" and line["reason"] in error["message"]
    assert line["peer_uid"] == os.getuid() and line["peer_pid"] == os.getpid()
    assert not [e for e in small.log_events() if e["level"] == "error" or "exception" in e]


def test_health_fields(small: DaemonProcess) -> None:
    """GET /v1/health: status, version, pid, start time, uptime, socket, config source, counts."""
    first = small.client.get("/v1/health")
    assert first.status == 200 and first.headers["content-type"].startswith("application/json")
    body = first.json()
    assert body["status"] == "ok"
    assert body["version"] == __version__
    assert body["pid"] == small.pid
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["started_at"])
    assert body["socket"] == str(small.socket_path)
    assert body["config"] == {"source": str(small.config_path), "last_reload": None}
    assert body["companies"] == {"total": 1, "by_state": {"stopped": 1}}
    time.sleep(0.05)
    assert small.client.get("/v1/health").json()["uptime_seconds"] > body["uptime_seconds"] >= 0


def test_list_companies(small: DaemonProcess) -> None:
    """GET /v1/companies lists every configured company with its state and since."""
    (company,) = small.client.get("/v1/companies").json()["companies"]
    assert company["id"] == "acme" and company["name"] == "ACME" and company["engine"] == "simulator"
    assert company["state"] == "stopped"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", company["since"])


def test_request_log_line_carries_peer_credentials(small: DaemonProcess) -> None:
    """At debug every request is logged with the peer's uid and pid from SO_PEERCRED."""
    small.client.get("/v1/companies")

    def line() -> dict[str, Any] | None:
        return next((e for e in small.log_events() if e["event"] == "request" and e["path"] == "/v1/companies"), None)

    entry = wait_until(line, timeout=5, what="the request log line")
    assert entry["level"] == "debug" and entry["method"] == "GET" and entry["status"] == 200
    assert entry["peer_uid"] == os.getuid() and entry["peer_pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# Who may talk to the daemon (SO_PEERCRED), with a client running as a second user.

_CLIENT = """
import json, sys
from whatsappd.client import Client
r = Client(sys.argv[1], timeout=10).get("/v1/health")
print(json.dumps({"status": r.status, "body": r.json()}))
"""


def _as_second_user(second_user: Callable[..., Any], sock: Path, gid: int = 65534) -> dict[str, Any]:
    prefix, popen = second_user(gid)
    result = subprocess.run([*prefix, sys.executable, "-c", _CLIENT, str(sock)], env=clean_env(),
                            capture_output=True, text=True, timeout=30, cwd="/", **popen)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.root
def test_uid_not_in_allowed_uids_gets_403(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """With allowed_uids = [12345] on a 0666 socket, uid 65534 gets 403 forbidden; root still gets 200."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory('[control]\nsocket_mode = "0666"\nallowed_uids = [12345]\n', socket_path=sock).start()
    answer = _as_second_user(second_user, sock)
    assert answer["status"] == 403
    error = answer["body"]["error"]
    assert error["code"] == "forbidden"
    assert error["message"].startswith("uid 65534 may not use this API; add it to control.allowed_uids")
    assert daemon.client.get("/v1/health").status == 200  # root (and the daemon's own user) always may
    refused = next(e for e in daemon.log_events() if e["event"] == "request refused: peer not allowed")
    assert refused["peer_uid"] == 65534 and refused["level"] == "warning"
    assert daemon.stop() == 0


@pytest.mark.root
def test_allowed_uid_and_open_socket_let_the_second_user_in(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """The same client is answered 200 once its uid is listed (and with no list, the socket mode decides)."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory('[control]\nsocket_mode = "0666"\nallowed_uids = [12345, 65534]\n',
                            socket_path=sock).start()
    assert _as_second_user(second_user, sock)["status"] == 200
    assert daemon.stop() == 0
    open_daemon = daemon_factory('[control]\nsocket_mode = "0666"\n', socket_path=sock).start()
    assert _as_second_user(second_user, sock)["status"] == 200
    assert open_daemon.stop() == 0


@pytest.mark.root
def test_allowed_groups_membership_grants_access(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """allowed_groups admits a peer whose group is listed, and only that one."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory('[control]\nsocket_mode = "0666"\nallowed_uids = [12345]\nallowed_groups = [4242]\n',
                            socket_path=sock).start()
    assert _as_second_user(second_user, sock, gid=4242)["status"] == 200
    assert _as_second_user(second_user, sock, gid=65534)["status"] == 403
    assert daemon.stop() == 0


@pytest.mark.root
def test_socket_mode_keeps_other_users_out(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """With the default 0660 root-owned socket, another user cannot even connect."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory("", socket_path=sock).start()
    prefix, popen = second_user()
    result = subprocess.run([*prefix, sys.executable, "-c", _CLIENT, str(sock)], env=clean_env(),
                            capture_output=True, text=True, timeout=30, cwd="/", **popen)
    assert result.returncode != 0 and f"permission denied on {sock}" in result.stderr
    assert daemon.stop() == 0


# A client running as the second user that opens `count` connections and holds them: "idle"
# sends nothing; "request" sends one keep-alive request on each and reports the status line.
# It prints those status lines, waits for a line on stdin, then (idle) reads each connection to
# its end and prints what came, or (request) just closes them.
_HOG = """
import json, socket, sys
path, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(count):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    held.append(sock)
firsts = []
if mode == "request":
    for sock in held:
        sock.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        firsts.append(sock.recv(12).decode())
print(json.dumps(firsts), flush=True)
sys.stdin.readline()
answers = []
for sock in held:
    data = b""
    while mode == "idle" and (chunk := sock.recv(65536)):
        data += chunk
    answers.append(data.decode("latin-1"))
    sock.close()
print(json.dumps(answers), flush=True)
"""


class _Hog:
    """_HOG running as uid 65534 against the socket at sock."""

    def __init__(self, second_user: Callable[..., Any], sock: Path, count: int, mode: str) -> None:
        prefix, popen = second_user()
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", _HOG, str(sock), str(count), mode],
                                     env=clean_env(), cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, **popen)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.firsts: list[str] = json.loads(self.stdout.readline() or "null")

    def release(self) -> list[str]:
        """Let go of the connections; what each one received until the daemon closed it (idle)."""
        self.stdin.write("\n")
        self.stdin.flush()
        answers: list[str] = json.loads(self.stdout.readline())
        assert self.proc.wait(30) == 0
        return answers

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stdin.close()
        self.stdout.close()


@pytest.mark.root
def test_a_refused_uid_holds_no_connection_slot(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """uid 65534, not allowed, holding twice max_connections idle connections locks nobody out: each gets 403, root 200."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory('[control]\nsocket_mode = "0666"\nallowed_uids = [12345]\nmax_connections = 3\n',
                            socket_path=sock).start()
    hog = _Hog(second_user, sock, 6, "idle")
    try:
        assert [daemon.client.get("/v1/health").status for _ in range(5)] == [200] * 5
        answers = hog.release()
    finally:
        hog.kill()
    assert len(answers) == 6
    for answer in answers:
        assert answer.startswith("HTTP/1.1 403 ") and "\r\nConnection: close\r\n" in answer, answer
        assert _error(answer.partition("\r\n\r\n")[2].encode())["code"] == "forbidden"
    refused = [e for e in daemon.log_events() if e["event"] == "request refused: peer not allowed"]
    assert len(refused) == 6 and {(e["peer_uid"], e["level"]) for e in refused} == {(65534, "warning")}
    assert daemon.stop() == 0


@pytest.mark.root
def test_one_uid_cannot_take_every_connection_slot(
    daemon_factory: Callable[..., DaemonProcess], shared_dir: Path, second_user: Callable[..., Any]
) -> None:
    """With max_connections_per_uid = 2 of 4, uid 65534 gets 503 past its 2 held connections; root is still served."""
    sock = shared_dir / "run" / "control.sock"
    daemon = daemon_factory('[control]\nsocket_mode = "0666"\nmax_connections = 4\nmax_connections_per_uid = 2\n',
                            socket_path=sock).start()
    hog = _Hog(second_user, sock, 4, "request")
    try:
        assert hog.firsts == ["HTTP/1.1 200"] * 2 + ["HTTP/1.1 503"] * 2
        assert [daemon.client.get("/v1/health").status for _ in range(10)] == [200] * 10
        hog.release()
    finally:
        hog.kill()
    refused = [e for e in daemon.log_events() if e["event"] == "connection refused: too many open connections for one uid"]
    assert len(refused) == 2 and all(e["peer_uid"] == 65534 and e["limit"] == 2 for e in refused)
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------------------------
# Connections: the cap and the idle timeout.

_HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _hold(path: Path, count: int) -> list[socket.socket]:
    """`count` connections, each with one keep-alive request answered, so each surely counts on
    the server side. The daemon drops a closed connection from its count a few loop turns after
    the close, so an earlier client (the readiness probe) may still hold a slot: retry briefly."""
    deadline = time.monotonic() + 10
    while True:
        held = [_connect(path) for _ in range(count)]
        answers = []
        for sock in held:
            try:
                sock.sendall(_HEALTH)
            except BrokenPipeError:
                pass
            answers.append(_read_answer(sock))
        if all(a.startswith(b"HTTP/1.1 200 ") for a in answers):
            return held
        for sock in held:
            sock.close()
        assert time.monotonic() < deadline, answers
        time.sleep(0.1)


def _burst(path: Path, count: int) -> list[int]:
    """Connect `count` clients at once, then send each a request; the statuses, in order."""
    burst = [_connect(path) for _ in range(count)]
    try:
        statuses = []
        for sock in burst:
            try:
                sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            except BrokenPipeError:
                pass  # already refused and closed; its 503 is waiting to be read
            statuses.append(int(_read_answer(sock).split()[1]))
        return statuses
    finally:
        for sock in burst:
            sock.close()


def test_connection_over_the_cap_gets_503(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """With max_connections = 2 held open, a third connection gets 503 and is closed; a freed slot serves again."""
    daemon = daemon_factory("[control]\nmax_connections = 2\n").start()
    held = _hold(daemon.socket_path, 2)
    try:
        with _connect(daemon.socket_path) as third:
            answer = _read_answer(third)
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert b"\r\nRetry-After: 1\r\n" in answer
            assert _error(answer.partition(b"\r\n\r\n")[2])["code"] == "too_many_connections"
            assert third.recv(1) == b""  # closed by the daemon
        held.pop().close()
        wait_until(lambda: daemon.client.get("/v1/health").status == 200, timeout=5,
                   what="a connection slot to free up")
    finally:
        for sock in held:
            sock.close()
    assert any(e["event"] == "connection refused: too many open connections" and e["limit"] == 2
               for e in daemon.log_events())
    assert daemon.stop() == 0


def test_connection_cap_holds_for_a_burst(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Connections arriving together (accepted in one go) are counted too: 3 at once, cap 2, one 503."""
    daemon = daemon_factory("[control]\nmax_connections = 2\n").start()
    deadline = time.monotonic() + 10
    while (statuses := _burst(daemon.socket_path, 3)).count(200) < 2:  # an old connection still counted
        assert time.monotonic() < deadline, statuses
        time.sleep(0.1)
    assert sorted(statuses) == [200, 200, 503]
    assert daemon.stop() == 0


def test_idle_connection_is_closed(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """With idle_timeout = 1s, a connection that sends nothing (or nothing more) is closed by the daemon."""
    daemon = daemon_factory('[control]\nidle_timeout = "1s"\n').start()
    with _connect(daemon.socket_path) as silent, _connect(daemon.socket_path) as after_one:
        after_one.sendall(_HEALTH)
        assert _read_answer(after_one).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert silent.recv(1) == b""
        assert after_one.recv(1) == b""
        assert 0.5 <= time.monotonic() - started < 8
    assert daemon.stop() == 0


def test_stalled_body_is_cut_off_after_the_idle_timeout(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """A client that stops sending mid-body gets 408 request_timeout instead of holding its slot for ever."""
    daemon = daemon_factory('[control]\nidle_timeout = "1s"\n').start()
    started = time.monotonic()
    status, _, body = _raw(daemon.socket_path, b"POST /v1/reload HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{")
    assert 0.5 <= time.monotonic() - started < 8
    assert status == 408
    error = _error(body)
    assert error["code"] == "request_timeout" and "control.idle_timeout (1s)" in error["message"]
    assert daemon.client.get("/v1/health").json()["config"]["last_reload"] is None
    assert daemon.stop() == 0


def test_refused_clients_read_their_503_instead_of_a_broken_pipe(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """Over the cap, a client that writes its request only after the daemon refused it still reads the 503."""
    daemon = daemon_factory("[control]\nmax_connections = 1\n").start()
    held = _hold(daemon.socket_path, 1)
    refused = [_connect(daemon.socket_path) for _ in range(20)]
    try:
        time.sleep(0.3)  # the daemon has accepted and refused them all by now
        for sock in refused:
            sock.sendall(b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        answers = [_read_answer(sock) for sock in refused]
    finally:
        for sock in [*held, *refused]:
            sock.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert _error(answer.partition(b"\r\n\r\n")[2])["code"] == "too_many_connections"
    assert daemon.stop() == 0


def test_stalled_body_frees_its_slot_at_the_idle_timeout(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """After the 408 for a stalled body the connection closes at once (no 10 s of lingering), freeing its slot."""
    daemon = daemon_factory('[control]\nidle_timeout = "1s"\nmax_connections = 1\n').start()
    with _hold(daemon.socket_path, 1)[0] as stalled:
        stalled.sendall(b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 10\r\n\r\n{")
        assert _read_answer(stalled).startswith(b"HTTP/1.1 408 ")
        stalled.settimeout(3)
        assert stalled.recv(1) == b""  # closed by the daemon
    wait_until(lambda: daemon.client.get("/v1/health").status == 200, timeout=2, what="the freed slot")
    assert daemon.stop() == 0


# ---------------------------------------------------------------------------------------------
# OpenAPI: what is served is documented, what is documented is served.


def _served_routes() -> set[tuple[str, str]]:
    """(METHOD, path) of every route of the real application object (HEAD twins left out)."""
    config = build_config({"daemon": {"state_dir": "/nonexistent/state"},
                           "control": {"socket_path": "/nonexistent/control.sock"}}, "test")
    daemon = Daemon(config, None)
    app = build_app(Services(config=lambda: config, supervisor=daemon.supervisor, messaging=daemon.messaging,
                             store=daemon.store, health=daemon.health, reload=daemon.reload,
                             started_at=daemon.started_at, metrics=daemon.metrics,
                             webhooks=daemon.webhooks))
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        routes.add((route.method, info.get("path") or info.get("formatter")))
    return routes


def _documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in document["paths"].items()
            for method in item if method in HTTP_METHODS}


def test_every_served_route_is_documented_and_every_documented_route_is_served(small: DaemonProcess) -> None:
    """The router of the application and the served OpenAPI document list the same method+path pairs."""
    document = small.client.get("/v1/openapi.json").json()
    assert document == json.loads(json.dumps(openapi_document(__version__)))
    served, documented = _served_routes(), _documented_routes(document)
    assert served == documented, f"served only: {served - documented}; documented only: {documented - served}"


def test_documented_paths_answer_on_the_running_daemon(small: DaemonProcess) -> None:
    """Each documented path is live with exactly the documented methods (asked via 405 + Allow, no side effects)."""
    document = small.client.get("/v1/openapi.json").json()
    for path, item in document["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "acme", path)
        response = small.client.request("PATCH" if "patch" not in item else "TRACE", concrete)
        assert response.status == 405, (path, response.status, response.body)
        allowed = set(response.headers["allow"].split(",")) - {"HEAD"}
        assert allowed == {m.upper() for m in item if m in HTTP_METHODS}, path


def test_openapi_document_is_well_formed() -> None:
    """OpenAPI 3.1 shape: operation ids, described responses, declared path params, resolving $refs, codes."""
    document = openapi_document(__version__)
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] and document["info"]["version"] == __version__
    operation_ids = []
    for path, item in document["paths"].items():
        assert path.startswith("/v1/"), path
        path_params = set(re.findall(r"\{([^}]+)\}", path))
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            operation_ids.append(operation["operationId"])
            assert operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d|default", status), (method, path, status)
                assert response["description"], (method, path, status)
            declared = {p["name"] for p in [*item.get("parameters", []), *operation.get("parameters", [])]
                        if p["in"] == "path" and p.get("required") is True}
            assert declared == path_params, (method, path)
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    code_schema = document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    for code in CODES:
        assert re.fullmatch(code_schema["pattern"], code) and code in code_schema["description"], code


def test_openapi_document_passes_a_validator() -> None:
    """When openapi-spec-validator is installed, it accepts the document as OpenAPI 3.1."""
    validator = pytest.importorskip("openapi_spec_validator", reason="openapi-spec-validator is not installed")
    validator.validate(openapi_document(__version__))


# ---------------------------------------------------------------------------------------------
# The control package's place in the layout.


def test_the_control_package_never_imports_the_daemon() -> None:
    """No module of whatsappd/control imports whatsappd.daemon, even for typing: the routes get a Services."""
    package = Path(__file__).resolve().parent.parent / "whatsappd" / "control"
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {name}" for name in names if name == "whatsappd.daemon"]
    assert found == []

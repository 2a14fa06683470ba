"""The served OpenAPI document against the daemon itself: schemathesis, event lines, error codes.

schemathesis generates requests from the document (valid ones and invalid ones) and sends them
to a real daemon over its Unix socket; every answer must be documented (status, content type,
body schema, and the error code among those the operation lists).
"""

from __future__ import annotations

import ast
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis
import jsonschema
import pytest
import requests
import schemathesis
import urllib3
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from requests.adapters import HTTPAdapter
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from whatsappd import __version__
from whatsappd.control.openapi import SIMULATE_ACTIONS, openapi_document
from whatsappd.errors import CODES, ErrorCode
from whatsappd.store import EVENT_TYPES
from whatsappd.testing.daemon import DaemonProcess, wait_until

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# requests over the daemon's Unix socket (http://localhost/... reaches the socket).


class _UnixConnection(urllib3.connection.HTTPConnection):
    socket_path = ""

    def _new_conn(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        return sock


class _UnixAdapter(HTTPAdapter):
    def __init__(self, path: Path) -> None:
        self.path = str(path)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        connection = type("Connection", (_UnixConnection,), {"socket_path": self.path})
        pool = type("Pool", (urllib3.connectionpool.HTTPConnectionPool,), {"ConnectionCls": connection})
        self.poolmanager.pool_classes_by_scheme = {"http": pool}


def _session(path: Path) -> Any:
    session = requests.Session()
    session.mount("http://localhost", _UnixAdapter(path))
    return session


# ---------------------------------------------------------------------------------------------
# schemathesis against a running daemon.

_CONFIG = """
[outbox]
max_wait = "200ms"
[workers]
heartbeat_interval = "200ms"
heartbeat_timeout = "1s"
stop_grace = "1s"
[[companies]]
id = "acme"
engine = "simulator"
"""

# 400s a request the schema allows may still get: what JSON Schema cannot say. Any other 400
# for schema-valid data means the document allows what the daemon refuses.
_SEMANTIC = {
    "POST /v1/companies/{id}/messages": {
        "invalid_recipient",  # whether a number exists in its country's numbering plan
        "unreadable_file",  # whether a path lies in outbox.media_dirs, a setting
        "invalid_message",  # ttl within outbox.max_ttl, a setting
        "bad_request",  # timeout goes only with wait=sent
    },
    # a pacing duration or rate outside its range (JSON Schema has no ranges for duration strings)
    "PUT /v1/companies/{id}": {"bad_request"},
    "GET /v1/companies/{id}/contacts/{phone}": {"invalid_recipient"},  # the numbering plan again
    "POST /v1/companies/{id}/simulate": {"invalid_argument"},  # each action's arguments, checked by the simulator
}


def _positive_data_acceptance(ctx: Any, response: Any, case: Any) -> bool | None:
    """positive_data_acceptance, but for the refusals listed in _SEMANTIC."""
    if response.status_code == 400 and json.loads(response.content)["error"]["code"] in _SEMANTIC.get(
            case.operation.label, ()):
        return None
    result: bool | None = positive_data_acceptance(ctx, response, case)
    return result


_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
           response_headers_conformance, negative_data_rejection, missing_required_header, _positive_data_acceptance]
#: Operations that may end the company's session, explored last so the others meet it alive.
_LAST = ("POST /v1/companies/{id}/simulate", "POST /v1/companies/{id}/logout", "DELETE /v1/companies/{id}")
_EXAMPLES = 15  # per operation and mode: about 500 requests, well under a minute
#: Not explored: a generated webhook would make the daemon POST to a generated host (the network).
#: tests/test_webhooks.py checks its refusals and answers instead.
_NOT_EXPLORED = ("PUT /v1/webhooks/{id}",)


@pytest.fixture
def api(daemon_factory: Callable[..., DaemonProcess]) -> Iterator[tuple[DaemonProcess, Any]]:
    """A daemon with one simulator company, and a requests session on its socket."""
    daemon = daemon_factory(_CONFIG).start()
    session = _session(daemon.socket_path)
    yield daemon, session
    session.close()
    assert daemon.stop() == 0


def _explore(operation: Any, mode: Any, session: Any, failures: list[str]) -> None:
    """Send _EXAMPLES generated requests of one mode for operation; collect what fails."""
    streams = operation.path == "/v1/events"  # its 200 never ends: a read timeout means it started
    positive = mode is schemathesis.GenerationMode.POSITIVE

    @settings(max_examples=_EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), ours=st.booleans())
    def run(case: Any, ours: bool) -> None:
        if positive and ours and "id" in (case.path_parameters or {}):
            case.path_parameters["id"] = "acme"  # reach past company_not_found half of the time
        try:
            case.call_and_validate(session=session, checks=_CHECKS, timeout=(5, 0.5 if streams else 30))
        except requests.exceptions.ConnectionError as exc:
            if not (streams and "Read timed out" in str(exc)):
                failures.append(f"{operation.label} ({mode.value}): {exc}")
        except (AssertionError, FailureGroup) as exc:  # what schemathesis' checks found
            failures.append(f"{operation.label} ({mode.value}): {exc}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        pass  # no parameter to make invalid (a negative run of a parameterless operation)


@pytest.mark.slow
def test_schemathesis_finds_no_undocumented_answer(api: tuple[DaemonProcess, Any]) -> None:
    """Generated valid and invalid requests for every operation get only documented, conforming answers."""
    daemon, session = api
    schema = schemathesis.openapi.from_dict(session.get("http://localhost/v1/openapi.json").json())
    schema.config.update(base_url="http://localhost")
    failures: list[str] = []
    started = time.monotonic()
    operations = sorted((op for result in schema.get_all_operations() if (op := result.ok()).label not in _NOT_EXPLORED),
                        key=lambda op: _LAST.index(op.label) if op.label in _LAST else -1)
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _explore(operation, mode, session, failures)
    assert not failures, "\n\n".join(dict.fromkeys(failures))
    assert time.monotonic() - started < 120  # bounded: a hang shows here rather than as a timeout
    assert not [e for e in daemon.log_events() if e["level"] == "error"]


# ---------------------------------------------------------------------------------------------
# What the document says, checked against the code.


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method]
    return operation


def _codes(operation: dict[str, Any], status: str) -> list[str]:
    codes: list[str] = operation["responses"][status]["content"]["application/json"]["schema"]["allOf"][1][
        "properties"]["error"]["properties"]["code"]["enum"]
    return codes


def test_every_company_route_documents_invalid_company_id() -> None:
    """Each /v1/companies/{id}… operation lists 400 invalid_company_id (messages/{mid} and media/{id} lacked it)."""
    document = openapi_document(__version__)
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1/companies/{id}") and method != "parameters":
                assert "invalid_company_id" in _codes(operation, "400"), (method, path)
                assert method == "put" or "company_not_found" in _codes(operation, "404"), (method, path)


def test_request_schemas_refuse_empty_strings_the_daemon_refuses() -> None:
    """"" is not a valid phone (pair-code), proxy (PUT company) or recipient (messages) in the document."""
    document = openapi_document(__version__)
    schemas = document["components"]["schemas"]

    def valid(schema: dict[str, Any], value: Any) -> bool:
        return bool(jsonschema.Draft202012Validator({**schema, "components": document["components"]}).is_valid(value))

    pair = _operation(document, "post", "/v1/companies/{id}/pair-code")["requestBody"]["content"]["application/json"]
    assert not valid(pair["schema"], {"phone": ""}) and valid(pair["schema"], {"phone": "+55 (11) 99999-9999"})
    assert not valid(schemas["CompanyInput"], {"proxy": ""})
    assert valid(schemas["CompanyInput"], {"proxy": "socks5://127.0.0.1:1080"})
    assert not valid(schemas["MessageInput"], {"to": "", "text": "hi"})
    assert not valid(schemas["MessageInput"], {"to": "+5511999999999", "text": "hi", "ttl": True})


def test_documented_simulate_actions_are_the_simulators() -> None:
    """The simulate action enum is exactly what the simulator engine does (receipt, incoming, stats, burst were missing)."""
    from whatsappd.worker.simulator.engine import MAX_BURST, SimulatorEngine

    document = openapi_document(__version__)
    body = _operation(document, "post", "/v1/companies/{id}/simulate")["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["properties"]["action"]["enum"]) == set(SIMULATE_ACTIONS) == set(SimulatorEngine._ACTIONS)
    assert body["schema"]["properties"]["count"]["maximum"] == MAX_BURST


def _used_codes(tree: ast.AST) -> set[str]:
    """The codes a module names as ErrorCode.MEMBER (every error is raised with one)."""
    return {node.attr.lower() for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ErrorCode"
            and node.attr.isupper()}


def test_every_error_code_raised_is_in_errors_py_and_the_document() -> None:
    """Every raised code is an ErrorCode, documented with its status in an operation or a failed message's error.code."""
    used: set[str] = set()
    for path in (REPO / "whatsappd").rglob("*.py"):
        used |= _used_codes(ast.parse(path.read_text(encoding="utf-8")))
    assert used <= set(CODES), sorted(used - set(CODES))
    document = openapi_document(__version__)
    listed: dict[str, set[str]] = {}
    for item in document["paths"].values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status in operation["responses"]:
                if status[0] in "45":
                    for code in _codes(operation, status):
                        listed.setdefault(code, set()).add(status)
    for code, statuses in listed.items():
        assert statuses == {str(ErrorCode(code).status)}, (code, statuses)
    error = document["components"]["schemas"]["Message"]["properties"]["error"]["oneOf"][1]
    message_codes = set(error["properties"]["code"]["enum"])
    assert set(CODES) - set(listed) - message_codes <= {"not_found", "method_not_allowed", "unknown_op"}, \
        sorted(set(CODES) - set(listed) - message_codes)
    for code, status in CODES.items():
        assert 400 <= status <= 599, code
    assert all(code.meaning for code in ErrorCode)


# ---------------------------------------------------------------------------------------------
# The event stream's lines against their documented schemas.


def test_every_event_type_line_matches_its_documented_schema(daemon_factory: Callable[..., DaemonProcess]) -> None:
    """A simulated life (pair, send, receipt, incoming, rate limit and resume, drop) streams lines each
    matching its type's schema, every field documented."""
    # Pacing off: the message held by the rate limit goes at resume, not after a random jitter.
    daemon = daemon_factory('[events]\nheartbeat_interval = "200ms"\n[pacing]\nenabled = false\n' + _CONFIG).start()
    client = daemon.client
    assert client.post("/v1/companies/acme/connect").status in (200, 202)
    wait_until(lambda: client.get("/v1/companies/acme").json()["state"] == "pairing", what="pairing")
    assert client.post("/v1/companies/acme/simulate", body={"action": "scan"}).status == 200
    wait_until(lambda: client.get("/v1/companies/acme").json()["state"] == "connected", what="connected")
    sent = client.post("/v1/companies/acme/messages?wait=sent", body={"to": "+5511999999999", "text": "hi"}).json()
    assert client.post("/v1/companies/acme/simulate", body={"action": "receipt", "ids": [sent["id"]],
                                                            "receipt": "read"}).status == 200
    assert client.post("/v1/companies/acme/simulate", body={"action": "incoming", "kind": "image"}).status == 200
    assert client.post("/v1/companies/acme/simulate", body={"action": "rate_limit", "count": 1}).status == 200
    held = client.post("/v1/companies/acme/messages", body={"to": "+5511999999998", "text": "held"}).json()
    wait_until(lambda: client.get("/v1/companies/acme").json()["sending"]["state"] == "paused", what="paused")
    assert client.post("/v1/companies/acme/sending/resume").json()["resumed"] is True  # company.sending twice
    wait_until(lambda: client.get(f"/v1/companies/acme/messages/{held['id']}").json()["status"] == "sent", what="sent")
    assert client.post("/v1/companies/acme/simulate", body={"action": "drop"}).status == 200

    document = openapi_document(__version__)
    validator = jsonschema.Draft202012Validator({"$ref": "#/components/schemas/Event",
                                                 "components": document["components"]})
    seen: dict[str, dict[str, Any]] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket_path))
        sock.sendall(b"GET /v1/events?since=0 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        deadline = time.monotonic() + 20
        while "heartbeat" not in seen or not set(EVENT_TYPES) <= set(seen):
            assert time.monotonic() < deadline, sorted(seen)
            data += sock.recv(65536)
            body = data.partition(b"\r\n\r\n")[2]
            for line in body.split(b"\n")[:-1]:  # the last one may be cut short
                if line.startswith(b"{"):  # chunk-size lines in between are not JSON objects
                    item = json.loads(line)
                    seen.setdefault(item["type"], item)
    documented = {schema["properties"]["type"]["const"]: schema for schema in document["components"]["schemas"].values()
                  if "const" in schema.get("properties", {}).get("type", {})}
    for kind, item in seen.items():
        errors = [error.message for error in validator.iter_errors(item)]
        assert not errors, (kind, item, errors)
        assert set(item) <= set(documented[kind]["properties"]), (kind, set(item) - set(documented[kind]["properties"]))
    assert seen["message.status"]["message_id"] == sent["id"]
    assert daemon.stop() == 0


def test_the_documented_name_pattern_is_exactly_the_terminal_rule() -> None:
    """CompanyInput.name's pattern accepts a character exactly when names may contain it."""
    import re

    from whatsappd.terminal import is_unsafe, safe_text_pattern

    pattern = re.compile(safe_text_pattern())
    scalars = (code for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF)
    wrong = [hex(code) for code in scalars if bool(pattern.match(f"a{chr(code)}b")) == is_unsafe(chr(code))]
    assert wrong == []

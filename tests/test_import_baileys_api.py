"""POST /v1/companies/{id}/import-baileys against a real daemon over its Unix socket.

The source is always `{import.baileys_root}/session-{id}` (a copy of the shared Baileys fixture
under tmp_path); neonize companies only ever dial a refusing SOCKS5 listener on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from baileys_fixture import JID, assert_restored_never_paired, baileys_copy, tree

from whatsappd.baileys import PROVENANCE_FILE
from whatsappd.client import Response
from whatsappd.testing.daemon import wait_until
from whatsappd.testing.scenario import SimDaemon, tree_state
from whatsappd.testing.socks5 import Socks5FaultProxy

_FAST = ('[reconnect]\ninitial_delay = "200ms"\nmax_delay = "1s"\n'
         '[workers]\nheartbeat_interval = "200ms"\nheartbeat_timeout = "5s"\nstop_grace = "1s"\n')


@pytest.fixture
def proxy() -> Iterator[Socks5FaultProxy]:
    """A SOCKS5 listener on 127.0.0.1 that refuses every CONNECT: the only network a company sees."""
    with Socks5FaultProxy(mode="refuse") as listener:
        yield listener


def _config(proxy: Socks5FaultProxy, root: Path | None, extra: str = "") -> str:
    """Company seven on neonize behind the refusing proxy; import.baileys_root = root when given."""
    setting = f'[import]\nbaileys_root = "{root}"\n' if root is not None else ""
    return (_FAST + setting + f'[[companies]]\nid = "seven"\nengine = "neonize"\nproxy = "{proxy.url}"\n' + extra)


def _started(tmp_path: Path, daemons: Callable[..., SimDaemon],
             proxy: Socks5FaultProxy) -> tuple[Path, dict[str, tuple[int, str, int]], SimDaemon]:
    """The fixture as {baileys_root}/session-seven, its tree now, and a started daemon importing from there."""
    source = baileys_copy(tmp_path / "crm", "session-seven")
    return source, tree(source), daemons(_config(proxy, tmp_path / "crm")).start()


def _import(d: SimDaemon, body: Any, company: str = "seven") -> Response:
    return d.client.post(f"/v1/companies/{company}/import-baileys", body)


def _error(response: Response, status: int, code: str) -> str:
    """The refusal's message, after checking its status and code."""
    assert response.status == status, (response.status, response.body)
    error = response.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


def _sessions(d: SimDaemon) -> dict[str, tuple[int, int, int]]:
    return tree_state(d.state_dir / "sessions")


def test_the_route_is_off_by_default_and_a_reload_turns_it_on(
        tmp_path: Path, daemons: Callable[..., SimDaemon], proxy: Socks5FaultProxy) -> None:
    """Without import.baileys_root: 409 import_disabled naming the setting, nothing read or written; set and reloaded, it answers."""
    root = tmp_path / "crm"
    source = baileys_copy(root, "session-seven")
    d = daemons(_config(proxy, None)).start()
    before = _sessions(d)
    message = _error(_import(d, {"dry_run": True}), 409, "import_disabled")
    assert "import.baileys_root" in message and "reload" in message, message
    assert _sessions(d) == before
    assert d.config_path is not None
    d.config_path.write_text(d.config_path.read_text() + f'\n[import]\nbaileys_root = "{root}"\n')
    assert d.client.post("/v1/reload").status == 200
    response = _import(d, {"dry_run": True})
    assert response.status == 200, response.body
    assert response.json()["source"] == str(source)
    assert d.stop() == 0


def test_a_dry_run_answers_the_report_and_writes_nothing(
        tmp_path: Path, daemons: Callable[..., SimDaemon], proxy: Socks5FaultProxy) -> None:
    """dry_run: 200 with the CLI's report (JID, counts, checks), the source and the sessions untouched, the company still stopped."""
    source, before, d = _started(tmp_path, daemons, proxy)
    sessions = _sessions(d)
    response = _import(d, {"dry_run": True})
    assert response.status == 200, response.body
    report = response.json()
    assert report["ok"] and report["dry_run"] and report["error"] is None
    assert report["company"] == "seven" and report["jid"] == JID and report["source"] == str(source)
    assert report["counts"]["pre_keys"] == 34 and report["counts"]["sessions"] == 3
    assert report["checks"] == {"key_pairs": 3 + 34 + 3 + 1, "signatures": 3}
    assert report["neonize_jid"] is None and report["provenance"] is None
    assert tree(source) == before and _sessions(d) == sessions
    assert d.snapshot("seven")["state"] == "stopped" and not proxy.requests
    assert d.stop() == 0


def test_bad_bodies_and_sources_are_refused_each_with_its_code_and_nothing_written(
        tmp_path: Path, daemons: Callable[..., SimDaemon], proxy: Socks5FaultProxy) -> None:
    """Strict body (400), simulator engine (409 wrong_engine), no source folder (404), a symlinked one (422): nothing written."""
    root = tmp_path / "crm"
    root.mkdir()
    real = baileys_copy(tmp_path / "elsewhere", "session-seven")
    real_before = tree(real)
    d = daemons(_config(proxy, root, '[[companies]]\nid = "sim"\nengine = "simulator"\n')).start()
    before = _sessions(d)
    for body in ({}, {"dry_run": "true"}, {"dry_run": 1}, {"dry_run": False, "path": str(real)}, [True], None):
        _error(_import(d, body), 400, "bad_request")
    assert "engine" in _error(_import(d, {"dry_run": True}, "sim"), 409, "wrong_engine")
    assert str(root / "session-seven") in _error(_import(d, {"dry_run": False}), 404, "source_not_found")
    (root / "session-seven").symlink_to(real)
    message = _error(_import(d, {"dry_run": False}), 422, "not_baileys")
    assert "symbolic link" in message, message
    _error(_import(d, {"dry_run": True}), 422, "not_baileys")
    assert _sessions(d) == before and tree(real) == real_before
    assert d.snapshot("seven")["state"] == "stopped" and not proxy.requests
    assert d.stop() == 0


def test_a_running_company_is_refused_in_one_sentence_and_nothing_written(
        tmp_path: Path, daemons: Callable[..., SimDaemon], proxy: Socks5FaultProxy) -> None:
    """A company whose worker runs (connected with no session, it tries to pair): 409 company_running, no store, no provenance."""
    source, before, d = _started(tmp_path, daemons, proxy)
    assert d.post("seven", "connect").status in (200, 202)
    wait_until(lambda: d.worker_pid("seven") is not None, what="a worker")
    message = _error(_import(d, {"dry_run": False}), 409, "company_running")
    assert message.count(". ") == 0 and "DELETE /v1/companies/{id}" in message, message
    _error(_import(d, {"dry_run": True}), 409, "company_running")
    target = d.session_dir("seven")
    assert not (target / PROVENANCE_FILE).exists()
    assert not [p for p in (d.state_dir / "sessions").iterdir() if p.name.startswith(".import-")]
    assert tree(source) == before
    assert not any(line.get("mode") == "restore" for line in d.log_lines("worker started", company="seven"))
    assert d.stop() == 0


@pytest.mark.neonize
@pytest.mark.slow
def test_an_import_creates_the_store_and_the_company_logs_in_without_pairing(
        tmp_path: Path, daemons: Callable[..., SimDaemon], proxy: Socks5FaultProxy) -> None:
    """201 with neonize's JID; store is in place and the company dials WhatsApp to log in (worker mode restore), never `pairing`."""
    source, before, d = _started(tmp_path, daemons, proxy)
    response = _import(d, {"dry_run": False})
    assert response.status == 201, response.body
    report = response.json()
    assert report["ok"] and not report["dry_run"] and report["neonize_jid"] == JID
    target = d.session_dir("seven")
    assert (target / "store.db").is_file() and report["provenance"] == str(target / PROVENANCE_FILE)
    assert tree(source) == before
    assert_restored_never_paired(d, "seven", proxy, attempts=2)
    assert "reconnecting" in [line.get("new") for line in d.log_lines("state changed", company="seven")]
    assert d.stop() == 0

"""Companies added at runtime: PUT /v1/companies/{id}, kept in STATE_DIR/companies.json.

Real daemons; the file is read back from disk and the daemon restarted to prove persistence.
"""

from __future__ import annotations

import json
import stat

import pytest

from whatsappd.testing.scenario import SimDaemon, sim_config


def registry_ids(daemon: SimDaemon) -> list[str]:
    data = json.loads((daemon.state_dir / "companies.json").read_text())
    return [c["id"] for c in data["companies"]]


def test_put_adds_a_company_persisted_0600_and_restored_after_a_restart(daemons):
    """PUT adds a company (201), kept in companies.json (0600) and restored after a restart."""
    d = daemons(sim_config("acme"))
    d.start()
    response = d.client.request("PUT", "/v1/companies/newco", body={"name": "New Co", "engine": "simulator"})
    assert response.status == 201, response.body
    snap = response.json()
    assert (snap["id"], snap["name"], snap["engine"], snap["source"], snap["state"]) == (
        "newco", "New Co", "simulator", "runtime", "stopped")
    path = d.state_dir / "companies.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert registry_ids(d) == ["newco"]
    assert not list(d.state_dir.glob(".companies-*"))  # no temporary file left
    assert sorted(d.companies()) == ["acme", "newco"]
    jid = d.pair("newco")["jid"]
    assert d.stop() == 0

    mark = d.log_mark()
    d.start()
    snap = d.wait_state("newco", "connected")
    assert (snap["source"], snap["name"], snap["jid"]) == ("runtime", "New Co", jid)
    assert d.log_lines("worker started", mark, company="newco")[0]["mode"] == "restore"


def test_put_of_a_runtime_company_again_updates_it_with_200(daemons):
    """A second PUT of a runtime company updates it with 200, and the file follows."""
    d = daemons(sim_config())
    d.start()
    assert d.client.request("PUT", "/v1/companies/newco", body={"engine": "simulator"}).status == 201
    response = d.client.request("PUT", "/v1/companies/newco", body={"name": "Renamed", "engine": "simulator"})
    assert response.status == 200
    assert response.json()["name"] == "Renamed"
    data = json.loads((d.state_dir / "companies.json").read_text())
    assert [(c["id"], c.get("name")) for c in data["companies"]] == [("newco", "Renamed")]


def test_put_of_a_company_defined_in_the_config_is_409(daemons):
    """PUT of a company defined in the config file is 409 defined_in_config; nothing written."""
    d = daemons(sim_config("acme"))
    d.start()
    response = d.client.request("PUT", "/v1/companies/acme", body={"engine": "simulator"})
    assert response.status == 409
    assert response.json()["error"]["code"] == "defined_in_config"
    assert not (d.state_dir / "companies.json").exists()
    assert d.snapshot("acme")["source"] == "config"


def test_put_with_a_bad_body_is_400_and_writes_nothing(daemons):
    """PUT with a body that is not a valid company is 400 and writes nothing."""
    d = daemons(sim_config())
    d.start()
    for body, code in [
        (b"[1, 2]", "bad_request"), (b'"simulator"', "bad_request"), (b"{not json", "invalid_json"),
        (b'{"engine": "bogus"}', "bad_request"), (b'{"colour": "red"}', "bad_request"),
        (b'{"name": 5}', "bad_request"), (b'{"proxy": "ftp://example"}', "bad_request"),
        (b'{"id": "other"}', "bad_request"),
    ]:
        response = d.client.request("PUT", "/v1/companies/newco", body=body)
        assert (response.status, response.json()["error"]["code"]) == (400, code), body
    assert not (d.state_dir / "companies.json").exists()
    assert d.companies() == {}


@pytest.mark.parametrize("name", ["\x1b]0;pwned\x07\x1b[2J", "ACME\x9b31m", "ACME\nforged line",
                                  "ACME \u202eevil", "ACME\u2028X"])
def test_put_with_control_characters_in_the_name_is_400_and_writes_nothing(daemons, name):
    """A PUT name with terminal escapes, C1 controls, newlines, bidi overrides or line separators is 400."""
    d = daemons(sim_config())
    d.start()
    response = d.client.request("PUT", "/v1/companies/newco", body={"name": name, "engine": "simulator"})
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["code"] == "bad_request"
    assert error["message"].startswith(f"body (id 'newco').name = {name!r}: character ")
    assert "a control or formatting character; a name may not contain those" in error["message"]
    assert not (d.state_dir / "companies.json").exists()
    assert d.companies() == {}
    good = "Imobiliária \U0001f3e0 São João"
    response = d.client.request("PUT", "/v1/companies/newco", body={"name": good, "engine": "simulator"})
    assert response.status == 201 and response.json()["name"] == good


def test_temporary_files_of_killed_writes_are_removed_at_start_and_nothing_else(daemons):
    """Leftover .companies-XXXXXXXX.tmp files are removed at start; other names, links and dirs stay."""
    d = daemons(sim_config())
    d.start()
    assert d.client.request("PUT", "/v1/companies/newco", body={"engine": "simulator"}).status == 201
    d.kill()  # as if killed in the middle of a later write: its temporary file stays behind
    state = d.state_dir
    companies = (state / "companies.json").read_bytes()
    leftovers = [state / ".companies-k1ll_9xy.tmp", state / ".companies-abcdefgh.tmp"]
    for path in leftovers:
        path.write_text('{"format": "whatsappd-compa')
    kept = [state / ".companies-short.tmp", state / ".companies-abcdefgh.tmp.bak", state / "companies-abcdefgh.tmp",
            state / ".companies-ABCDEFGH.tmp", state / "x.companies-abcdefgh.tmp"]
    for path in kept:
        path.write_text("not ours")
    target = state / "precious"
    target.write_text("never touched")
    (state / ".companies-link0000.tmp").symlink_to(target)
    (state / ".companies-dir00000.tmp").mkdir()
    kept += [state / ".companies-link0000.tmp", state / ".companies-dir00000.tmp", target]

    mark = d.log_mark()
    d.start()
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() or path.is_symlink() for path in kept)
    assert target.read_text() == "never touched"
    assert (state / "companies.json").read_bytes() == companies
    assert sorted(d.companies()) == ["newco"]
    removed = d.log_lines("removed a temporary file left by an interrupted write", mark)
    assert sorted(line["path"] for line in removed) == sorted(str(path) for path in leftovers)


def test_delete_of_a_runtime_company_removes_it_for_good(daemons):
    """DELETE of a runtime company without a session removes it, also from companies.json."""
    d = daemons(sim_config())
    d.start()
    for cid in ("one", "two"):
        assert d.client.request("PUT", f"/v1/companies/{cid}", body={"engine": "simulator"}).status == 201
    response = d.client.request("DELETE", "/v1/companies/one")
    assert response.status == 200 and response.json()["removed"] is True
    assert registry_ids(d) == ["two"]
    assert d.client.get("/v1/companies/one").status == 404
    d.stop()
    d.start()
    assert sorted(d.companies()) == ["two"]


@pytest.mark.parametrize("content", [
    b"{not json", b'{"format": "something-else", "companies": []}',
    b'{"format": "whatsappd-companies", "companies": [{"id": "../etc"}]}',
    b'{"format": "whatsappd-companies", "companies": [{"id": "x", "engine": "bogus"}]}',
    b'{"format": "whatsappd-companies", "companies": [{"id": "x", "name": "\\u001b]0;pwned\\u0007"}]}',
    b"\xff\xfe",
])
def test_a_corrupt_registry_stops_the_daemon_from_starting_and_is_left_unchanged(daemons, content):
    """A corrupt companies.json: the daemon exits 1 naming the file, which is left unchanged."""
    d = daemons(sim_config("acme"))
    d.state_dir.mkdir(parents=True)
    path = d.state_dir / "companies.json"
    path.write_bytes(content)
    path.chmod(0o600)
    before = path.stat()
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(15) == 1
    lines = d.log_lines("cannot start: unusable state directory")
    assert len(lines) == 1 and str(path) in lines[0]["reason"], d.logs()
    assert path.read_bytes() == content
    after = path.stat()
    assert (after.st_mtime_ns, after.st_ino, after.st_mode) == (before.st_mtime_ns, before.st_ino, before.st_mode)
    assert not d.socket_path.exists()

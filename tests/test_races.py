"""Operator acts that collide, and workers killed with data still in flight."""

from __future__ import annotations

import threading

import pytest

from whatsappd.testing.daemon import at_once, wait_until
from whatsappd.testing.scenario import SimDaemon, process_gone, process_state, sim_config


def hung(d: SimDaemon, company: str) -> int:
    """Pair the company, then freeze its worker (SIGSTOP); return the frozen pid."""
    pid = d.pair(company)["worker"]["pid"]
    d.simulate(company, "hang")
    wait_until(lambda: process_state(pid) == "T", 5, what="the worker to be frozen")
    return int(pid)


def test_deleting_a_frozen_worker_stops_the_company_cleanly(daemons):
    """DELETE of a company whose worker is frozen: killed after stop_grace, state `stopped`, not `failed`."""
    d = daemons(sim_config("acme", workers={"stop_grace": "1s", "heartbeat_timeout": "60s"}))
    d.start()
    pid = hung(d, "acme")
    response = d.client.request("DELETE", "/v1/companies/acme")
    assert response.status == 200, response.body
    snap = d.snapshot("acme")
    assert snap["state"] == "stopped" and snap["last_error"] is None, snap
    assert process_gone(pid)
    assert not d.log_lines("runner failed", company="acme")
    d.post("acme", "connect")
    d.wait_state("acme", "connected")  # and it comes back on request


def test_a_connect_during_a_slow_stop_wins_and_leaves_a_consistent_company(daemons):
    """DELETE (slow: frozen worker) then connect at once: the connect runs after the stop, ends `connected`."""
    d = daemons(sim_config("acme", workers={"stop_grace": "2s", "heartbeat_timeout": "60s"}))
    d.start()
    pid = hung(d, "acme")
    answers: dict[str, int] = {}

    def call(name: str, method: str, path: str) -> None:
        answers[name] = d.client.request(method, path).status

    deleting = threading.Thread(target=call, args=("delete", "DELETE", "/v1/companies/acme"))
    deleting.start()
    wait_until(lambda: d.log_lines("worker did not stop in time; killing it", company="acme")
               or d.snapshot("acme")["state"] != "connected" or True, 1)
    connecting = threading.Thread(target=call, args=("connect", "POST", "/v1/companies/acme/connect"))
    connecting.start()
    deleting.join(30)
    connecting.join(30)
    assert answers == {"delete": 200, "connect": 202}
    snap = d.wait_state("acme", "connected", timeout=15)
    assert snap["worker"]["pid"] not in (None, pid)
    assert process_gone(pid)
    assert not d.log_lines("ignored a worker report that does not fit the state", company="acme")
    assert not d.log_lines("runner failed", company="acme")
    # and the company still obeys: a drop is reported, a message goes out
    assert d.simulate("acme", "drop").status == 200
    d.wait_state("acme", "reconnecting")


def test_a_send_to_a_frozen_worker_restarts_it_and_the_message_is_settled(daemons):
    """A send the worker never answers: the worker is killed at send_timeout, restarted, the message sent once."""
    d = daemons(sim_config("acme", workers={"heartbeat_timeout": "60s"}, outbox={"send_timeout": "2s"}))
    d.start()
    pid = hung(d, "acme")
    message = d.client.post("/v1/companies/acme/messages", {"to": "+5511999990101", "text": "hi"}).json()
    snap = d.wait_state("acme", "connected", timeout=20, check=lambda s: s["worker"]["pid"] not in (None, pid))
    assert snap["last_error"] is None or snap["last_error"]["code"] != "internal_error"
    wait_until(lambda: d.client.get(f"/v1/companies/acme/messages/{message['id']}").json()["status"] == "sent",
               15, what="the message to be sent")
    stats = d.simulate("acme", "stats").json()
    assert stats["sent"] == 1 and stats["duplicate_requests"] == 0


def test_parallel_deletes_with_wipe_both_succeed_and_remove_the_company_once(daemons):
    """Two DELETE ?wipe=true at once on one company, round after round: both 200 with one answer, company and session gone."""
    d = daemons(sim_config())
    d.start()
    for round_ in range(4):
        cid = f"r{round_}"
        assert d.client.request("PUT", f"/v1/companies/{cid}", {"engine": "simulator"}).status == 201
        d.pair(cid)
        bodies: list[object] = [None, None]

        def delete(i: int, cid: str = cid, bodies: list[object] = bodies) -> int:
            response = d.client.request("DELETE", f"/v1/companies/{cid}?wipe=true")
            bodies[i] = response.json()
            return response.status

        assert at_once([lambda: delete(0), lambda: delete(1)]) == [200, 200], bodies
        assert bodies[0] == bodies[1] and bodies[0]["removed"] is True, bodies  # type: ignore[index]
        assert d.client.get(f"/v1/companies/{cid}").status == 404
        assert not d.session_dir(cid).exists()
    assert not d.log_lines("request failed") and not d.log_lines("runner failed")
    assert "Traceback" not in d.logs()


@pytest.mark.parametrize("round_", range(3))
def test_every_operator_act_at_once_on_one_company_never_answers_500(daemons, round_):
    """connect, restart, logout, delete, delete ?wipe at once: only 2xx/404/409 answers, and a consistent end."""
    d = daemons(sim_config())
    d.start()
    assert d.client.request("PUT", "/v1/companies/acme", {"engine": "simulator"}).status == 201
    d.pair("acme")
    acts = [("POST", "/v1/companies/acme/connect"), ("POST", "/v1/companies/acme/restart"),
            ("POST", "/v1/companies/acme/logout"), ("DELETE", "/v1/companies/acme?wipe=true"),
            ("DELETE", "/v1/companies/acme"), ("POST", "/v1/companies/acme/connect"),
            ("PUT", "/v1/companies/acme")]
    acts = acts[round_:] + acts[:round_]  # a different order of arrival each round

    def call(method: str, path: str) -> int:
        body = {"engine": "simulator"} if method == "PUT" else None
        return d.client.request(method, path, body).status

    statuses = at_once([lambda m=m, p=p: call(m, p) for m, p in acts])
    assert all(s in (200, 201, 202, 404, 409) for s in statuses), list(zip(acts, statuses, strict=True))
    assert "Traceback" not in d.logs() and not d.log_lines("runner failed")
    # Whatever won, the daemon still obeys: the company can be (re)created, paired and deleted.
    d.client.request("PUT", "/v1/companies/acme", {"engine": "simulator"})
    response = d.client.request("DELETE", "/v1/companies/acme?wipe=true")
    assert response.status == 200 and response.json()["removed"] is True, response.body
    assert d.client.get("/v1/companies/acme").status == 404

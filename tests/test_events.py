"""The event journal and GET /v1/events against a real daemon: resumable, filtered, never held
back by a slow reader, and never writing a QR code to disk.

Readers are real clients on the control socket (`whatsappd.testing.events`); events are made
by real simulator workers (`simulate burst` sends many incoming messages at full speed).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from whatsappd.testing.daemon import clean_env, ctl_command, wait_until
from whatsappd.testing.events import EventReader, StalledReader
from whatsappd.testing.metrics import metric_value
from whatsappd.testing.scenario import SimDaemon, daemon_pool, parse_iso, sim_config

#: Workers boot slowly on a loaded 2-core machine: more patience than the fast tables' 2 s.
SLOW_BOOT = {"heartbeat_timeout": "10s"}

#: The module daemon: quick heartbeats, and a stalled reader is dropped after WRITE_TIMEOUT.
HEARTBEAT = "200ms"
WRITE_TIMEOUT = 6.0


#: The store backends the journal's scenarios run on (the module daemon's tests and the resume
#: across restarts); the event bus's own (a stalled or slow reader, retention) run on SQLite.
BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(scope="module", params=BACKENDS)
def sim(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        store_tables: Callable[[str], dict[str, str]]) -> Iterator[SimDaemon]:
    """A daemon with companies acme and beta connected, on each store backend."""
    with daemon_pool(tmp_path_factory.mktemp("events")) as make:
        d = make(sim_config("acme", "beta", workers=SLOW_BOOT, events={"heartbeat_interval": HEARTBEAT,
                                                    "write_timeout": f"{WRITE_TIMEOUT}s"}),
                 store=store_tables(request.param))
        d.start(timeout=30)
        d.pair("acme", timeout=30)
        d.pair("beta", timeout=30)
        yield d
        assert d.stop() == 0


def last_seq(d: SimDaemon) -> int:
    return int(metric_value(d.client.get("/v1/metrics").body.decode(), "whatsappd_journal_last_seq") or 0)


def readers_open(d: SimDaemon) -> int:
    return int(metric_value(d.client.get("/v1/metrics").body.decode(), "whatsappd_event_readers") or 0)


def burst(d: SimDaemon, company: str, count: int, text: str = "burst") -> None:
    response = d.simulate(company, "burst", count=count, text=text)
    assert response.status == 200 and response.json()["emitted"] == count, response.body


def error_of(reader: EventReader) -> dict[str, Any]:
    assert reader.error is not None, f"expected an error, got a stream ({reader.status})"
    return reader.error


def contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True


# ----------------------------------------------------------------------- backlog and live


def test_a_reader_gets_the_backlog_after_since_then_live_events_in_seq_order(sim):
    """since=N streams the backlog after N then live events, contiguous; without since only live ones."""
    start = last_seq(sim)
    burst(sim, "acme", 30, "before")
    with EventReader(sim.socket_path, f"since={start}") as from_cursor:
        from_cursor.wait_count(30)
        with EventReader(sim.socket_path) as live:  # headers came: it is subscribed
            burst(sim, "acme", 20, "after")
            got = from_cursor.wait_count(50)
            live_got = live.wait_count(20)
    seqs = [e["seq"] for e in got]
    assert seqs[0] == start + 1 and contiguous(seqs)
    texts = [e["text"] for e in got[:50]]
    assert texts == [f"before {n}" for n in range(1, 31)] + [f"after {n}" for n in range(1, 21)]
    assert [e["text"] for e in live_got] == [f"after {n}" for n in range(1, 21)]
    assert live_got[0]["seq"] == start + 31
    event = got[0]
    assert event["type"] == "message.incoming" and event["company"] == "acme"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["at"])


def test_filters_by_company_and_type_are_repeatable(sim):
    """company= and type= (each repeatable) keep only matching events, in the backlog and live."""
    start = last_seq(sim)
    burst(sim, "acme", 3, "a")
    burst(sim, "beta", 3, "b")
    query = f"since={start}"
    with EventReader(sim.socket_path, f"{query}&company=beta") as only_beta, \
            EventReader(sim.socket_path, f"{query}&type=company.state&type=message.status") as types, \
            EventReader(sim.socket_path, f"{query}&company=acme&company=beta&type=message.incoming") as both:
        sent = sim.client.post("/v1/companies/acme/messages?wait=sent", {"to": "+5511999992001", "text": "x"})
        assert sent.json()["status"] == "sent"
        burst(sim, "beta", 2, "b-live")
        beta = only_beta.wait_count(5)
        mixed = types.wait_count(3)
        incoming = both.wait_count(8)
    assert {e["company"] for e in beta} == {"beta"}
    assert [e["text"] for e in beta] == ["b 1", "b 2", "b 3", "b-live 1", "b-live 2"]
    assert {e["type"] for e in mixed} == {"message.status"}
    assert [e["status"] for e in mixed] == ["queued", "sending", "sent"]
    assert [e["text"] for e in incoming] == ["a 1", "a 2", "a 3", "b 1", "b 2", "b 3", "b-live 1", "b-live 2"]


def test_a_quiet_stream_gets_heartbeat_lines(sim):
    """With events.heartbeat_interval = 200ms, an idle reader gets heartbeat lines with the last seq."""
    with EventReader(sim.socket_path, "type=company.paired") as reader:
        first = reader.wait_for(lambda line: line.get("type") == "heartbeat", timeout=3)
        second = reader.wait_for(lambda line: line.get("type") == "heartbeat" and line is not first, timeout=3)
    assert 0.1 < second.arrived - first.arrived < 1.5
    assert isinstance(first["last_seq"], int) and "at" in first and "seq" not in first


def test_bad_stream_requests_are_refused_with_clear_errors(sim):
    """since ahead of the journal is 409 cursor_ahead; a bad since, type or company id is 400."""
    top = last_seq(sim)
    ahead = EventReader(sim.socket_path, f"since={top + 100}")
    assert ahead.status == 409
    assert error_of(ahead)["code"] == "cursor_ahead" and error_of(ahead)["last_seq"] >= top
    for query, code in (("since=-1", "bad_request"), ("since=abc", "bad_request"), ("since=%C2%B2", "bad_request"),
                        ("since=" + "9" * 5000, "bad_request"),
                        ("type=message.sent", "bad_request"), ("company=Not_Valid", "invalid_company_id")):
        reader = EventReader(sim.socket_path, query)
        assert (reader.status, error_of(reader)["code"]) == (400, code), query
    assert "message.incoming" in EventReader(sim.socket_path, "type=nope").error["message"]  # type: ignore[index]


# --------------------------------------------------------------------------- slow readers


@pytest.mark.slow
@pytest.mark.parametrize("sim", ["sqlite"], indirect=True)  # the event bus's own: any backend will do
def test_a_stalled_reader_does_not_delay_another_readers_live_events(sim):
    """Readers that never read delay neither another reader's live events nor the API; they are dropped."""
    # Readers of earlier tests are gone once the daemon notices (at its next heartbeat write).
    wait_until(lambda: readers_open(sim) == 0, timeout=5, what="no readers")
    baseline = 0
    with StalledReader(sim.socket_path, "since=0"), StalledReader(sim.socket_path):
        with EventReader(sim.socket_path) as reader:
            wait_until(lambda: readers_open(sim) == baseline + 3, timeout=5, what="three readers")
            started = time.monotonic()
            burst(sim, "acme", 3000, "x" * 200)  # ~1 MB of lines: far more than the socket buffers
            got = reader.wait_count(3000, timeout=20)
            took = time.monotonic() - started
            assert contiguous([e["seq"] for e in got])
            lags = sorted(e.arrived_wall - parse_iso(e["at"]) for e in got)
            p99 = lags[int(len(lags) * 0.99)]
            print(f"stalled readers: 3000 events in {took:.2f}s, lag p50 {lags[len(lags) // 2] * 1000:.1f} ms, "
                  f"p99 {p99 * 1000:.1f} ms")
            # The stalled readers are still connected and stuck; one event now reaches the live reader at once.
            assert readers_open(sim) == baseline + 3
            before = time.monotonic()
            probe = sim.simulate("acme", "incoming", text="probe").json()["id"]
            line = reader.wait_for(lambda e: e.get("id") == probe, timeout=5)
            latency = line.arrived - before
            api_started = time.monotonic()
            assert sim.client.get("/v1/health").status == 200
            api_latency = time.monotonic() - api_started
        assert latency < 1.0, f"the live reader got a new event {latency:.3f}s after it happened"
        assert api_latency < 1.0
        assert took < 15, f"3000 events took {took:.1f}s to reach the live reader"
        assert p99 < 2.0, f"journal-to-reader lag p99 {p99:.3f}s with stalled readers"
        # Never waited for: both stalled readers are cut after write_timeout.
        wait_until(lambda: readers_open(sim) == baseline, timeout=WRITE_TIMEOUT + 10,
                   what="the stalled readers to be dropped")


def test_a_reader_that_falls_too_far_behind_is_cut_with_a_final_line_and_resumes_without_gap(daemons):
    """A reader past reader_buffer gets a prompt final stream.end too_slow line and resumes without a gap."""
    d = daemons(sim_config("acme", workers=SLOW_BOOT, events={"reader_buffer": 10, "write_timeout": "60s"}))
    d.start(timeout=30)
    d.pair("acme", timeout=30)
    start = last_seq(d)
    count = 2000  # ~700 kB of lines: more than the socket and transport buffers hold
    with EventReader(d.socket_path, f"since={start}", paused=True) as slow:
        burst(d, "acme", count, "y" * 250)
        wait_until(lambda: last_seq(d) >= start + count, timeout=20, what="the burst to be journaled")
        slow.resume()  # it has fallen behind: the daemon's buffers are full and its queue overflowed
        # Promptly: well before the 15 s heartbeat that would otherwise be the next write.
        end = slow.wait_for(lambda line: line.get("type") == "stream.end", timeout=10)
        assert slow.ended.wait(5), "the stream was not closed after its final line"
    assert end["reason"] == "too_slow"
    seqs = [e["seq"] for e in slow.events()]
    assert seqs and seqs[0] == start + 1 and contiguous(seqs)
    assert len(seqs) < count
    assert end["resume_from"] == seqs[-1]
    assert f"since={seqs[-1]}" in end["message"]
    assert slow.lines[-1] is end
    with EventReader(d.socket_path, f"since={end['resume_from']}") as resumed:
        rest = resumed.wait_count(start + count - end["resume_from"], timeout=20)
    assert rest[0]["seq"] == end["resume_from"] + 1 and contiguous([e["seq"] for e in rest])
    texts = [e["text"] for e in slow.events() + rest][:count]
    assert texts == [f"{'y' * 250} {n}" for n in range(1, count + 1)]


# ------------------------------------------------------------------ restarts and retention


@pytest.mark.slow
@pytest.mark.parametrize("store_table", BACKENDS, indirect=True)
def test_a_reader_resuming_after_a_restart_or_a_crash_sees_no_gap_and_no_duplicate(daemons, store_table):
    """A reader resuming after a graceful restart and after a kill -9 sees every seq exactly once."""
    d = daemons(sim_config("acme", workers=SLOW_BOOT), store=store_table)
    d.start(timeout=30)
    d.pair("acme", timeout=30)
    seen: list[int] = []

    with EventReader(d.socket_path, "since=0") as reader:
        burst(d, "acme", 200)
        reader.wait_count(last_seq(d))
        d.stop()  # graceful: the stream ends with a line saying where to resume
        end = reader.wait_for(lambda line: line.get("type") == "stream.end", timeout=10)
    assert end["reason"] == "daemon_stopping"
    seen += reader.seqs()
    assert end["resume_from"] == seen[-1]

    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    with EventReader(d.socket_path, f"since={end['resume_from']}") as reader:
        response = d.simulate("acme", "burst", count=20000)  # the kill lands while it flows
        assert response.status == 200
        reader.wait_count(2000, timeout=20)
        d.kill()
        assert reader.ended.wait(10)
    after_crash = reader.seqs()
    seen += after_crash

    d.start(timeout=30)
    d.wait_state("acme", "connected", timeout=30)
    burst(d, "acme", 50, "after the crash")
    with EventReader(d.socket_path, f"since={after_crash[-1]}") as reader:
        reader.wait_for(lambda e: e.get("text") == "after the crash 50", timeout=20)
        seen += reader.seqs()
    assert seen[0] == 1
    assert seen == list(range(1, len(seen) + 1)), "a gap or a duplicate across the restarts"


@pytest.mark.slow
def test_since_older_than_the_retention_is_410_with_the_oldest_available(daemons):
    """since older than the pruned journal is 410 since_expired with oldest_available; 0 means all kept."""
    d = daemons(sim_config("acme", workers=SLOW_BOOT, journal={"max_events": 1000}))
    d.start(timeout=30)
    d.pair("acme", timeout=30)
    burst(d, "acme", 1500)
    wait_until(lambda: last_seq(d) >= 1500, timeout=10, what="the burst to be journaled")
    d.stop()
    d.start(timeout=30)  # the journal is pruned when the daemon starts
    top = last_seq(d)

    def pruned() -> EventReader | None:
        reader = EventReader(d.socket_path, "since=1")
        return reader if reader.status == 410 else reader.close()  # type: ignore[func-returns-value]

    expired = wait_until(pruned, timeout=10, what="the prune")
    error = error_of(expired)
    assert error["code"] == "since_expired"
    oldest = error["oldest_available"]
    assert top - 1000 < oldest <= top - 999 + 10
    assert f"resume from {oldest - 1}" in error["message"]
    for since in (oldest - 1, 0):
        with EventReader(d.socket_path, f"since={since}") as reader:
            assert reader.status == 200, reader.error
            assert reader.wait_count(1)[0]["seq"] == oldest


# ----------------------------------------------------------------------------- QR codes


def test_qr_codes_reach_live_readers_but_never_the_disk(sim, request):
    """The QR code rides only on the live company.pairing event: neither the journal, files nor log hold it."""
    response = sim.client.request("PUT", "/v1/companies/qr-check", {"engine": "simulator"})
    assert response.status == 201
    with EventReader(sim.socket_path, "company=qr-check&type=company.pairing") as live:
        sim.connect_pairing("qr-check")
        event = live.wait_for(lambda line: line.get("type") == "company.pairing", timeout=5)
    code = sim.client.get("/v1/companies/qr-check/qr").json()["code"]
    assert event["code"] == code and event["expires_at"]
    with EventReader(sim.socket_path, "since=0&company=qr-check&type=company.pairing") as backlog:
        journaled = backlog.wait_count(1)[0]
    assert journaled["seq"] == event["seq"] and "code" not in journaled
    assert "expires_at" in journaled

    secret_parts = [code.encode(), code.split(",")[0].encode(), code.split(",")[1].encode()]
    files = [p for p in sim.root.rglob("*") if p.is_file() and not p.is_socket()]
    assert sim.log_path in files
    if sim.store:  # PostgreSQL: its cluster's files (tables and WAL) are the disk
        server = request.getfixturevalue("postgres")
        with psycopg.connect(sim.store["dsn"], autocommit=True) as db:
            db.execute("CHECKPOINT")  # whatever it holds is written out to the files below
            oid = db.execute("SELECT oid FROM pg_database WHERE datname = current_database()").fetchone()[0]
        for where in (server.data / "base" / str(oid), server.data / "pg_wal", server.data / "global"):
            files += [p for p in where.rglob("*") if p.is_file()]
    assert any(p.name in ("whatsappd.sqlite", "pg_control") for p in files)
    for path in files:
        data = path.read_bytes()
        for part in secret_parts:
            assert part not in data, f"{path} holds the QR code"


# -------------------------------------------------------------------------- whatsappctl


def test_whatsappctl_events_follows_the_stream_from_since_for_a_company(sim):
    """`whatsappctl --json events --since N --company ID` prints that company's backlog, then live events."""
    start = last_seq(sim)
    burst(sim, "beta", 2, "ctl")
    burst(sim, "acme", 1, "not this one")
    proc = subprocess.Popen([*ctl_command(), "--socket", str(sim.socket_path), "--json", "events",
                             "--since", str(start), "--company", "beta"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env(), text=True)
    try:
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        burst(sim, "beta", 1, "ctl live")
        while (line := json.loads(proc.stdout.readline())).get("type") == "heartbeat":
            pass
        lines.append(line)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    assert stderr == ""
    assert [(e["company"], e["text"]) for e in lines] == [("beta", "ctl 1"), ("beta", "ctl 2"), ("beta", "ctl live 1")]
    assert proc.returncode == 0

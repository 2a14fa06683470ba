"""Send pacing (issue 12): the pure pacer, its settings, and a real daemon sending at a scaled rate.

The pacer (whatsappd/pacing.py) is tested with the time passed in. The daemon tests read what
went out from the simulator's send log on disk (the "server"), the only witness that is not our
own code; rates are scaled (seconds instead of minutes) so that the whole file runs in about 20 s.
bench/bench_pacing.py runs the issue's real-time scenario (6/min, burst 3, 30 messages).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from whatsappd.config import ConfigError, build_config
from whatsappd.errors import ErrorCode
from whatsappd.pacing import (
    FIRST_CONTACT_WINDOW,
    CompanyPacer,
    PacingPolicy,
    WaitReason,
    bucket_violations,
    parse_rate,
)
from whatsappd.supervisor.registry import RuntimeRegistry
from whatsappd.testing.daemon import run_ctl, wait_until
from whatsappd.testing.events import EventReader, wait_message
from whatsappd.testing.metrics import metric_value
from whatsappd.testing.scenario import SimDaemon, daemon_pool, parse_iso, sim_config
from whatsappd.worker.simulator.server import PRESENCE_LOG_FILE, read_send_log, send_log_stats

SLOW_BOOT = {"heartbeat_timeout": "10s"}
#: The daemon scenarios that also run on PostgreSQL (the store keeps pacing's state: contacts,
#: first contacts, pauses); the others run on the default, SQLite.
BOTH_STORES = pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)
T0 = 1_700_000_000.0


def policy(**kw: Any) -> PacingPolicy:
    values: dict[str, Any] = {"rate": parse_rate("6/s"), "burst": 3, "jitter": 0.0, "first_contact_per_day": 5}
    return PacingPolicy(**{**values, **kw})


# ------------------------------------------------------------------------------ the pure pacer


@pytest.mark.parametrize(("text", "per_second"), [("6/min", 0.1), ("20/h", 20 / 3600), ("1/s", 1.0),
                                                  ("0.5/s", 0.5), (" 3 / day ", 3 / 86400), ("6/m", 0.1)])
def test_parse_rate_reads_count_per_unit(text, per_second):
    """A rate string becomes sends per second."""
    assert parse_rate(text).per_second == pytest.approx(per_second)


@pytest.mark.parametrize("bad", ["6", "6/week", "fast", "0/s", "-1/s", "6/min/2", 6, None, "2000/s"])
def test_parse_rate_refuses_what_is_not_a_rate_with_the_expected_form(bad):
    """Anything but "<number>/<s|min|h|d>" (above zero, at most 1000/s) is a ValueError naming the form."""
    with pytest.raises(ValueError, match=r'"6/min"'):
        parse_rate(bad)


def test_bucket_lets_burst_go_at_once_then_one_per_interval():
    """A full bucket lets `burst` sends go at once; the next waits 1/rate after the burst, then each 1/rate."""
    pacer, p = CompanyPacer(random.Random(1)), policy()
    now = T0
    for _ in range(3):
        assert pacer.decide(p, now) is None
        pacer.sent(p, now)
    wait = pacer.decide(p, now)
    assert wait is not None and wait.reason is WaitReason.RATE and wait.until == pytest.approx(now + 1 / 6)
    now = wait.until
    assert pacer.decide(p, now) is None
    pacer.sent(p, now)
    assert pacer.decide(p, now).until == pytest.approx(now + 1 / 6)  # type: ignore[union-attr]


def test_jitter_adds_a_random_wait_after_each_send_within_its_bound():
    """With jitter j, the next send waits an extra uniform(0, j) after the previous, even with tokens left."""
    pacer, p = CompanyPacer(random.Random(7)), policy(burst=100, jitter=2.0)
    delays = []
    now = T0
    for _ in range(50):
        wait = pacer.decide(p, now)
        if wait is not None:
            delays.append(wait.until - now)
            now = wait.until
        pacer.sent(p, now)
    assert all(0 <= d <= 2.0 for d in delays) and len(set(delays)) > 10


def test_jitter_varies_the_gaps_of_a_steady_stream_on_top_of_the_rate():
    """At the bucket's rate the jitter still applies: every gap is 1/rate plus 0..jitter, and they differ."""
    pacer, p = CompanyPacer(random.Random(3)), policy(rate=parse_rate("1/s"), burst=1, jitter=0.5)
    now, sends = T0, []
    for _ in range(20):
        wait = pacer.decide(p, now)
        now = wait.until if wait is not None else now
        pacer.sent(p, now)
        sends.append(now)
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert all(1.0 <= g <= 1.5 for g in gaps) and len({round(g, 6) for g in gaps}) > 10
    assert bucket_violations(sends, 1.0, 1) == []


def test_first_contact_budget_waits_until_the_oldest_leaves_the_24h_window():
    """Budget 5 with 5 first contacts in the window: a sixth waits until the oldest is 24 h old; a known recipient does not."""
    pacer, p = CompanyPacer(), policy(burst=100)
    contacts = [T0 + 10 * i for i in range(5)]
    now = T0 + 100
    wait = pacer.decide(p, now, contacts)
    assert wait is not None and wait.reason is WaitReason.FIRST_CONTACT_BUDGET
    assert wait.until == T0 + FIRST_CONTACT_WINDOW
    assert pacer.decide(p, now, contacts[:4]) is None
    assert pacer.decide(p, now, None) is None  # someone who wrote to us
    assert pacer.decide(p, T0 + FIRST_CONTACT_WINDOW + 1, contacts) is None


def test_a_pause_holds_every_send_until_it_ends_even_with_pacing_off():
    """A rate-limit pause answers PAUSED until its end, whatever the policy; then sending resumes."""
    pacer = CompanyPacer()
    pacer.pause(T0 + 60, "server returned error 463")
    for p in (policy(), policy(enabled=False)):
        wait = pacer.decide(p, T0)
        assert wait is not None and wait.reason is WaitReason.PAUSED and wait.until == T0 + 60
    assert pacer.decide(policy(enabled=False), T0 + 60) is None and pacer.paused_until is None


def test_restore_from_recent_sends_grants_no_fresh_burst():
    """A pacer restored from the last sends (a restart) waits as the old one would have."""
    p = policy()
    pacer = CompanyPacer()
    pacer.restore(p, [T0, T0, T0])
    wait = pacer.decide(p, T0 + 0.01)
    assert wait is not None and wait.until == pytest.approx(T0 + 1 / 6)


def test_typing_is_proportional_to_the_text_and_capped():
    """typing_for: per character for texts, capped at typing_max; none for media or with pacing off."""
    p = policy(typing_per_char=0.05, typing_max=2.0)
    assert p.typing_for("text", "hello") == pytest.approx(0.25)
    assert p.typing_for("text", "x" * 1000) == 2.0
    assert p.typing_for("image", None) == 0 and policy(enabled=False).typing_for("text", "hello") == 0


def test_bucket_violations_finds_a_send_that_came_too_early():
    """The checker the tests and the benchmark use: fitting sends pass, an early one is named."""
    fits = [0.0, 0.0, 0.0, 1 / 6, 2 / 6, 3 / 6 + 0.05]
    assert bucket_violations(fits, 6, 3) == []
    assert bucket_violations([*fits, 3 / 6 + 0.1], 6, 3) and bucket_violations([0, 0, 0, 0], 6, 3)


# ------------------------------------------------------------------------------ settings


def test_company_pacing_overrides_the_global_section():
    """A [companies.pacing] key wins over [pacing]; the others come from [pacing]."""
    config = build_config({"pacing": {"rate": "2/min", "burst": 2},
                           "companies": [{"id": "a", "pacing": {"rate": "10/min"}}, {"id": "b"}]}, "test")
    a, b = (config.pacing_policy(config.company(c)) for c in ("a", "b"))
    assert (a.rate.per_second, a.burst) == (pytest.approx(10 / 60), 2)
    assert (b.rate.per_second, b.burst) == (pytest.approx(2 / 60), 2)


def test_bad_pacing_values_are_named_with_their_place():
    """A bad rate, an unknown key and an out-of-range burst each give one clear problem line."""
    with pytest.raises(ConfigError) as caught:
        build_config({"pacing": {"rate": "6 per minute"},
                      "companies": [{"id": "a", "pacing": {"burst": 0, "speed": 1}}]}, "test")
    text = "\n".join(caught.value.problems)
    assert 'pacing.rate = "6 per minute": expected a rate such as "6/min"' in text
    assert "companies[0] (id 'a').pacing.burst = 0" in text and "pacing.speed: unknown key" in text


def test_a_runtime_company_keeps_its_pacing_across_a_registry_reload(tmp_path):
    """PUT's pacing is written to companies.json as the config file writes it and read back equal."""
    config = build_config({"companies": [{"id": "a", "pacing": {"rate": "10/min", "jitter": "1s500ms",
                                                                  "enabled": False}}]}, "test")
    company = config.company("a")
    assert company is not None
    RuntimeRegistry(tmp_path / "companies.json").put(company)
    assert RuntimeRegistry(tmp_path / "companies.json").load() == [company]


# ------------------------------------------------------------------------------ a real daemon


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with daemon_pool(tmp_path_factory.mktemp("pacing")) as make:
        yield make


def sent_times(d: SimDaemon, company: str) -> list[tuple[str, float]]:
    """(outbox id, send time) of every send in the simulator's log, in log order."""
    return [(r["outbox_id"], parse_iso(r["timestamp"])) for r in read_send_log(d.session_dir(company))]


def enqueue(d: SimDaemon, company: str, to: str, text: str) -> str:
    response = d.client.post(f"/v1/companies/{company}/messages", {"to": to, "text": text})
    assert response.status == 202, response.body
    return str(response.json()["id"])


def test_30_messages_at_6_per_second_burst_3_go_out_in_order_once_with_gaps_that_fit_the_bucket(daemons):
    """The issue's scenario scaled 60x, set through PUT /v1/companies: 30 messages, in order, each once,
    every gap in the send log fitting the bucket; while they wait, GET shows `queued` with paced_until."""
    d = daemons(sim_config(workers=SLOW_BOOT))
    d.start(timeout=30)
    pacing = {"enabled": True, "rate": "6/s", "burst": 3, "jitter": "20ms", "first_contact_per_day": 1000,
              "typing_per_char": "0s"}
    response = d.client.request("PUT", "/v1/companies/paced", {"engine": "simulator", "pacing": pacing})
    assert response.status == 201, response.body
    bad = d.client.request("PUT", "/v1/companies/paced", {"engine": "simulator", "pacing": {"rate": "6 a second"}})
    assert bad.status == 400 and ".pacing.rate = \"6 a second\"" in bad.json()["error"]["message"]
    d.pair("paced", timeout=30)
    assert d.simulate("paced", "drop", down=True).status == 200  # queue all 30 before the first goes
    d.wait_state("paced", "reconnecting")
    ids = [enqueue(d, "paced", f"+55 11 98888-{n + 1000:04d}", f"m{n}") for n in range(30)]
    assert d.simulate("paced", "restore").status == 200

    last = ids[-1]
    waiting = wait_until(lambda: (m := d.client.get(f"/v1/companies/paced/messages/{last}").json())
                         .get("paced_until") and m, timeout=15, what="the last message to show paced_until")
    assert waiting["status"] == "queued" and waiting["paced_reason"] == "rate"
    assert d.companies()["paced"]["sending"]["state"] in ("paced", "active")
    wait_message(d.socket_path, "paced", last, "sent", timeout=30)

    sends = sent_times(d, "paced")
    assert [outbox_id for outbox_id, _ in sends] == ids  # in order, each once
    assert send_log_stats(d.session_dir("paced")).duplicate_requests == 0
    times = [at for _, at in sends]
    assert bucket_violations(times, 6.0, 3) == []
    assert times[-1] - times[0] >= (30 - 3) / 6 - 0.01  # the bucket did hold them back
    metrics = d.client.get("/v1/metrics").body.decode()
    assert metric_value(metrics, "whatsappd_outbox_pending_messages", company="paced") == 0  # the queue's depth
    assert metric_value(metrics, "whatsappd_pacing_delay_seconds", company="paced") is not None
    assert d.stop() == 0


FIRST_CONTACT_CONFIG = """
[[companies]]
id = "fc"
engine = "simulator"
[companies.pacing]
enabled = true
rate = "100/s"
burst = 100
jitter = "0s"
first_contact_per_day = 5
typing_per_char = "10ms"
typing_max = "100ms"
"""


@BOTH_STORES
def test_first_contact_budget_of_5_a_day_holds_across_a_daemon_restart(daemons, store_table):
    """Budget 5: someone who wrote is free, a repeat recipient counts once, the sixth new one waits
    (paced_reason first_contact_budget, paced_until a day later) and still waits after a restart,
    on either store backend."""
    d = daemons(sim_config(workers=SLOW_BOOT) + FIRST_CONTACT_CONFIG, store=store_table)
    d.start(timeout=30)
    d.pair("fc", timeout=30)
    assert d.simulate("fc", "incoming", **{"from": "5511977770001"}).status == 200
    known = enqueue(d, "fc", "+55 11 97777-0001", "hello again")  # wrote first: no budget spent
    wait_message(d.socket_path, "fc", known, "sent")
    new = [enqueue(d, "fc", f"+55 11 96666-100{n}", "a first hello") for n in range(5)]
    repeat = enqueue(d, "fc", "+55 11 96666-1000", "a second line to the first one")  # counted already
    sixth = enqueue(d, "fc", "+55 11 96666-1009", "one too many")
    behind = enqueue(d, "fc", "+55 11 97777-0001", "waits behind the sixth: order is kept")
    for mid in [*new, repeat]:
        wait_message(d.socket_path, "fc", mid, "sent")
    first_send = parse_iso(d.client.get(f"/v1/companies/fc/messages/{new[0]}").json()["sent_at"])

    def held() -> None:
        message = wait_until(lambda: (m := d.client.get(f"/v1/companies/fc/messages/{sixth}").json())
                             .get("paced_reason") and m, timeout=10, what="the sixth to show why it waits")
        assert message["status"] == "queued" and message["paced_reason"] == "first_contact_budget"
        assert parse_iso(message["paced_until"]) == pytest.approx(first_send + FIRST_CONTACT_WINDOW, abs=1)
        assert d.client.get(f"/v1/companies/fc/messages/{behind}").json()["status"] == "queued"
        assert d.companies()["fc"]["sending"]["state"] == "paced"
        assert [r["outbox_id"] for r in read_send_log(d.session_dir("fc"))] == [known, *new, repeat]

    held()
    presence = (d.session_dir("fc") / PRESENCE_LOG_FILE).read_text().splitlines()
    assert len(presence) == 7 and all('"state":"composing"' in line for line in presence)  # typing before each text
    assert read_send_log(d.session_dir("fc"))[0]["typing"] == pytest.approx(0.1)
    assert d.stop() == 0
    d.start(timeout=30)
    d.wait_state("fc", "connected", timeout=30)
    time.sleep(1.0)  # a sender that forgot the budget would have sent by now
    held()
    assert d.stop() == 0


def test_a_rate_limit_error_pauses_the_company_then_it_resumes_after_the_pause(daemons):
    """WhatsApp answers 463: the message stays queued (error rate_limited), the company shows
    `paused` with the reason in GET and health, nothing is retried during the pause, then it is sent once;
    the stream has company.sending paused, then active by pause_over."""
    d = daemons(sim_config("rl", workers=SLOW_BOOT, pacing={"limit_pause": "4s"}))
    d.start(timeout=30)
    d.pair("rl", timeout=30)
    armed = d.simulate("rl", "rate_limit", count=1, code=463)
    assert armed.status == 200 and armed.json() == {"armed": 1, "code": 463}
    mid = enqueue(d, "rl", "+55 11 95555-0001", "too fast")
    started = time.time()
    company = wait_until(lambda: (c := d.client.get("/v1/companies/rl").json())["sending"]["state"] == "paused"
                         and c, timeout=10, what="the company to pause")
    assert "463" in company["sending"]["reason"]
    assert parse_iso(company["sending"]["until"]) == pytest.approx(started + 4, abs=1.5)
    assert "rl" in d.client.get("/v1/health").json()["sending_paused"]
    assert "sending:   rl PAUSED until" in run_ctl("--socket", str(d.socket_path), "health").stdout
    assert "sending:    paused until" in run_ctl("--socket", str(d.socket_path), "status", "rl").stdout
    message = d.client.get(f"/v1/companies/rl/messages/{mid}").json()
    assert message["status"] == "queued" and message["error"]["code"] == ErrorCode.RATE_LIMITED
    assert message["paced_reason"] == "paused" and message["attempts"] == 1
    assert metric_value(d.client.get("/v1/metrics").body.decode(), "whatsappd_sending_paused", company="rl") == 1

    sent = wait_message(d.socket_path, "rl", mid, "sent", timeout=15)
    assert parse_iso(sent["sent_at"]) >= parse_iso(company["sending"]["until"]) - 0.01
    assert sent["attempts"] == 2 and [r["outbox_id"] for r in read_send_log(d.session_dir("rl"))] == [mid]
    assert d.client.get("/v1/companies/rl").json()["sending"]["state"] == "active"
    assert d.client.get("/v1/health").json()["sending_paused"] == {}
    with EventReader(str(d.socket_path), "since=0&type=company.sending") as stream:
        stream.wait_count(2)
        paused, resumed = stream.events()
    assert (paused["state"], paused["until"], paused["reason"]) == ("paused", company["sending"]["until"],
                                                                   company["sending"]["reason"])
    assert (resumed["state"], resumed["by"]) == ("active", "pause_over")
    assert d.stop() == 0



def test_an_operator_resumes_a_rate_limit_pause_through_the_api_and_whatsappctl_and_the_stream_tells(daemons):
    """A pause of an hour ends at POST …/sending/resume and at `whatsappctl resume-sending`: the queued message
    goes at once; resuming when not paused is 200 resumed=false; each pause and resume is a company.sending event."""
    d = daemons(sim_config("op", workers=SLOW_BOOT, pacing={"limit_pause": "1h", "jitter": "0s"}))
    d.start(timeout=30)
    d.pair("op", timeout=30)
    socket = str(d.socket_path)
    with EventReader(socket, "since=0&type=company.sending") as stream:
        idle = d.client.post("/v1/companies/op/sending/resume")
        assert idle.status == 200 and idle.json() == {"company": "op", "resumed": False, "sending": {
            "state": "active", "until": None, "reason": None}}
        missing = d.client.post("/v1/companies/nobody/sending/resume")
        assert missing.status == 404 and missing.json()["error"]["code"] == ErrorCode.COMPANY_NOT_FOUND

        for n, resume in enumerate(("api", "whatsappctl")):
            assert d.simulate("op", "rate_limit", count=1, code=463).status == 200
            mid = enqueue(d, "op", "+55 11 94444-0001", f"held {n}")
            paused = stream.wait_for(lambda e, n=n: e.get("type") == "company.sending" and e["state"] == "paused"
                                     and len(stream.of_type("company.sending")) > 2 * n, what="the pause event")
            assert paused["state"] == "paused" and "463" in paused["reason"] and paused["company"] == "op"
            assert parse_iso(paused["until"]) > time.time() + 3000
            assert d.client.get("/v1/companies/op").json()["sending"]["state"] == "paused"
            asked = time.time()
            if resume == "api":
                answer = d.client.post("/v1/companies/op/sending/resume")
                assert answer.status == 200 and answer.json()["resumed"] is True
                assert answer.json()["sending"]["state"] != "paused"
            else:
                result = run_ctl("--socket", socket, "resume-sending", "op")
                assert result.returncode == 0 and "op: sending resumed" in result.stdout, result.stderr
            sent = wait_message(d.socket_path, "op", mid, "sent", timeout=10)
            assert parse_iso(sent["sent_at"]) - asked < 5  # at once, not after the hour
            resumed = stream.wait_for(lambda e, after=paused["seq"]: e.get("type") == "company.sending"
                                      and e["state"] == "active" and e["seq"] > after, what="the resume event")
            assert resumed["by"] == "operator" and resumed["until"] is None
        again = run_ctl("--socket", socket, "resume-sending", "op")
        assert again.returncode == 0 and "was not paused; nothing changed" in again.stdout
        assert [e["state"] for e in stream.of_type("company.sending")] == ["paused", "active"] * 2
    assert d.client.get("/v1/health").json()["sending_paused"] == {}
    assert d.stop() == 0

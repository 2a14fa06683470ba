"""Webhooks (issue 12) against a real daemon and real receivers (aiohttp on 127.0.0.1 and on a Unix
socket, `whatsappd.testing.webhooks`): every event delivered once acknowledged, in order per
company, signed; failures retried and reported; a kill -9 resumes from the stored cursor; pruned
events reported lost. Events are made by simulator workers (`simulate burst`).

Timings are scaled: webhook_delivery.timeout 1 s, retry delays 50-300 ms, failing after 3 in a
row. The full-length scenario (500 for a minute, then a hang) is bench/bench_webhooks.py.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from whatsappd.config import ConfigError, build_config
from whatsappd.testing.daemon import run_ctl, wait_until
from whatsappd.testing.metrics import metric_value
from whatsappd.testing.scenario import SimDaemon, daemon_pool, sim_config
from whatsappd.testing.webhooks import Delivery, Receiver
from whatsappd.webhooks.spec import sign

SECRET = "test-secret-0123456789abcdef"
DELIVERY = {"timeout": "1s", "initial_delay": "50ms", "max_delay": "300ms", "failing_after": 3}
SLOW_BOOT = {"heartbeat_timeout": "10s"}
#: The scenarios that also run on PostgreSQL (the store keeps each webhook's cursor and API
#: definition); the others run on the default, SQLite.
BOTH_STORES = pytest.mark.parametrize("store_table", ["sqlite", "postgresql"], indirect=True)


def webhook_config(url: str, **extra: Any) -> str:
    lines = ["[[webhooks]]", 'id = "cfg"', f'url = "{url}"', f'secret = "{SECRET}"', 'events = ["message.incoming"]',
             'companies = ["beta"]']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def unix_rx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    """A receiver on a Unix socket: the config file's webhook `cfg` POSTs beta's incoming messages to it."""
    with Receiver(SECRET, unix=tmp_path_factory.mktemp("rx") / "hooks.sock") as rx:
        yield rx


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory, unix_rx: Receiver) -> Iterator[SimDaemon]:
    """A daemon with companies acme and beta connected and the config webhook `cfg`."""
    with daemon_pool(tmp_path_factory.mktemp("webhooks")) as make:
        d = make(sim_config("acme", "beta", workers=SLOW_BOOT, webhook_delivery=DELIVERY) + webhook_config(unix_rx.url))
        yield d.start_paired("acme", "beta")
        assert d.stop() == 0


@pytest.fixture
def rx() -> Iterator[Receiver]:
    """A receiver on 127.0.0.1."""
    with Receiver(SECRET) as receiver:
        yield receiver


def put(d: SimDaemon, webhook_id: str, body: dict[str, Any]) -> Any:
    return d.client.request("PUT", f"/v1/webhooks/{webhook_id}", body)


def delete(d: SimDaemon, webhook_id: str) -> Any:
    return d.client.request("DELETE", f"/v1/webhooks/{webhook_id}")


def status(d: SimDaemon, webhook_id: str) -> dict[str, Any]:
    response = d.client.get(f"/v1/webhooks/{webhook_id}")
    assert response.status == 200, response.body
    return dict(response.json())


def burst(d: SimDaemon, company: str, count: int, text: str, rate: float | None = None) -> None:
    args: dict[str, Any] = {"count": count, "text": text}
    if rate is not None:
        args["rate"] = rate
    response = d.simulate(company, "burst", **args)
    assert response.status == 200 and response.json()["emitted"] == count, response.body


def texts(deliveries: list[Delivery], company: str, prefix: str) -> list[str]:
    return [d.event["text"] for d in deliveries
            if d.event.get("company") == company and str(d.event.get("text", "")).startswith(prefix + " ")]


def numbered(prefix: str, count: int) -> list[str]:
    return [f"{prefix} {n}" for n in range(1, count + 1)]


def has_all(company: str, prefix: str, count: int) -> Any:
    want = set(numbered(prefix, count))
    return lambda got: want <= set(texts(got, company, prefix))


# --------------------------------------------------------------------------- in-process units


def test_config_webhooks_are_checked_with_every_problem_named():
    """[[webhooks]]: a bad id, URL, secret, event type or company is refused, each problem on its line."""
    good = build_config({"webhooks": [{"id": "crm", "url": "unix:/run/crm/hooks.sock:/whatsapp", "secret": SECRET,
                                       "events": ["message.status"], "companies": ["acme"]}]}, "t")
    hook = good.webhooks[0]
    assert hook.target.socket == "/run/crm/hooks.sock" and hook.target.url == "http://localhost/whatsapp"
    assert hook.wants("acme", "message.status") and not hook.wants("beta", "message.status")
    bad = [{"id": "Bad", "url": "ftp://example.com/x", "secret": "short", "events": ["message.sent"],
            "companies": ["Not_Valid"], "colour": 1},
           {"id": "a", "url": "https://user:pw@example.com/x", "secret": SECRET},
           {"id": "b", "url": "unix:relative.sock:/x", "secret": SECRET},
           {"id": "c", "url": "http://example.com/x"},
           {"id": "d", "url": "http://example.com/x", "secret": SECRET}, {"id": "d", "url": "http://example.org/", "secret": SECRET}]
    with pytest.raises(ConfigError) as caught:
        build_config({"webhooks": bad}, "t")
    problems = "\n".join(caught.value.problems)
    for expected in ("colour: unknown key", "'Bad' is not a valid webhook id", "expected an http",
                     "secret: expected 16", "unknown event types 'message.sent'", "'Not_Valid' is not a valid company",
                     "credentials in the URL are refused", 'expected "unix:/absolute/path', "secret: missing",
                     "duplicate webhook id"):
        assert expected in problems, problems


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body():
    """sign() is "sha256=" + hex HMAC-SHA256(secret, "<timestamp>.<body>"), what the README tells receivers."""
    body = b'{"seq":1,"type":"message.incoming"}'
    expected = hmac.new(SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1700000000, body) == f"sha256={expected}"


def test_the_readme_node_snippet_verifies_a_signature_and_rejects_a_forgery(tmp_path: Path):
    """The README's Node verification snippet accepts what the daemon signs and refuses a changed body."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    snippet = re.search(r"```js\n(// Verify a whatsappd webhook.*?)```", readme, re.S)
    assert snippet is not None, "the README's Node snippet is missing"
    body = '{"seq":7,"type":"message.incoming","text":"olá"}'
    now = int(time.time())
    script = snippet.group(1) + f"""
const body = Buffer.from({body!r}, "utf8");
const ok = verifyWhatsappd({SECRET!r}, "{now}", "{sign(SECRET, now, body.encode())}", body);
const forged = verifyWhatsappd({SECRET!r}, "{now}", "{sign(SECRET, now, body.encode())}", Buffer.from("{{}}"));
const stale = verifyWhatsappd({SECRET!r}, "{now - 3600}", "{sign(SECRET, now - 3600, body.encode())}", body);
console.log(JSON.stringify([ok, forged, stale]));
"""
    (tmp_path / "verify.js").write_text(script)
    out = subprocess.run([node, str(tmp_path / "verify.js")], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "[true,false,false]", out.stderr


# ---------------------------------------------------------------------------- delivery


def test_ten_thousand_events_reach_tcp_and_unix_receivers_in_company_order_signed(sim, unix_rx, rx):
    """10,000 incoming events (two companies at once) reach a 127.0.0.1 receiver, and beta's 5,000 a
    Unix-socket one, each exactly once, in seq order and so in order per company, each validly signed."""
    assert put(sim, "bulk", {"url": rx.url, "secret": SECRET}).status == 201
    threads = [threading.Thread(target=burst, args=(sim, company, 5000, "ten")) for company in ("acme", "beta")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for receiver, companies in ((rx, ("acme", "beta")), (unix_rx, ("beta",))):
        got = receiver.wait_accepted(lambda g: all(has_all(c, "ten", 5000)(g) for c in companies),  # noqa: B023
                                     timeout=60, what="every event")
        mine = [d for d in got if str(d.event.get("text", "")).startswith("ten ")]
        assert len(mine) == 5000 * len(companies)  # each once
        for company in companies:
            assert texts(mine, company, "ten") == numbered("ten", 5000)
        seqs = [d.event["seq"] for d in mine]
        assert seqs == sorted(seqs)
        assert all(d.signature_ok for d in mine)
        assert all(d.headers["X-Whatsappd-Seq"] == str(d.event["seq"]) for d in mine)
        assert {d.headers["X-Whatsappd-Webhook"] for d in mine} == ({"cfg"} if receiver is unix_rx else {"bulk"})
    assert delete(sim, "bulk").status == 200


def test_a_receiver_that_fails_then_hangs_then_recovers_gets_every_event_once(sim, rx):
    """500s, then no answer at all, then 200s: the webhook goes failing, says why, and once the
    receiver is back every event is acknowledged exactly once, in order; nothing is lost."""
    assert put(sim, "flaky", {"url": rx.url, "secret": SECRET, "companies": ["acme"]}).status == 201
    rx.mode = "error"
    burst(sim, "acme", 50, "flaky-a")
    failing = wait_until(lambda: (s := status(sim, "flaky"))["state"] == "failing" and s, timeout=10, what="failing")
    assert failing["last_error"]["message"] == "answered HTTP 500" and failing["lag"] > 0
    rx.mode = "hang"
    burst(sim, "acme", 50, "flaky-b")
    hung = wait_until(lambda: "no answer within 1s" in ((s := status(sim, "flaky"))["last_error"] or {}).get("message", "")
                      and s, timeout=10, what="a timeout")
    assert hung["state"] == "failing"
    time.sleep(1.2)  # one more hung attempt
    rx.mode = "ok"
    got = rx.wait_accepted(lambda g: has_all("acme", "flaky-b", 50)(g), timeout=15, what="every event")
    assert texts(got, "acme", "flaky-a") == numbered("flaky-a", 50)  # once each, in order
    assert texts(got, "acme", "flaky-b") == numbered("flaky-b", 50)
    never_answered = [d for d in rx.requests if d.answered is None]
    assert never_answered  # the receiver saw them; they were sent again, and acknowledged once
    accepted_seqs = [d.event["seq"] for d in got]
    assert {d.event["seq"] for d in never_answered} <= set(accepted_seqs)
    back = status(sim, "flaky")
    assert back["state"] == "ok" and back["consecutive_failures"] == 0 and back["failures"] >= 3
    assert back["lost_events"] == 0
    assert delete(sim, "flaky").status == 200


def test_a_redirect_is_never_followed(sim, rx):
    """A 3xx answer is a failure naming the Location; the URL it points to gets nothing."""
    with Receiver(SECRET) as elsewhere:
        rx.mode, rx.redirect_to = "redirect", elsewhere.url
        assert put(sim, "moved", {"url": rx.url, "secret": SECRET, "companies": ["beta"]}).status == 201
        burst(sim, "beta", 1, "moved")
        error = wait_until(lambda: status(sim, "moved")["last_error"], timeout=10, what="a failure")
        assert "307" in error["message"] and "never followed" in error["message"] and elsewhere.url in error["message"]
        time.sleep(0.5)
        assert elsewhere.requests == []
    assert delete(sim, "moved").status == 200


def test_a_dead_webhook_does_not_hold_back_another(sim, rx):
    """With one receiver never answering, another webhook still gets every event promptly."""
    with Receiver(SECRET) as dead:
        dead.mode = "hang"
        assert put(sim, "dead", {"url": dead.url, "secret": SECRET, "companies": ["beta"]}).status == 201
        assert put(sim, "alive", {"url": rx.url, "secret": SECRET, "companies": ["beta"]}).status == 201
        started = time.monotonic()
        burst(sim, "beta", 200, "alive")
        rx.wait_accepted(has_all("beta", "alive", 200), timeout=10, what="200 events")
        assert time.monotonic() - started < 5  # far less than one hung attempt per event would take
        assert len(dead.requests) <= 4  # the dead one is still on its first event
        assert delete(sim, "dead").status == 200 and delete(sim, "alive").status == 200


# --------------------------------------------------------------------------------- the API


def test_put_validates_and_the_secret_is_never_shown(sim, rx):
    """PUT refuses a bad body with invalid_webhook (problems listed) and a bad id with
    invalid_webhook_id; no answer holds the secret; an update without secret keeps it."""
    bad = put(sim, "x", {"url": "ftp://example.com/", "secret": "short", "events": ["nope"]})
    assert bad.status == 400 and bad.json()["error"]["code"] == "invalid_webhook"
    assert len(bad.json()["error"]["problems"]) == 3
    assert put(sim, "x", []).json()["error"]["code"] == "invalid_webhook"
    assert put(sim, "x", {"id": "y", "url": rx.url, "secret": SECRET}).json()["error"]["code"] == "invalid_webhook"
    assert put(sim, "Bad_Id", {"url": rx.url, "secret": SECRET}).json()["error"]["code"] == "invalid_webhook_id"
    assert put(sim, "x", {"url": rx.url}).json()["error"]["problems"][0].startswith("secret: missing")
    assert sim.client.get("/v1/webhooks/none").json()["error"]["code"] == "webhook_not_found"
    assert delete(sim, "none").status == 404
    created = put(sim, "api", {"url": rx.url, "secret": SECRET, "events": ["message.incoming"], "companies": ["beta"]})
    assert created.status == 201
    updated = put(sim, "api", {"url": rx.url, "companies": ["beta"]})  # the secret left out: kept
    assert updated.status == 200 and updated.json()["events"] == []
    for response in (created, updated, sim.client.get("/v1/webhooks"), sim.client.get("/v1/webhooks/api")):
        assert SECRET.encode() not in response.body and response.json()
    burst(sim, "beta", 1, "kept")
    got = rx.wait_accepted(has_all("beta", "kept", 1), timeout=10)
    assert all(d.signature_ok for d in got)
    assert delete(sim, "api").json() == {"id": "api", "removed": True, "cursor": status_cursor(got)}
    assert sim.client.get("/v1/webhooks/api").status == 404


def status_cursor(got: list[Delivery]) -> Any:
    return got[-1].event["seq"] if got else None


def test_a_config_webhook_cannot_be_changed_or_deleted_through_the_api(sim, unix_rx):
    """PUT or DELETE on a webhook of the config file is 409 defined_in_config; GET lists it as source config."""
    for response in (put(sim, "cfg", {"url": unix_rx.url, "secret": SECRET}), delete(sim, "cfg")):
        assert response.status == 409 and response.json()["error"]["code"] == "defined_in_config"
    listed = {w["id"]: w for w in sim.client.get("/v1/webhooks").json()["webhooks"]}
    assert listed["cfg"]["source"] == "config" and listed["cfg"]["url"] == unix_rx.url
    assert "secret" not in listed["cfg"] and listed["cfg"]["has_secret"] is True


def test_whatsappctl_webhooks_shows_cursor_lag_state_and_last_error(sim):
    """`whatsappctl webhooks` prints one line per webhook: id, state, cursor, lag, last error."""
    out = run_ctl("webhooks", "--socket", str(sim.socket_path))
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:5] == ["ID", "STATE", "CURSOR", "LAG", "SOURCE"]
    assert any(row.split()[0] == "cfg" and row.split()[1] == "ok" for row in rows), out.stdout
    as_json = run_ctl("webhooks", "--json", "--socket", str(sim.socket_path))
    assert "cfg" in {w["id"] for w in __import__("json").loads(as_json.stdout)["webhooks"]}


def with_api_webhook(make: Any, webhook_id: str) -> tuple[SimDaemon, str]:
    """A started daemon with company acme and an API webhook; and its config file's text."""
    d = make(sim_config("acme"))
    d.start(timeout=30)
    assert put(d, webhook_id, {"url": "http://127.0.0.1:9/api", "secret": SECRET}).status == 201
    assert d.config_path is not None
    return d, d.config_path.read_text()


def test_a_reload_gives_the_config_file_precedence_and_gives_back_the_api_webhook(tmp_path):
    """A config webhook added by reload takes over an API one of the same id (same cursor); removed
    from the file again, the API one comes back; check-config never prints a secret."""
    with daemon_pool(tmp_path) as make:
        d, plain = with_api_webhook(make, "crm")
        d.config_path.write_text(plain + "[[webhooks]]\nid = \"crm\"\nurl = \"http://127.0.0.1:9/file\"\n"
                                 f"secret = \"{SECRET}-file\"\n")
        assert d.client.post("/v1/reload").status == 200
        taken = status(d, "crm")
        assert (taken["source"], taken["url"]) == ("config", "http://127.0.0.1:9/file")
        assert put(d, "crm", {"url": "http://127.0.0.1:9/api"}).json()["error"]["code"] == "defined_in_config"
        checked = subprocess.run([sys.executable, "-m", "whatsappd", "check-config", "--config", str(d.config_path)],
                                 capture_output=True, text=True, timeout=30)
        assert "[[webhooks]]" in checked.stdout and SECRET not in checked.stdout + checked.stderr
        d.config_path.write_text(plain)
        assert d.client.post("/v1/reload").status == 200
        back = status(d, "crm")
        assert (back["source"], back["url"], back["cursor"]) == ("runtime", "http://127.0.0.1:9/api", taken["cursor"])
        assert d.stop() == 0


def test_a_reload_answers_which_webhooks_it_added_changed_and_removed(tmp_path):
    """/v1/reload's `webhooks` names the ids started, restarted (new definition, or the file shadowing an
    API one) and stopped, apart from the company ids; whatsappctl reload prints them; no change: all empty."""
    with daemon_pool(tmp_path) as make:
        d, plain = with_api_webhook(make, "crm")

        def hook(webhook_id: str, route: str) -> str:
            return f'[[webhooks]]\nid = "{webhook_id}"\nurl = "http://127.0.0.1:9/{route}"\nsecret = "{SECRET}"\n'

        d.config_path.write_text(plain + hook("crm", "file") + hook("audit", "a") + hook("old", "o"))
        first = d.client.post("/v1/reload").json()
        assert first["webhooks"] == {"added": ["audit", "old"], "changed": ["crm"], "removed": []}
        assert (first["added"], first["changed"], first["removed"]) == ([], [], [])  # companies: none
        d.config_path.write_text(plain + hook("crm", "file") + hook("audit", "a2"))
        second = d.client.post("/v1/reload").json()
        assert second["webhooks"] == {"added": [], "changed": ["audit"], "removed": ["old"]}
        d.config_path.write_text(plain + hook("audit", "a2"))
        out = run_ctl("reload", "--socket", str(d.socket_path))
        assert out.returncode == 0 and "webhooks changed crm" in out.stdout, out.stdout + out.stderr  # the API one, back
        assert status(d, "crm")["source"] == "runtime"
        assert d.client.post("/v1/reload").json()["webhooks"] == {"added": [], "changed": [], "removed": []}
        assert d.stop() == 0


# ------------------------------------------------------------------ crashes and retention


@BOTH_STORES
def test_a_daemon_killed_mid_delivery_resumes_from_the_stored_cursor(tmp_path, rx, store_table):
    """kill -9 while 2,000 events are being delivered: after a restart every one is acknowledged,
    in order, and the ones sent twice are no more than the deliveries of one cursor write (on
    either store backend)."""
    with daemon_pool(tmp_path) as make:
        d = make(sim_config("acme", workers=SLOW_BOOT, webhook_delivery=DELIVERY),
                 store=store_table).start_paired("acme")
        assert put(d, "crm", {"url": rx.url, "secret": SECRET}).status == 201
        rx.delay = 0.002
        burst(d, "acme", 2000, "k")
        rx.wait_accepted(lambda g: len(g) >= 300, timeout=30, what="300 deliveries")
        d.kill()
        before = len(rx.accepted())
        assert before < 2000
        rx.delay = 0.0
        d.start(timeout=30)
        got = rx.wait_accepted(has_all("acme", "k", 2000), timeout=30, what="every event after the restart")
        delivered = texts(got, "acme", "k")
        first_seen = list(dict.fromkeys(delivered))
        assert first_seen == numbered("k", 2000)
        duplicates = len(delivered) - 2000
        assert duplicates <= 20, duplicates  # at most what was delivered while one cursor write ran
        assert d.stop() == 0


def test_events_pruned_before_delivery_are_reported_lost(tmp_path, rx):
    """Events the journal pruned while the receiver was down are counted lost (status, metric,
    log), never silently skipped: every event is either delivered or inside the reported range."""
    with daemon_pool(tmp_path) as make:
        d = make(sim_config("acme", workers=SLOW_BOOT, webhook_delivery=DELIVERY,
                            journal={"max_events": 1000})).start_paired("acme")
        rx.mode = "error"
        assert put(d, "crm", {"url": rx.url, "secret": SECRET, "events": ["message.incoming"]}).status == 201
        burst(d, "acme", 2500, "p")  # more than one read batch (500) beyond what the journal keeps
        assert d.stop() == 0
        mark = d.log_mark()
        d.start(timeout=30)  # the journal is pruned at start, to its newest 1,000
        wait_until(lambda: d.log_lines("journal pruned", mark), timeout=10, what="the prune")
        rx.mode = "ok"
        lost = wait_until(lambda: (s := status(d, "crm"))["lost_events"] and s, timeout=10, what="lost events")
        got = rx.wait_accepted(lambda g: "p 2500" in texts(g, "acme", "p"), timeout=20, what="the last event")
        delivered = {e.event["seq"] for e in got}
        lost_range = set(range(lost["last_lost"]["first_seq"], lost["last_lost"]["last_seq"] + 1))
        seqs = sorted(delivered)
        assert lost["lost_events"] == len(lost_range) > 0
        assert not (delivered & lost_range)
        # Every seq from the first event up to the last: delivered, or inside the reported range.
        first = min(seqs[0], min(lost_range))
        missing = [s for s in range(first, seqs[-1] + 1) if s not in delivered and s not in lost_range]
        assert missing == []
        assert d.log_lines("webhook events lost: pruned from the journal before they were delivered", mark)
        metrics = d.client.get("/v1/metrics").body.decode()
        assert metric_value(metrics, "whatsappd_webhook_events_lost_total", webhook="crm") == len(lost_range)
        assert d.stop() == 0

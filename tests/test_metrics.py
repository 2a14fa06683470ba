"""Prometheus metrics: the plain-HTTP listener, what it serves, and `[metrics] listen`.

One daemon with three simulator companies serves the module: companies paired, one restarted
(a connect with a stored session, which is timed), messages sent while a live event reader
follows the stream; then its TCP listener is scraped and parsed with prometheus_client.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from whatsappd.config import ConfigError, load_config
from whatsappd.daemon import Daemon
from whatsappd.testing.daemon import at_once
from whatsappd.testing.events import EventReader
from whatsappd.testing.metrics import metric_value, samples
from whatsappd.testing.scenario import SimDaemon, daemon_pool, sim_config

COMPANIES = ("alpha", "beta", "gamma")
SENT = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


class Monitored:
    def __init__(self, daemon: SimDaemon, port: int, streamed: int) -> None:
        self.daemon, self.port, self.streamed = daemon, port, streamed
        status, self.content_type, self.text = http_get(port, "/metrics")
        assert status == 200, self.text


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    """The module's daemon after pairing, a restart and SENT sends to beta, with its first scrape."""
    port = free_port()
    with daemon_pool(tmp_path_factory.mktemp("metrics")) as make:
        d = make(sim_config(*COMPANIES, metrics={"listen": f"127.0.0.1:{port}"}))
        d.start(timeout=30)
        at_once([lambda c=c: d.pair(c, timeout=30) for c in COMPANIES])  # type: ignore[misc]
        assert d.post("alpha", "restart").ok
        d.wait_state("alpha", "connected", timeout=30)
        with EventReader(d.socket_path, "type=message.status&company=beta") as reader:
            for n in range(SENT):
                response = d.client.post("/v1/companies/beta/messages?wait=sent", {"to": "+5511999990001", "text": f"m{n}"})
                assert response.status == 202 and response.json()["status"] == "sent", response.body
            streamed = len(reader.wait_count(SENT * 3, type_="message.status"))  # queued, sending, sent
        yield Monitored(d, port, streamed)
        assert d.stop() == 0


def test_the_tcp_listener_serves_every_company_s_series(monitored: Monitored) -> None:
    """GET /metrics on the TCP listener parses with prometheus_client and has each company's state,
    connection, restarts, outbox depth and worker memory."""
    text = monitored.text
    assert monitored.content_type.startswith("text/plain; version=0.0.4")
    for company in COMPANIES:
        assert metric_value(text, "whatsappd_connected", company=company) == 1
        assert metric_value(text, "whatsappd_company_state", company=company, state="connected") == 1
        assert metric_value(text, "whatsappd_company_state", company=company, state="pairing") == 0
        assert metric_value(text, "whatsappd_outbox_pending_messages", company=company) == 0
        assert (metric_value(text, "whatsappd_worker_resident_memory_bytes", company=company) or 0) > 1_000_000
        assert (metric_value(text, "whatsappd_company_state_changed_timestamp_seconds", company=company) or 0) > 0
    assert (metric_value(text, "whatsappd_worker_restarts_total", company="alpha") or 0) >= 1
    assert metric_value(text, "whatsappd_worker_restarts_total", company="gamma") == 0
    assert metric_value(text, "whatsappd_companies", state="connected") == len(COMPANIES)
    assert metric_value(text, "whatsappd_messages_total", company="beta", status="sent") == SENT
    assert metric_value(text, "whatsappd_outbox_messages", status="sent") == SENT
    assert (metric_value(text, "whatsappd_state_filesystem_avail_bytes") or 0) > 0
    assert (metric_value(text, "process_resident_memory_bytes") or 0) > 0


def test_send_connect_and_stream_lag_are_histograms(monitored: Monitored) -> None:
    """Send latency (queued->sent, sending->sent), connect duration and event stream lag are
    histograms with counts that match what happened, and +Inf buckets equal to the counts."""
    families = {f.name: f for f in text_string_to_metric_families(monitored.text)}
    expected = {"whatsappd_message_send_latency_seconds": SENT, "whatsappd_message_ack_latency_seconds": SENT,
                "whatsappd_connect_duration_seconds": 1, "whatsappd_event_stream_lag_seconds": monitored.streamed}
    for name, at_least in expected.items():
        family = families[name]
        assert family.type == "histogram", name
        values = {(s.name, s.labels.get("le")): s.value for s in family.samples}
        count = values[(f"{name}_count", None)]
        assert count >= at_least, (name, count)
        assert values[(f"{name}_bucket", "+Inf")] == count
        assert values[(f"{name}_sum", None)] >= 0
    # Pairing is not timed as a connect: only alpha's restart is (gamma and beta paired).
    assert metric_value(monitored.text, "whatsappd_connect_duration_seconds_count") == 1


def test_the_listener_serves_only_the_metrics_and_speaks_openmetrics(monitored: Monitored) -> None:
    """Any other path on the TCP listener is a 404 (the control API is never there); an
    OpenMetrics Accept header gets OpenMetrics that its parser reads."""
    for path in ("/", "/v1/health", "/v1/companies", "/v1/metrics"):
        assert http_get(monitored.port, path)[0] == 404, path
    status, content_type, text = http_get(monitored.port, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    names = {f.name for f in openmetrics_families(text)}
    assert {"whatsappd_connected", "whatsappd_worker_restarts", "whatsappd_message_send_latency_seconds"} <= names


def test_the_control_socket_serves_the_same_series(monitored: Monitored) -> None:
    """GET /v1/metrics on the control socket has the same series as the TCP listener."""
    socket_text = monitored.daemon.client.get("/v1/metrics").body.decode()
    assert {(s.name, tuple(sorted(s.labels.items()))) for s in samples(socket_text)} >= {
        (s.name, tuple(sorted(s.labels.items()))) for s in samples(monitored.text) if s.name.startswith("whatsappd_")
        and not s.name.startswith(("whatsappd_event_stream_lag", "whatsappd_uptime"))}


def test_two_daemons_in_one_process_keep_their_metrics_apart(tmp_path: Path) -> None:
    """Each daemon has its own registry: two in one process both build (no duplicate series
    error), each lists only its own companies, and the library's global registry has none."""
    texts = []
    for name in ("one", "two"):
        (tmp_path / f"{name}.toml").write_text(
            f'[daemon]\nstate_dir = "{tmp_path / name}"\n[[companies]]\nid = "{name}"\nengine = "simulator"\n')
        daemon = Daemon(load_config(tmp_path / f"{name}.toml"), None)
        texts.append(generate_latest(daemon.metrics.registry).decode())
    for text, own, other in ((texts[0], "one", "two"), (texts[1], "two", "one")):
        assert metric_value(text, "whatsappd_up") == 1
        assert metric_value(text, "whatsappd_connected", company=own) == 0
        assert metric_value(text, "whatsappd_connected", company=other) is None
    assert not any(s.name.startswith("whatsappd_") for s in samples(generate_latest(REGISTRY).decode()))


@pytest.mark.parametrize(("value", "problem"), [
    ("metrics.example.com:9464", "is not an IP address"),
    ("127.0.0.1", 'expected "HOST:PORT"'),
    ("127.0.0.1:0", "port must be a number from 1 to 65535"),
    ("127.0.0.1:65536", "port must be a number from 1 to 65535"),
    ("[::1]:http", "port must be a number from 1 to 65535"),
    (9464, 'expected "HOST:PORT"'),
])
def test_a_bad_listen_address_is_refused_at_load(tmp_path: Path, value: object, problem: str) -> None:
    """metrics.listen that is not IP:PORT is a config error naming the setting and the fix."""
    path = tmp_path / "whatsappd.toml"
    path.write_text(f"[metrics]\nlisten = {value!r}\n".replace("'", '"'))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert any(p.startswith("metrics.listen") and problem in p for p in raised.value.problems), raised.value.problems


def test_listen_addresses_that_are_accepted(tmp_path: Path) -> None:
    """Off by default; loopback IPv4/IPv6 and localhost are accepted; a non-loopback address is
    accepted only written out as an IP (and is then flagged as not loopback)."""
    path = tmp_path / "whatsappd.toml"
    path.write_text("")
    assert load_config(path).metrics_listen is None
    for value, shown, loopback in (("127.0.0.1:9464", "127.0.0.1:9464", True), ("[::1]:9464", "[::1]:9464", True),
                                   ("localhost:9464", "127.0.0.1:9464", True), ("0.0.0.0:9464", "0.0.0.0:9464", False)):
        path.write_text(f'[metrics]\nlisten = "{value}"\n')
        listen = load_config(path).metrics_listen
        assert listen is not None and str(listen) == shown and listen.loopback is loopback


def test_a_taken_port_stops_the_start_with_one_clear_line(tmp_path: Path) -> None:
    """A metrics port already in use stops the daemon's start (exit 1) with a line naming the
    address and the fix, and leaves no control socket behind."""
    with socket.socket() as taken, daemon_pool(tmp_path) as make:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        d = make(sim_config(metrics={"listen": f"127.0.0.1:{port}"}))
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(30) == 1
        lines = [e for e in d.log_events() if e.get("event") == "cannot start: the metrics listener cannot bind"]
        assert lines and lines[0]["address"] == f"127.0.0.1:{port}" and "metrics.listen" in lines[0]["hint"]
        assert not Path(d.socket_path).exists()

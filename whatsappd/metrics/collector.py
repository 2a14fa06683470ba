"""The daemon's Prometheus metrics, built on prometheus_client with one registry per daemon.

Three kinds of figures, all in `DaemonMetrics.registry` (never the library's global registry,
so several daemons in one test process each expose only their own):

- series read when Prometheus scrapes (`_Collector`): the daemon-wide ones (`_daemon_series`)
  and one sample per company for each entry of `DaemonMetrics.company_series`. An area that
  wants a per-company figure adds one `CompanySeries` there (docs/INTERNALS.md, "Metrics");
- histograms and counters fed as things happen: `on_commit` (a store commit listener, wired
  in daemon.py) times sends and connects from the journal's own events; the event stream
  handler observes the lag of what it writes (control/events.py);
- the daemon process itself (`process_*`: CPU, memory, open files, start time).

A scrape first reads the outbox figures from the store (`exposition`, async), then renders
the registry from memory; the collector itself never blocks the loop on the database.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from whatsappd import __version__
from whatsappd.logs import get_logger
from whatsappd.states import State
from whatsappd.store import STATUSES, Event, MessageStatus, Secret, StoreBackend, StoreError

if TYPE_CHECKING:
    from whatsappd.supervisor import Runner, Supervisor

__all__ = ["CompanySeries", "DaemonMetrics"]

log = get_logger()

# A `<name>_created` sample beside every counter and histogram child (the library's default)
# doubles the series Prometheus stores for a figure nobody reads; the daemon process is ours.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Statuses of a message not yet handed to WhatsApp: the outbox's depth.
PENDING = (MessageStatus.QUEUED, MessageStatus.SENDING)
#: Messages remembered between their `queued`/`sending` event and their `sent` one, at most
#: (a bound on memory if a burst is queued while a company is down; older ones are not timed).
MAX_TIMED_MESSAGES = 100_000
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class CompanySeries:
    """One per-company series: `value(runner)` is read at each scrape.

    value returns a number, None for no sample of that company, or with `label` set a mapping
    {label value: number} (several samples, e.g. one per state)."""

    name: str
    documentation: str
    value: Callable[[Runner], float | Mapping[str, float] | None]
    kind: str = "gauge"  # or "counter" (then name ends in _total)
    label: str | None = None


class DaemonMetrics:
    def __init__(self, supervisor: Supervisor, store: StoreBackend, readers: Callable[[], int],
                 state_dir: Callable[[], Path], started_at: float) -> None:
        self.supervisor = supervisor
        self.store = store
        self._readers = readers
        self._state_dir = state_dir
        self.started_at = started_at
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        reg = self.registry
        self.send_latency = Histogram(
            "whatsappd_message_send_latency_seconds",
            "From a message being queued to WhatsApp's server acknowledging it (status sent): what the CRM waits.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600), registry=reg)
        self.ack_latency = Histogram(
            "whatsappd_message_ack_latency_seconds",
            "From a send being handed to the company's worker (status sending) to WhatsApp's acknowledgement "
            "(status sent): the network and server part of the send.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=reg)
        self.connect_duration = Histogram(
            "whatsappd_connect_duration_seconds",
            "From a company's worker starting (state starting) to connected, for connects with a stored "
            "session (a connect through pairing waits for a person and is not counted).",
            buckets=(0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=reg)
        self.stream_lag = Histogram(
            "whatsappd_event_stream_lag_seconds",
            "From an event's commit to the journal to its write to a live GET /v1/events reader.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5), registry=reg)
        self.stream_cutoffs = Counter(
            "whatsappd_event_stream_cutoffs_total",
            "Live event stream readers cut off for falling too far behind (they resume from their last seq).",
            registry=reg)
        self.messages = Counter(
            "whatsappd_messages_total",
            "Outgoing messages that reached each status, per company (since the daemon started).",
            ["company", "status"], registry=reg)
        self._queued_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._sending_at: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._starting_at: dict[str, float] = {}
        self._outbox: dict[tuple[str, str], tuple[int, float]] = {}
        #: The per-company series, read at each scrape. Add one entry for a new figure.
        self.company_series: list[CompanySeries] = [
            CompanySeries("whatsappd_connected", "Whether a company is connected (1) or not (0).",
                          lambda r: int(r.state is State.CONNECTED)),
            CompanySeries("whatsappd_company_state", "A company's connection state: 1 for the state it is in.",
                          lambda r: {str(s): int(r.state is s) for s in State}, label="state"),
            CompanySeries("whatsappd_company_state_changed_timestamp_seconds",
                          "When the company entered its current state (Unix time).", lambda r: r.since),
            CompanySeries("whatsappd_worker_restarts_total", "Worker restarts per company.",
                          lambda r: r.restarts, kind="counter"),
            CompanySeries("whatsappd_worker_resident_memory_bytes", "Resident memory of the company's worker process.",
                          lambda r: _resident_bytes(r.worker.pid) if r.worker is not None else None),
            CompanySeries("whatsappd_outbox_pending_messages",
                          "Outgoing messages not yet handed to WhatsApp (queued or sending): the outbox's depth.",
                          lambda r: sum(self._outbox.get((r.id, s), (0, 0.0))[0] for s in PENDING)),
            CompanySeries("whatsappd_outbox_oldest_pending_timestamp_seconds",
                          "When the oldest pending (queued or sending) message was queued (Unix time); no sample "
                          "when none is pending.", lambda r: self._oldest_pending(r.id)),
        ]
        reg.register(_Collector(self))

    # ------------------------------------------------------------------ fed as things happen

    def on_commit(self, event: Event, secret: Secret) -> None:
        """A committed journal event (a store commit listener): time sends and connects from it."""
        if event.type == "message.status":
            self._message_status(event)
        elif event.type == "company.state" and event.company is not None:
            self._company_state(event.company, str(event.data.get("new")), event.at)

    def _message_status(self, event: Event) -> None:
        message_id, status = str(event.data.get("message_id")), str(event.data.get("status"))
        if event.company is not None and status in STATUSES:
            self.messages.labels(event.company, status).inc()
        if status == MessageStatus.QUEUED:
            if message_id not in self._queued_at:  # back to queued after a failed try: still the first queueing
                _remember(self._queued_at, message_id, event.at)
        elif status == MessageStatus.SENDING:
            _remember(self._sending_at, message_id, event.at)
        elif status in (MessageStatus.SENT, MessageStatus.FAILED, MessageStatus.EXPIRED):
            queued, sending = self._queued_at.pop(message_id, None), self._sending_at.pop(message_id, None)
            if status == MessageStatus.SENT:
                if queued is not None:
                    self.send_latency.observe(max(0.0, event.at - queued))
                if sending is not None:
                    self.ack_latency.observe(max(0.0, event.at - sending))

    def _company_state(self, company: str, new: str, at: float) -> None:
        if new == State.STARTING:
            self._starting_at.setdefault(company, at)  # a restart before connecting keeps the first start
        elif new == State.CONNECTED:
            started = self._starting_at.pop(company, None)
            if started is not None:
                self.connect_duration.observe(max(0.0, at - started))
        elif new not in (State.CONNECTING, State.RECONNECTING):
            self._starting_at.pop(company, None)  # pairing, or an ending: this connect is not timed

    def observe_stream_lag(self, committed: list[float]) -> None:
        """Events committed at these time.monotonic() instants were just written to a reader."""
        now = time.monotonic()
        for at in committed:
            self.stream_lag.observe(max(0.0, now - at))

    # ---------------------------------------------------------------------------- scraping

    async def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in the format the Accept header asks for (OpenMetrics or text 0.0.4)."""
        try:
            self._outbox = await self.store.counts_by_company()
        except StoreError as exc:  # the rest of the figures still say what is going on
            log.warning("metrics: cannot read the outbox figures", error=str(exc))
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def _oldest_pending(self, company: str) -> float | None:
        times = [self._outbox[(company, s)][1] for s in PENDING if (company, s) in self._outbox]
        return min(times) if times else None

    def _daemon_series(self) -> Iterator[Metric]:
        yield _gauge("whatsappd_up", "1 while the daemon runs.", 1)
        info = GaugeMetricFamily("whatsappd_build_info", "The daemon's version (value 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield _gauge("whatsappd_uptime_seconds", "Seconds since the daemon started.", time.time() - self.started_at)
        companies = GaugeMetricFamily("whatsappd_companies", "Companies by connection state.", labels=["state"])
        counts = self.supervisor.counts()
        for state in State:
            companies.add_metric([str(state)], counts.get(str(state), 0))
        yield companies
        outbox = GaugeMetricFamily("whatsappd_outbox_messages", "Outgoing messages by status.", labels=["status"])
        for status in STATUSES:
            outbox.add_metric([str(status)], sum(n for (_, s), (n, _) in self._outbox.items() if s == status))
        yield outbox
        yield _gauge("whatsappd_journal_last_seq", "The newest event's sequence number.", self.store.last_seq)
        yield _gauge("whatsappd_event_readers", "Live event stream readers.", self._readers())
        yield _gauge("whatsappd_storage_full", "1 while the disk holding the store is full (writes refused).",
                     int(self.store.full_since is not None))
        yield CounterMetricFamily("whatsappd_storage_full_refusals", "Writes refused because the disk was full.",
                                  value=self.store.full_refusals)
        try:
            fs = os.statvfs(self._state_dir())
        except OSError:
            return
        yield _gauge("whatsappd_state_filesystem_avail_bytes",
                     "Bytes free for the daemon on the filesystem of its state directory.", fs.f_bavail * fs.f_frsize)
        yield _gauge("whatsappd_state_filesystem_size_bytes",
                     "Size of the filesystem of the daemon's state directory.", fs.f_blocks * fs.f_frsize)
        yield _gauge("whatsappd_state_filesystem_files_free",
                     "Inodes free for the daemon on the filesystem of its state directory.", fs.f_favail)
        yield _gauge("whatsappd_state_filesystem_files",
                     "Inodes on the filesystem of the daemon's state directory.", fs.f_files)

    def _company_families(self) -> Iterator[Metric]:
        runners = sorted(self.supervisor.companies.values(), key=lambda r: r.id)
        for series in self.company_series:
            labels = ["company"] if series.label is None else ["company", series.label]
            family: GaugeMetricFamily | CounterMetricFamily
            if series.kind == "counter":
                family = CounterMetricFamily(series.name, series.documentation, labels=labels)
            else:
                family = GaugeMetricFamily(series.name, series.documentation, labels=labels)
            for runner in runners:
                value = series.value(runner)
                if isinstance(value, Mapping):
                    for key, number in value.items():
                        family.add_metric([runner.id, key], number)
                elif value is not None:
                    family.add_metric([runner.id], value)
            yield family


class _Collector:
    """What prometheus_client calls at each scrape: the daemon-wide and per-company series."""

    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics._daemon_series()
        yield from self._metrics._company_families()


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _remember(times: collections.OrderedDict[str, float], message_id: str, at: float) -> None:
    times[message_id] = at
    times.move_to_end(message_id)
    if len(times) > MAX_TIMED_MESSAGES:
        times.popitem(last=False)


def _resident_bytes(pid: int) -> float | None:
    """A process's resident memory from /proc (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None

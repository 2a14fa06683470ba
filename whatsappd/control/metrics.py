"""GET /v1/metrics: the daemon's figures in Prometheus' text format (0.0.4)."""

from __future__ import annotations

import time

from aiohttp import web

from whatsappd.control.services import services
from whatsappd.states import State
from whatsappd.store import STATUSES

__all__ = ["metrics"]


async def metrics(request: web.Request) -> web.Response:
    parts = services(request)
    supervisor, store = parts.supervisor, parts.store
    lines = [
        "# HELP whatsappd_up 1 while the daemon runs.", "# TYPE whatsappd_up gauge", "whatsappd_up 1",
        "# HELP whatsappd_uptime_seconds Seconds since the daemon started.",
        "# TYPE whatsappd_uptime_seconds gauge", f"whatsappd_uptime_seconds {time.time() - parts.started_at:.3f}",
        "# HELP whatsappd_companies Companies by connection state.", "# TYPE whatsappd_companies gauge",
    ]
    counts = supervisor.counts()
    lines += [f'whatsappd_companies{{state="{s}"}} {counts.get(str(s), 0)}' for s in State]
    runners = sorted(supervisor.companies.values(), key=lambda r: r.id)
    lines += ["# HELP whatsappd_worker_restarts_total Worker restarts per company.",
              "# TYPE whatsappd_worker_restarts_total counter"]
    lines += [f'whatsappd_worker_restarts_total{{company="{r.id}"}} {r.restarts}' for r in runners]
    lines += ["# HELP whatsappd_connected Whether a company is connected (1) or not (0).",
              "# TYPE whatsappd_connected gauge"]
    lines += [f'whatsappd_connected{{company="{r.id}"}} {int(r.state is State.CONNECTED)}' for r in runners]
    outbox = await store.counts()
    lines += ["# HELP whatsappd_outbox_messages Outgoing messages by status.", "# TYPE whatsappd_outbox_messages gauge"]
    lines += [f'whatsappd_outbox_messages{{status="{s}"}} {outbox.get(s, 0)}' for s in STATUSES]
    lines += ["# HELP whatsappd_journal_last_seq The newest event's sequence number.",
              "# TYPE whatsappd_journal_last_seq counter", f"whatsappd_journal_last_seq {store.last_seq}",
              "# HELP whatsappd_event_readers Live event stream readers.", "# TYPE whatsappd_event_readers gauge",
              f"whatsappd_event_readers {len(parts.messaging.subscribers)}",
              "# HELP whatsappd_storage_full 1 while the disk holding the store is full (writes refused).",
              "# TYPE whatsappd_storage_full gauge", f"whatsappd_storage_full {int(store.full_since is not None)}",
              "# HELP whatsappd_storage_full_refusals_total Writes refused because the disk was full.",
              "# TYPE whatsappd_storage_full_refusals_total counter",
              f"whatsappd_storage_full_refusals_total {store.full_refusals}"]
    lines += parts.webhooks.metric_lines()
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain",
                        headers={"X-Content-Format": "prometheus-0.0.4"})

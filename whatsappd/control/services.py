"""What the HTTP face is given to work with: the daemon's parts, named one by one.

The daemon builds a `Services` and passes it to build_app; handlers reach it through the
application (`services(request)`), never through the daemon object, so the control package does
not depend on daemon.py and a reader sees here everything a route can touch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from whatsappd.control.bodies import company_id

if TYPE_CHECKING:
    from whatsappd.cluster.hosts import CrossHost
    from whatsappd.config import Config
    from whatsappd.messaging.service import Messaging
    from whatsappd.metrics.collector import DaemonMetrics
    from whatsappd.store import StoreBackend
    from whatsappd.supervisor import Runner, Supervisor
    from whatsappd.webhooks.delivery import WebhookDelivery

__all__ = ["SERVICES", "Services", "company_runner", "services"]


@dataclass(frozen=True)
class Services:
    """The daemon's parts the routes use; each lives as long as the daemon."""

    #: The running configuration: a function, since a reload replaces it.
    config: Callable[[], Config]
    supervisor: Supervisor
    messaging: Messaging
    store: StoreBackend
    #: GET /v1/health's body.
    health: Callable[[], dict[str, Any]]
    #: Reload the configuration file (reason for the log); its result, also when it failed.
    reload: Callable[[str], Awaitable[dict[str, Any]]]
    #: When the daemon started (time.time()), for the uptime metric.
    started_at: float
    #: The Prometheus registry and the histograms routes feed (the event stream's lag).
    metrics: DaemonMetrics
    #: The webhooks and their delivery (issue 12).
    webhooks: WebhookDelivery
    #: On the PostgreSQL backend: the other hosts (who owns what, acts routed to the owner); None on SQLite.
    cluster: CrossHost | None = None


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def company_runner(request: web.Request) -> Runner:
    """The company the path's {id} names (400 invalid_company_id, 404 company_not_found)."""
    return services(request).supervisor.get(company_id(request))

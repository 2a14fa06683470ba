"""The control API's application: its middlewares and its routes table, nothing else.

HTTP/1.1 with JSON bodies over the Unix control socket (aiohttp). Who may connect, and how
many, is settled when a connection is accepted (listener.py); what every request goes through
is middleware.py; each resource's routes live in their own module.
"""

from __future__ import annotations

from aiohttp import web

from whatsappd.control import backup, companies, doctor, events, imports, messages, metrics, system, webhooks
from whatsappd.control.middleware import MIDDLEWARES
from whatsappd.control.services import SERVICES, Services

__all__ = ["Services", "build_app"]


def build_app(services: Services) -> web.Application:
    config = services.config()
    app = web.Application(
        middlewares=MIDDLEWARES,
        client_max_size=config.control_max_body_size,
        handler_args={"max_field_size": 16 * 1024, "max_line_size": 16 * 1024},
    )
    app[SERVICES] = services
    r = app.router
    r.add_get("/v1/health", system.health)
    r.add_get("/v1/companies", companies.list_companies)
    r.add_get("/v1/companies/{id}", companies.get_company)
    r.add_put("/v1/companies/{id}", companies.put_company)
    r.add_delete("/v1/companies/{id}", companies.delete_company)
    r.add_post("/v1/companies/{id}/connect", companies.connect)
    r.add_get("/v1/companies/{id}/qr", companies.get_qr)
    r.add_post("/v1/companies/{id}/pair-code", companies.pair_code)
    r.add_post("/v1/companies/{id}/logout", companies.logout)
    r.add_post("/v1/companies/{id}/restart", companies.restart)
    r.add_post("/v1/companies/{id}/simulate", companies.simulate)
    r.add_post("/v1/companies/{id}/sending/resume", companies.resume_sending)
    r.add_post("/v1/companies/{id}/import-baileys", imports.import_baileys)
    r.add_post("/v1/companies/{id}/messages", messages.send_message)
    r.add_get("/v1/companies/{id}/messages/{mid}", messages.get_message)
    r.add_get("/v1/companies/{id}/contacts/{phone}", messages.check_contact)
    r.add_get("/v1/companies/{id}/media/{message_id}", messages.get_media)
    r.add_get("/v1/events", events.events)
    r.add_get("/v1/metrics", metrics.metrics)
    r.add_get("/v1/webhooks", webhooks.list_webhooks)
    r.add_get("/v1/webhooks/{id}", webhooks.get_webhook)
    r.add_put("/v1/webhooks/{id}", webhooks.put_webhook)
    r.add_delete("/v1/webhooks/{id}", webhooks.delete_webhook)
    r.add_post("/v1/reload", system.reload)
    r.add_get("/v1/openapi.json", system.openapi)
    r.add_post("/v1/backup", backup.backup)
    r.add_get("/v1/doctor", doctor.doctor)
    return app

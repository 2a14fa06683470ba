"""The webhook routes: list, get, add or replace, delete (README "Webhooks").

A webhook's secret is write-only: no answer ever holds it. A webhook defined in the config file
cannot be changed or deleted here (409 defined_in_config), as for companies.
"""

from __future__ import annotations

from aiohttp import web

from whatsappd.control.bodies import read_resource
from whatsappd.control.services import services
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.webhooks.spec import InvalidWebhook, check_webhook_id, parse_webhook

__all__ = ["delete_webhook", "get_webhook", "list_webhooks", "put_webhook"]


def _webhook_id(request: web.Request) -> str:
    try:
        return check_webhook_id(request.match_info["id"])
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_WEBHOOK_ID, str(exc)) from None


async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": services(request).webhooks.snapshots()})


async def get_webhook(request: web.Request) -> web.Response:
    return web.json_response(services(request).webhooks.get(_webhook_id(request)).snapshot())


async def put_webhook(request: web.Request) -> web.Response:
    webhook_id = _webhook_id(request)
    body = await read_resource(request, webhook_id, ErrorCode.INVALID_WEBHOOK, "url, secret, events, companies")
    delivery = services(request).webhooks
    try:
        definition = parse_webhook({**body, "id": webhook_id}, previous_secret=delivery.runtime_secret(webhook_id))
    except InvalidWebhook as exc:
        raise ApiError(ErrorCode.INVALID_WEBHOOK, "; ".join(exc.problems), problems=exc.problems) from None
    created, hook = await delivery.put(definition)
    return web.json_response(hook.snapshot(), status=201 if created else 200)


async def delete_webhook(request: web.Request) -> web.Response:
    return web.json_response(await services(request).webhooks.delete(_webhook_id(request)))

"""The routes about the daemon itself: health, reload, and the OpenAPI document."""

from __future__ import annotations

from aiohttp import web

from whatsappd import __version__
from whatsappd.control.bodies import read_json
from whatsappd.control.openapi import openapi_document
from whatsappd.control.services import services
from whatsappd.errors import ApiError, ErrorCode

__all__ = ["health", "openapi", "reload"]


async def health(request: web.Request) -> web.Response:
    return web.json_response(services(request).health())


async def reload(request: web.Request) -> web.Response:
    await read_json(request)  # no parameters; a malformed body is still an error
    result = await services(request).reload("api")
    if not result["ok"]:
        raise ApiError(
            ErrorCode.CONFIG_INVALID,
            f"the configuration was not reloaded: {result['source']} is invalid; the previous "
            "configuration stays in force",
            source=result["source"], problems=result["problems"],
        )
    return web.json_response(result)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(__version__))

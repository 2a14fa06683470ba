"""What every request goes through, outermost first (MIDDLEWARES):

- peer: log the request with its peer; check allowed_uids / allowed_groups again, as a reload
  may have narrowed them since the connection was admitted (403 forbidden);
- errors: the one place a failure becomes an answer. Any errors.Failure (raised by a handler,
  the supervisor, messaging or a worker's engine) is answered {"error": {...}} with its code's
  status; aiohttp's own refusals get codes too; anything else is a bug (500, logged);
- body limit: the body is read here, so 413 comes even for handlers that never read it, and a
  body that stops arriving is answered 408 within control.idle_timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from whatsappd.control.peers import admits, forbidden, peer_of
from whatsappd.control.services import services
from whatsappd.errors import ApiError, ErrorCode, Failure
from whatsappd.logs import get_logger
from whatsappd.store import StorageFull

__all__ = ["MIDDLEWARES", "error_response"]

log = get_logger()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: aiohttp's own refusals, as codes.
_STATUS_CODES = {
    400: ErrorCode.BAD_REQUEST, 403: ErrorCode.FORBIDDEN, 404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED, 413: ErrorCode.BODY_TOO_LARGE, 415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def error_response(error: Failure) -> web.Response:
    return web.json_response(error.body(), status=error.status)


@web.middleware
async def _peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    cred = peer_of(request.transport)
    started = time.monotonic()
    who = cred.fields() if cred else {}
    if not admits(services(request).config(), cred):
        log.warning("request refused: peer not allowed", method=request.method, path=request.path, **who)
        return error_response(forbidden(cred))
    response = await handler(request)
    log.debug("request", method=request.method, path=request.path, status=response.status,
              ms=round((time.monotonic() - started) * 1000, 1), **who)
    return response


@web.middleware
async def _error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Failure as exc:
        return error_response(exc)
    except StorageFull as exc:  # any write, any route: the store logged it once, with the path
        return error_response(ApiError(ErrorCode.STORAGE_FULL, str(exc)))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _STATUS_CODES.get(exc.status, ErrorCode.BAD_REQUEST)
        message = {
            404: f"no such route: {request.method} {request.path}; see GET /v1/openapi.json",
            405: f"{request.method} is not allowed on {request.path}",
            413: f"the request body is larger than control.max_body_size "
                 f"({services(request).config().control_max_body_size} bytes)",
        }.get(exc.status, exc.text or exc.reason)
        response = error_response(ApiError(code, message))
        for header in ("Allow",):
            if header in exc.headers:
                response.headers[header] = exc.headers[header]
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("request failed", method=request.method, path=request.path)
        return error_response(ApiError(ErrorCode.INTERNAL_ERROR, "internal error; see the daemon's log"))


@web.middleware
async def _body_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.can_read_body:
        # aiohttp's keep-alive timeout stops at the headers: a client stalling mid-body would hold
        # its connection (and a slot under max_connections) for ever without this deadline.
        timeout = services(request).config().control_idle_timeout
        try:
            async with asyncio.timeout(timeout):
                await request.read()  # raises 413 past client_max_size, whether or not the handler reads
        except TimeoutError:
            # Answer and close at once: aiohttp would otherwise linger (10 s) to drain a body
            # that is not coming, holding the connection's slot past the idle timeout.
            response = error_response(ApiError(ErrorCode.REQUEST_TIMEOUT, f"the request body did not arrive "
                                               f"within control.idle_timeout ({timeout:g}s)"))
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()
            return response
    return await handler(request)


#: In the order a request meets them.
MIDDLEWARES = (_peer_middleware, _error_middleware, _body_limit_middleware)

"""Reading what a request carries: its JSON body (strict, bounded depth), path and query values.

Each reader answers a malformed value with an ApiError naming the field, so handlers only see
values of the right type.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from whatsappd.config import parse_duration
from whatsappd.errors import ApiError, ErrorCode
from whatsappd.ids import InvalidCompanyId, check_company_id

__all__ = ["MAX_JSON_DEPTH", "bool_param", "check_company_ids", "company_id", "json_seconds", "read_json",
           "read_resource"]

#: How deep a JSON body may nest. Every body the API takes is a few levels deep; a deeper one (a
#: run of "[" well under the size limit) would otherwise reach Python's recursion limit.
MAX_JSON_DEPTH = 32


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _too_deep(value: Any) -> bool:
    """Whether value nests deeper than MAX_JSON_DEPTH. Iterative, holding one iterator per level,
    so neither the stack nor memory grows with the body's size."""

    def children(node: dict[str, Any] | list[Any]) -> Iterator[Any]:
        return iter(node.values() if isinstance(node, dict) else node)

    if not isinstance(value, dict | list):
        return False
    levels = [children(value)]
    while levels:
        for child in levels[-1]:
            if isinstance(child, dict | list):
                if len(levels) >= MAX_JSON_DEPTH:
                    return True
                levels.append(children(child))
                break
        else:
            levels.pop()
    return False


async def read_json(request: web.Request) -> Any:
    """The request's JSON body (an empty body is {}): strict JSON (no NaN or Infinity), nested
    at most MAX_JSON_DEPTH levels."""
    raw = await request.read()
    if not raw.strip():
        return {}
    if request.content_type.startswith("multipart/"):
        raise ApiError(ErrorCode.UNSUPPORTED_MEDIA_TYPE, "send the body as application/json")
    too_deep = ApiError(ErrorCode.INVALID_JSON, f"the body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(raw, parse_constant=_not_json)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise ApiError(ErrorCode.INVALID_JSON, f"the body is not valid JSON: {exc}") from None
    if _too_deep(value):
        raise too_deep
    return value


async def read_resource(request: web.Request, resource_id: str, code: ErrorCode, fields: str) -> dict[str, Any]:
    """A PUT's body: a JSON object (fields: what it holds, for the error) whose `id`, if it has one, is
    the path's (the path names the resource; another id in the body is a mistake, not a rename)."""
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(code, f"the body must be a JSON object with {fields}")
    if "id" in body and body["id"] != resource_id:
        raise ApiError(code, f"the body's id {body['id']!r} differs from the path's {resource_id!r}; "
                       "leave id out of the body")
    return body


def json_seconds(value: object) -> float:
    """Seconds from a JSON field: a duration string ("1h30m") or a finite number. A boolean is
    not a number here, although Python counts it as one ("ttl": true is not 1 s)."""
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError("expected a duration string or a number of seconds")
    return float(value)


def company_id(request: web.Request) -> str:
    """The path's {id}, checked (400 invalid_company_id)."""
    return check_company_ids((request.match_info["id"],))[0]


def check_company_ids(ids: tuple[str, ...]) -> tuple[str, ...]:
    """ids, each checked as a company id (400 invalid_company_id for the first that is not one)."""
    try:
        return tuple(check_company_id(each) for each in ids)
    except InvalidCompanyId as exc:
        raise ApiError(ErrorCode.INVALID_COMPANY_ID, str(exc)) from None


def bool_param(request: web.Request, name: str) -> bool:
    """A true/false query parameter (also 1/0, yes/no; absent is false)."""
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ApiError(ErrorCode.BAD_REQUEST, f"query parameter {name!r} must be true or false")
    return value in ("true", "1", "yes")

"""The OpenAPI 3.1 description of the control API, served at GET /v1/openapi.json.

A test checks that every served route is documented here and every documented route is served.
"""

from __future__ import annotations

from typing import Any

from whatsappd.errors import CODES
from whatsappd.ids import COMPANY_ID_PATTERN
from whatsappd.states import State

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_COMMON_ERRORS = {
    "403": _error("The peer's uid is not allowed (control.allowed_uids / allowed_groups)."),
    "413": _error("The body is larger than control.max_body_size."),
}

_COMPANY_ID = {
    "name": "id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": COMPANY_ID_PATTERN},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "enum": sorted(CODES),
                             "description": "Stable snake_case code; scripts test this, not the message."},
                    "message": {"type": "string", "description": "A sentence for a person."},
                },
                "additionalProperties": True,
            }
        },
    },
    "State": {"type": "string", "enum": [str(s) for s in State]},
    "Company": {
        "type": "object",
        "required": ["id", "state", "since"],
        "properties": {
            "id": {"type": "string", "pattern": COMPANY_ID_PATTERN},
            "name": {"type": "string"},
            "engine": {"type": "string", "enum": ["neonize", "simulator"]},
            "state": _ref("State"),
            "since": {"type": "string", "format": "date-time"},
        },
        "additionalProperties": True,
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "uptime_seconds", "companies"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "stopping"]},
            "version": {"type": "string"},
            "pid": {"type": "integer"},
            "started_at": {"type": "string", "format": "date-time"},
            "uptime_seconds": {"type": "number"},
            "socket": {"type": "string"},
            "config": {"type": "object"},
            "companies": {
                "type": "object",
                "properties": {
                    "total": {"type": "integer"},
                    "by_state": {"type": "object", "additionalProperties": {"type": "integer"}},
                },
            },
        },
    },
    "ReloadResult": {
        "type": "object",
        "required": ["ok", "added", "removed", "changed", "settings", "restart_required"],
        "properties": {
            "ok": {"const": True},
            "source": {"type": "string"},
            "added": {"type": "array", "items": {"type": "string"}},
            "removed": {"type": "array", "items": {"type": "string"}},
            "changed": {"type": "array", "items": {"type": "string"}},
            "settings": {"type": "array", "items": {"type": "string"},
                         "description": "Dotted keys of settings that changed and were applied."},
            "restart_required": {"type": "array", "items": {"type": "string"},
                                 "description": "Dotted keys that changed but apply only after a restart."},
        },
    },
}

PATHS: dict[str, dict[str, Any]] = {
    "/v1/health": {
        "get": {
            "summary": "Version, uptime and companies counted by state",
            "operationId": "health",
            "responses": {"200": _json(_ref("Health"), "The daemon is up."), **_COMMON_ERRORS},
        }
    },
    "/v1/companies": {
        "get": {
            "summary": "Every company with its state",
            "operationId": "listCompanies",
            "responses": {
                "200": _json({"type": "object", "properties": {"companies": {"type": "array", "items": _ref("Company")}}},
                             "All companies, sorted by id."),
                **_COMMON_ERRORS,
            },
        }
    },
    "/v1/reload": {
        "post": {
            "summary": "Reload the configuration file now (parse, validate, diff, apply)",
            "description": "Returns once the reload is applied or has failed. An invalid file leaves "
                           "the running configuration untouched and answers 422 with the problems.",
            "operationId": "reload",
            "responses": {
                "200": _json(_ref("ReloadResult"), "Applied; what changed."),
                "422": _error("The file is invalid (error.problems lists each problem); nothing changed."),
                **_COMMON_ERRORS,
            },
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": {"200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}},
        }
    },
}


def openapi_document(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "whatsappd control API",
            "version": version,
            "description": "HTTP/1.1 over the daemon's Unix socket, e.g. "
                           "`curl --unix-socket /run/whatsappd/control.sock http://localhost/v1/health`. "
                           'Errors are {"error": {"code": "<stable_snake_case>", "message": "..."}}.',
        },
        "servers": [{"url": "http://localhost", "description": "any host name; the socket decides"}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }

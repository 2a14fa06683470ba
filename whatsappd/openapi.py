"""The OpenAPI 3.1 description of the control API, served at GET /v1/openapi.json.

A test checks that every served route is documented here and every documented route is served.
"""

from __future__ import annotations

from typing import Any

from whatsappd.errors import CODES
from whatsappd.ids import COMPANY_ID_PATTERN
from whatsappd.states import State
from whatsappd.store import EVENT_TYPES

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

_ID_ERRORS = {
    "400": _error("The id is not a valid company id (invalid_company_id)."),
    "404": _error("No such company (company_not_found)."),
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
                    "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$",
                             "description": "Stable snake_case code; scripts test this, not the message. "
                                            "Codes: " + ", ".join(sorted(CODES)) + "."},
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
            "source": {"type": "string", "enum": ["config", "runtime", "discovered"]},
            "reason": {"type": "string", "description": "Why it is in this state."},
            "jid": {"type": ["string", "null"]},
            "push_name": {"type": ["string", "null"]},
            "has_session": {"type": "boolean"},
            "qr_available": {"type": "boolean"},
            "last_error": {"oneOf": [{"type": "null"}, {
                "type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                                 "at": {"type": "string", "format": "date-time"}}}]},
            "reconnect": {"type": "object", "properties": {
                "attempt": {"type": "integer"},
                "next_retry_at": {"type": ["string", "null"], "format": "date-time"}}},
            "banned_until": {"type": ["string", "null"], "format": "date-time"},
            "worker": {"type": "object", "properties": {"pid": {"type": ["integer", "null"]},
                                                         "restarts": {"type": "integer"}}},
        },
        "additionalProperties": True,
    },
    "CompanyInput": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 200},
            "engine": {"type": "string", "enum": ["neonize", "simulator"], "default": "neonize"},
            "proxy": {"type": "string", "description": 'e.g. "socks5://127.0.0.1:1080"'},
        },
        "additionalProperties": False,
    },
    "MessageInput": {
        "type": "object",
        "required": ["to"],
        "properties": {
            "to": {"type": "string", "description": "A phone number in international format "
                   "(\"+55 11 99999-9999\") or a JID (…@s.whatsapp.net, …@g.us)."},
            "text": {"type": "string", "maxLength": 65536},
            "image": _ref("MediaInput"), "document": _ref("MediaInput"), "audio": _ref("MediaInput"),
            "caption": {"type": "string"}, "filename": {"type": "string"}, "mimetype": {"type": "string"},
            "ttl": {"oneOf": [{"type": "string", "description": "e.g. \"1h\""}, {"type": "number"}]},
        },
        "additionalProperties": False,
    },
    "MediaInput": {
        "type": "object",
        "description": "Exactly one of path (an absolute path of a file inside outbox.media_dirs, reached "
                       "without symbolic links) or base64.",
        "properties": {"path": {"type": "string"}, "base64": {"type": "string"},
                       "filename": {"type": "string"}, "mimetype": {"type": "string"}},
        "additionalProperties": False,
    },
    "Message": {
        "type": "object",
        "required": ["id", "company", "status"],
        "properties": {
            "id": {"type": "string"}, "company": {"type": "string"}, "to": {"type": "string"},
            "jid": {"type": "string"}, "kind": {"type": "string", "enum": ["text", "image", "document", "audio"]},
            "status": {"type": "string", "enum": ["queued", "sending", "sent", "delivered", "read", "failed",
                                                  "expired"]},
            "wa_id": {"type": ["string", "null"], "description": "WhatsApp's message id once sent."},
            "error": {"oneOf": [{"type": "null"}, {"type": "object"}]},
            "created_at": {"type": "string"}, "expires_at": {"type": "string"},
            "sent_at": {"type": ["string", "null"]}, "delivered_at": {"type": ["string", "null"]},
            "read_at": {"type": ["string", "null"]},
        },
        "additionalProperties": True,
    },
    "Event": {
        "type": "object",
        "required": ["type"],
        "properties": {"seq": {"type": "integer"}, "at": {"type": "string"}, "company": {"type": "string"},
                       "type": {"type": "string"}},
        "additionalProperties": True,
    },
    "Qr": {
        "type": "object",
        "required": ["code", "expires_at"],
        "properties": {"code": {"type": "string", "description": "The QR payload; render it or use ?format=png"},
                       "expires_at": {"type": "string", "format": "date-time"}},
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "uptime_seconds", "companies"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "stopping"],
                       "description": "`degraded` while the disk holding the store is full (see `storage`)."},
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
            "storage": {
                "type": "object",
                "required": ["state", "path"],
                "description": "The store (event journal and outbox). `full`: its disk is full and writes are "
                               "refused (507 storage_full) until there is room again; checked once a second.",
                "properties": {
                    "state": {"type": "string", "enum": ["ok", "full"]},
                    "path": {"type": "string"},
                    "since": {"type": "string", "format": "date-time"},
                    "message": {"type": "string"},
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
    "/v1/companies/{id}": {
        "parameters": [_COMPANY_ID],
        "get": {
            "summary": "One company's state, since, JID, push name, last error, reconnect and worker",
            "description": "A stopped company with a stored session (not stopped by an operator) is "
                           "restored by this call, as the old CRM's status call did.",
            "operationId": "getCompany",
            "responses": {"200": _json(_ref("Company"), "The company."), **_ID_ERRORS, **_COMMON_ERRORS},
        },
        "put": {
            "summary": "Add (201) or update (200) a company at runtime; persisted in the state directory",
            "operationId": "putCompany",
            "requestBody": {"content": {"application/json": {"schema": _ref("CompanyInput")}}},
            "responses": {
                "200": _json(_ref("Company"), "Updated."),
                "201": _json(_ref("Company"), "Added."),
                "400": _error("Bad id or body."),
                "409": _error("The company is defined in the config file (defined_in_config)."),
                **_COMMON_ERRORS,
            },
        },
        "delete": {
            "summary": "Stop the company; with ?wipe=true also unlink it and wipe its session",
            "operationId": "deleteCompany",
            "parameters": [{"name": "wipe", "in": "query", "schema": {"type": "boolean", "default": False}}],
            "responses": {"200": _json({"type": "object"}, "Stopped (and wiped)."), **_ID_ERRORS,
                          **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/connect": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Start the company: restore its session, or start pairing when it has none",
            "description": "Answers once the worker reported how it goes (connecting, pairing...) or "
                           "after 10 s.",
            "operationId": "connectCompany",
            "responses": {"200": _json(_ref("Company"), "Already running."),
                          "202": _json(_ref("Company"), "Started."), **_ID_ERRORS, **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/qr": {
        "parameters": [_COMPANY_ID],
        "get": {
            "summary": "The current QR code while pairing",
            "description": "JSON by default; `Accept: image/png` or `?format=png` gives a PNG; "
                           "`?format=text` a terminal rendering (`&ansi=true` for colours).",
            "operationId": "getQr",
            "parameters": [
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["json", "png", "text"]}},
                {"name": "ansi", "in": "query", "schema": {"type": "boolean", "default": False}},
            ],
            "responses": {
                "200": {"description": "The QR code.", "content": {
                    "application/json": {"schema": _ref("Qr")}, "image/png": {}, "text/plain": {}}},
                "409": _error("No QR code now (no_qr): not pairing."),
                **_ID_ERRORS, **_COMMON_ERRORS,
            },
        },
    },
    "/v1/companies/{id}/pair-code": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Pair with a phone number instead of a QR code",
            "operationId": "pairCode",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["phone"],
                "properties": {"phone": {"type": "string", "description": "International format"}}}}}},
            "responses": {
                "200": _json({"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z0-9]{4}-[A-Z0-9]{4}$"},
                                                               "expires_at": {"type": "string"}}}, "The code to type on the phone."),
                "400": _error("Not a phone number (invalid_phone)."),
                "409": _error("The company is not pairing (not_pairing)."),
                **_ID_ERRORS, **_COMMON_ERRORS,
            },
        },
    },
    "/v1/companies/{id}/logout": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Unlink the device on WhatsApp and wipe the session (locally when not connected)",
            "operationId": "logout",
            "responses": {"200": _json({"type": "object", "properties": {
                "unlinked": {"type": "boolean"}, "wiped": {"type": "boolean"}, "state": _ref("State"),
                "note": {"type": "string"}}}, "Logged out."), **_ID_ERRORS, **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/restart": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Restart the company's worker now (also leaves `failed`)",
            "operationId": "restart",
            "responses": {"202": _json(_ref("Company"), "Restarted."), **_ID_ERRORS, **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/simulate": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Drive a simulator company (404 for companies on the real engine)",
            "operationId": "simulate",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["action"],
                "properties": {"action": {"type": "string", "enum": [
                    "scan", "drop", "restore", "logged_out", "replaced", "ban", "outdated", "crash", "hang",
                    "fail_connect"]}}, "additionalProperties": True}}}},
            "responses": {"200": _json({"type": "object"}, "Done."),
                          "202": _json({"type": "object"}, "Sent (crash, hang: no answer)."),
                          "409": _error("Not possible in this state."), **_ID_ERRORS, **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/messages": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Queue a message; it is stored durably before the answer",
            "description": "Sent in order per company while connected; kept while disconnected; after `ttl` "
                           "it becomes `expired`. `Idempotency-Key`: the same key within "
                           "outbox.idempotency_window returns the first result (200, `Idempotent-Replayed: "
                           "true`) and never sends twice; with a different body it is 422. `?wait=sent` holds "
                           "the answer until the message is sent, failed or expired (at most outbox.max_wait, "
                           "or `timeout` seconds).",
            "operationId": "sendMessage",
            "parameters": [
                {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 255}},
                {"name": "wait", "in": "query", "schema": {"type": "string", "enum": ["sent"]}},
                {"name": "timeout", "in": "query", "schema": {"type": "number"}},
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("MessageInput")}}},
            "responses": {
                "200": _json(_ref("Message"), "A replay of an earlier request with the same Idempotency-Key."),
                "202": _json(_ref("Message"), "Stored; status `queued` (or later with ?wait=sent)."),
                "400": _error("Invalid recipient (invalid_recipient), message (invalid_message) or file "
                              "(unreadable_file)."),
                "409": _error("The company is logged_out or replaced (company_unavailable)."),
                "422": _error("Idempotency-Key reused with a different body (idempotency_key_reused)."),
                "507": _error("The disk holding the store is full (storage_full): nothing was stored; retry "
                              "once there is room (GET /v1/health shows `storage`)."),
                **_ID_ERRORS, **_COMMON_ERRORS,
            },
        },
    },
    "/v1/companies/{id}/messages/{mid}": {
        "parameters": [_COMPANY_ID, {"name": "mid", "in": "path", "required": True, "schema": {"type": "string"}}],
        "get": {
            "summary": "An outgoing message's status: queued, sending, sent, delivered, read, failed, expired",
            "operationId": "getMessage",
            "responses": {"200": _json(_ref("Message"), "The message."),
                          "404": _error("No such company (company_not_found) or message (message_not_found)."),
                          **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/contacts/{phone}": {
        "parameters": [_COMPANY_ID, {"name": "phone", "in": "path", "required": True, "schema": {"type": "string"}}],
        "get": {
            "summary": "Whether a phone number is on WhatsApp, and its JID",
            "operationId": "checkContact",
            "responses": {"200": _json({"type": "object", "properties": {
                "phone": {"type": "string"}, "on_whatsapp": {"type": "boolean"},
                "jid": {"type": ["string", "null"]}}}, "The answer."),
                "400": _error("Not a phone number (invalid_recipient)."),
                "409": _error("The company is not connected (not_connected)."),
                **_ID_ERRORS, **_COMMON_ERRORS},
        },
    },
    "/v1/companies/{id}/media/{message_id}": {
        "parameters": [_COMPANY_ID, {"name": "message_id", "in": "path", "required": True,
                                     "schema": {"type": "string"}, "description": "The WhatsApp id of an "
                                     "incoming media message (the `id` of its message.incoming event)."}],
        "get": {
            "summary": "The bytes of an incoming media message, downloaded from WhatsApp",
            "operationId": "getMedia",
            "responses": {"200": {"description": "The media, with its content type.",
                                  "content": {"application/octet-stream": {}}},
                          "404": _error("Unknown message or not media (media_not_found)."),
                          "409": _error("The company is not connected (not_connected)."),
                          **_COMMON_ERRORS},
        },
    },
    "/v1/events": {
        "get": {
            "summary": "Newline-delimited JSON stream of events: the backlog after `since`, then live ones",
            "description": "Each event has a `seq`; reconnect with `since=<last seq>` to resume with no gap "
                           "and no duplicate, across daemon restarts. Without `since`, only new events. A "
                           "`heartbeat` line comes every events.heartbeat_interval. A reader that falls "
                           "too far behind gets a final `stream.end` line with `resume_from`. Pairing events "
                           "carry the QR `code` on the live stream only; it is never stored.",
            "operationId": "events",
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                {"name": "company", "in": "query", "schema": {"type": "array", "items": {"type": "string"}},
                 "style": "form", "explode": True},
                {"name": "type", "in": "query", "schema": {"type": "array", "items": {
                    "type": "string", "enum": list(EVENT_TYPES)}}, "style": "form", "explode": True},
            ],
            "responses": {
                "200": {"description": "The stream.", "content": {"application/x-ndjson": {
                    "schema": _ref("Event")}}},
                "400": _error("Bad since, company or type."),
                "409": _error("since is ahead of the newest event (cursor_ahead)."),
                "410": _error("Events after since were pruned (since_expired; error.oldest_available)."),
                **_COMMON_ERRORS,
            },
        },
    },
    "/v1/metrics": {
        "get": {
            "summary": "Prometheus text format: companies by state, restarts, outbox, journal",
            "operationId": "metrics",
            "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {}}}},
        },
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

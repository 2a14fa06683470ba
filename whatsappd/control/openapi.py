"""The OpenAPI 3.1 description of the control API, served at GET /v1/openapi.json.

Tests check that every served route is documented here and every documented route is served,
and run schemathesis against the served document: request schemas say what the daemon accepts
(a value they allow is not refused for its shape), and each operation lists the error codes it
can answer, per HTTP status, as an enum a response is checked against.
"""

from __future__ import annotations

from typing import Any

from whatsappd.config import ENGINES, PROXY_PATTERN
from whatsappd.doctor import CHECKS as DOCTOR_CHECKS
from whatsappd.errors import CODES, IMPORT_REFUSALS, ErrorCode
from whatsappd.ids import COMPANY_ID_PATTERN
from whatsappd.protocol import MAX_CLOCK_SKEW, MAX_TEXT, SIMULATE_ACTIONS
from whatsappd.recipients import GROUP_JID_PATTERN, USER_JID_PATTERN
from whatsappd.states import LastError, State
from whatsappd.store import EVENT_TYPES, STATUSES
from whatsappd.terminal import safe_text_pattern
from whatsappd.webhooks.spec import MIN_SECRET, WEBHOOK_ID_PATTERN

__all__ = ["SIMULATE_ACTIONS", "openapi_document"]

def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [{"type": "null"}, schema]}


_TIME = {"type": "string", "format": "date-time"}
_TIME_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_JID = {"type": "string", "description": "A WhatsApp JID: <digits>@s.whatsapp.net for a person, …@g.us for a group."}

# Error codes every operation can answer: malformed HTTP, a peer that may not use the API, a
# body that stalls or is too large, a bug, and the connection caps.
_ANY = ("bad_request", "forbidden", "request_timeout", "body_too_large", "internal_error", "too_many_connections")
_BODY = ("invalid_json", "unsupported_media_type")  # routes that read a JSON body
_COMPANY = ("invalid_company_id", "company_not_found")  # routes under /v1/companies/{id}
# Routes that ask the company's worker (not_owner: in a cluster, another host owns the company).
_COMMAND = ("not_running", "worker_timeout", "worker_exited", "engine_error", "not_owner")
# Acts run by the company's owner: asked on another host of a shared PostgreSQL store, they are
# routed to it through the database (docs/INTERNALS.md "Several hosts: the API on every host").
_ROUTED = ("no_owner", "owner_unreachable")


def _responses(ok: dict[str, Any], *codes: str) -> dict[str, Any]:
    """ok plus one error response per HTTP status, listing (and allowing only) its codes."""
    by_status: dict[int, list[str]] = {}
    for code in dict.fromkeys((*codes, *_ANY)):
        by_status.setdefault(CODES[code], []).append(code)
    out = dict(ok)
    for status, listed in sorted(by_status.items()):
        schema = {"allOf": [_ref("Error"), {"type": "object", "properties": {"error": {
            "type": "object", "properties": {"code": {"enum": listed}}}}}]}
        out[str(status)] = _json(schema, "Error codes: " + ", ".join(f"`{code}`" for code in listed) + ".")
    return out


_COMPANY_ID = {
    "name": "id", "in": "path", "required": True,
    "schema": {"type": "string", "pattern": COMPANY_ID_PATTERN},
}

# The event stream's lines. Each is an object with a `type`; the journaled ones also have
# `seq`, `at` and `company`, then the fields of their type.
_JOURNALED = {"seq": {"type": "integer", "minimum": 1}, "at": _TIME,
              "company": {"type": "string", "pattern": COMPANY_ID_PATTERN}}
_EVENT_FIELDS: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "company.state": ("A company changed state.", {
        "old": _ref("State"), "new": _ref("State"), "reason": {"type": "string"},
        "jid": {"type": ["string", "null"], "description": "When it connected: its JID."},
        "attempt": {"type": "integer", "description": "When it waits to reconnect: the attempt number."},
        "retry_in_seconds": {"type": "number", "description": "When it waits to reconnect: the delay."},
    }, ["old", "new", "reason"]),
    "company.pairing": ("A new QR code is ready (GET /v1/companies/{id}/qr).", {
        "expires_at": _TIME_OR_NULL,
        "code": {"type": "string", "description": "The QR payload: on the live stream only, never stored or replayed."},
    }, ["expires_at"]),
    "company.paired": ("The phone scanned the QR code or typed the pairing code.", {
        "jid": {"type": ["string", "null"]},
    }, ["jid"]),
    "company.sending": ("The company's sending paused (WhatsApp answered a send with a rate-limit or "
                        "restriction error: nothing goes until `until`) or is active again (the pause ended, "
                        "or POST /v1/companies/{id}/sending/resume).", {
        "state": {"type": "string", "enum": ["paused", "active"]},
        "until": _TIME_OR_NULL, "reason": {"type": ["string", "null"]},
        "by": {"type": "string", "enum": ["pause_over", "operator"],
               "description": "When active again: whether the pause ran out or the operator resumed it."},
    }, ["state", "until", "reason"]),
    "message.incoming": ("A message someone sent to the company (or the company sent from its phone).", {
        "id": {"type": "string", "description": "WhatsApp's message id; GET /v1/companies/{id}/media/{id} fetches media."},
        "chat": _JID, "sender": _JID, "push_name": {"type": ["string", "null"]}, "timestamp": _TIME,
        "is_group": {"type": "boolean"}, "from_me": {"type": "boolean"},
        "kind": {"type": "string", "description": "text, image, document, audio, video, sticker, ..."},
        "text": {"type": ["string", "null"], "description": "The text of a text message."},
        "media": _nullable({"type": "object", "properties": {
            "mimetype": {"type": ["string", "null"]}, "size": {"type": ["integer", "null"]},
            "caption": {"type": ["string", "null"]}, "filename": {"type": ["string", "null"]}}}),
    }, ["id", "chat", "sender", "timestamp", "is_group", "from_me", "kind"]),
    "message.receipt": ("WhatsApp's receipts for messages the company sent, by WhatsApp id.", {
        "ids": {"type": "array", "items": {"type": "string"}}, "chat": _JID, "sender": _JID,
        "receipt": {"type": "string", "enum": ["delivered", "read", "played"]}, "timestamp": _TIME,
    }, ["ids", "chat", "receipt", "timestamp"]),
    "message.status": ("An outgoing message changed status (GET …/messages/{mid} has the whole message).", {
        "message_id": {"type": "string", "description": "The message's `id` (msg_…) as POST …/messages gave it."},
        "status": {"type": "string", "enum": list(STATUSES)},
        "wa_id": {"type": ["string", "null"]}, "to": {"type": ["string", "null"]},
        "error": {"type": "object", "description": "When failed or expired: why.",
                  "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
    }, ["message_id", "status"]),
}
_STREAM_LINES: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "heartbeat": ("Written every events.heartbeat_interval when nothing else was.", {
        "at": _TIME, "last_seq": {"type": "integer", "minimum": 0,
                                  "description": "The seq to resume from (the newest event this reader was sent)."},
    }, ["at", "last_seq"]),
    "stream.end": ("The last line before the daemon ends the stream; reconnect with since=resume_from.", {
        "reason": {"type": "string", "enum": ["too_slow", "daemon_stopping"]},
        "resume_from": {"type": "integer", "minimum": 0}, "message": {"type": "string"},
    }, ["reason", "resume_from", "message"]),
}


def _line_schema(kind: str, description: str, fields: dict[str, Any], required: list[str],
                 journaled: bool) -> dict[str, Any]:
    properties = {"type": {"const": kind}, **(_JOURNALED if journaled else {}), **fields}
    return {"type": "object", "description": description, "properties": properties,
            "required": ["type", *(["seq", "at", "company"] if journaled else []), *required],
            "additionalProperties": True}


def _event_schemas() -> dict[str, Any]:
    out = {}
    for kind, (description, fields, required) in _EVENT_FIELDS.items():
        out[_event_name(kind)] = _line_schema(kind, description, fields, required, True)
    for kind, (description, fields, required) in _STREAM_LINES.items():
        out[_event_name(kind)] = _line_schema(kind, description, fields, required, False)
    return out


def _event_name(kind: str) -> str:
    """'message.status' -> 'MessageStatusEvent' (the component's name)."""
    return "".join(part.capitalize() for part in kind.replace(".", "_").split("_")) + "Event"


_DURATION = "^([0-9]+(\\.[0-9]+)?(ms|s|m|h|d))+$"
_BASE64 = "^([A-Za-z0-9+/]{4})*([A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
# A phone number as pair-code takes it: 7 to 15 digits, the first not 0, with any spaces,
# parentheses, dots, dashes and plus signs around them.
_PHONE_SEPARATORS = "[\\s()+.-]*"
_PHONE_DIGITS = f"^{_PHONE_SEPARATORS}[1-9]({_PHONE_SEPARATORS}[0-9]){{6,14}}{_PHONE_SEPARATORS}$"
# A phone number as messages and contacts take it: digits and separators; whether it is a
# number at all is the country's numbering plan (400 invalid_recipient otherwise).
_PHONE = {"type": "string", "pattern": "^[\\s()+.-]*[0-9][\\s()0-9+.-]*$", "examples": ["+55 11 99999-9999"],
          "description": "A phone number in international format, country code first (+55 11 99999-9999)."}

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
            "engine": {"type": "string", "enum": list(ENGINES)},
            "state": _ref("State"),
            "since": _TIME,
            "source": {"type": "string", "enum": ["config", "runtime", "discovered"]},
            "reason": {"type": "string", "description": "Why it is in this state."},
            "jid": {"type": ["string", "null"]},
            "push_name": {"type": ["string", "null"]},
            "has_session": {"type": "boolean"},
            "qr_available": {"type": "boolean"},
            "last_error": _nullable({"type": "object", "properties": {
                "code": {"type": "string", "enum": [str(c) for c in LastError]}, "message": {"type": "string"}, "at": _TIME_OR_NULL}}),
            "reconnect": {"type": "object", "properties": {
                "attempt": {"type": "integer"}, "next_retry_at": _TIME_OR_NULL}},
            "banned_until": _TIME_OR_NULL,
            "worker": {"type": "object", "properties": {"pid": {"type": ["integer", "null"]},
                                                         "restarts": {"type": "integer"}}},
            "sending": _ref("Sending"),
            "owner": _nullable({
                "type": "object", "required": ["host", "token", "lease_expires_at"],
                "description": "PostgreSQL store only: the host owning the company (null: none now; its lease "
                               "lapsed). On another host, the other fields are the owner's, as it last wrote them.",
                "properties": {"host": {"type": "string"}, "token": {"type": ["integer", "null"]},
                               "lease_expires_at": _TIME_OR_NULL}}),
            "reported": _nullable({
                "type": "object", "required": ["host", "at"],
                "description": "PostgreSQL store, a company this host does not own: which host wrote the status "
                               "shown and when. With `owner` null (a failover under way) it is the last owner's "
                               "report, which may describe a worker that is gone.",
                "properties": {"host": {"type": "string"}, "at": _TIME_OR_NULL}}),
        },
        "additionalProperties": True,
    },
    "Sending": {
        "type": "object",
        "description": "What the company's outbox waits for (README: Send pacing). `active`: nothing; `paced`: its "
                       "next message waits for the rate, the jitter or the first-contact budget until `until`; "
                       "`paused`: WhatsApp answered a send with a rate-limit or restriction error (463, 429) and "
                       "nothing is sent until `until` (pacing.limit_pause).",
        "required": ["state", "until", "reason"],
        "properties": {
            "state": {"type": "string", "enum": ["active", "paced", "paused"]},
            "until": _TIME_OR_NULL,
            "reason": {"type": ["string", "null"],
                       "description": "paced: rate or first_contact_budget; paused: WhatsApp's error text"},
        },
    },
    "Pacing": {
        "type": "object",
        "description": "This company's own values of [pacing] keys (README: Send pacing); absent keys follow "
                       "the config file's [pacing] section.",
        "properties": {
            "enabled": {"type": "boolean"},
            "rate": {"type": "string", "description": "more than 0, at most 1000/s",
                     "pattern": r"^\s*\d+(\.\d+)?\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$",
                     "examples": ["6/min", "20/h", "1/s"]},
            "burst": {"type": "integer", "minimum": 1, "maximum": 1000},
            "jitter": {"type": "string", "pattern": _DURATION, "examples": ["3s"], "description": "0s to 1h"},
            "first_contact_per_day": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
            "typing_per_char": {"type": "string", "pattern": _DURATION, "examples": ["40ms", "0s"],
                                "description": "0s to 1s"},
            "typing_max": {"type": "string", "pattern": _DURATION, "examples": ["6s"], "description": "0s to 30s"},
            "limit_pause": {"type": "string", "pattern": _DURATION, "examples": ["1h"], "description": "1s to 7d"},
        },
        "additionalProperties": False,
    },
    "CompanyInput": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 200, "examples": ["ACME Imóveis"],
                     "description": "No control or format characters (ESC, newline, bidi overrides...): 400."},
            "engine": {"type": "string", "enum": list(ENGINES), "default": "neonize"},
            "proxy": {"type": ["string", "null"], "pattern": PROXY_PATTERN,
                      "description": 'e.g. "socks5://127.0.0.1:1080"; null or absent: none'},
            "pacing": _ref("Pacing"),
        },
        "additionalProperties": False,
    },
    "MessageInput": {
        "type": "object",
        "description": "Exactly one of text, image, document or audio.",
        "required": ["to"],
        "properties": {
            "to": {"oneOf": [_PHONE, {"type": "string", "pattern": USER_JID_PATTERN, "description": "A person's JID."},
                             {"type": "string", "pattern": GROUP_JID_PATTERN, "description": "A group's JID."}],
                   "examples": ["+55 11 99999-9999", "5511999999999@s.whatsapp.net"]},
            "text": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT, "examples": ["Olá! Recebemos seu contato."]},
            "image": _ref("MediaInput"), "document": _ref("MediaInput"), "audio": _ref("MediaInput"),
            "caption": {"type": "string"}, "filename": {"type": "string"}, "mimetype": {"type": "string"},
            "ttl": {"oneOf": [{"type": "string", "pattern": _DURATION, "description": "e.g. \"1h\""},
                              {"type": "number", "minimum": 1}],
                    "description": "From 1 s to outbox.max_ttl; default outbox.default_ttl."},
        },
        "oneOf": [{"required": [kind]} for kind in ("text", "image", "document", "audio")],
        "additionalProperties": False,
    },
    "MediaInput": {
        "oneOf": [
            {"type": "string", "description": "Short for {\"path\": ...}."},
            {"type": "object",
             "description": "Exactly one of path (an absolute path of a file inside outbox.media_dirs, reached "
                            "without symbolic links) or base64.",
             "properties": {"path": {"type": "string"}, "base64": {"type": "string", "pattern": _BASE64},
                            "filename": {"type": "string"}, "mimetype": {"type": "string"}},
             "oneOf": [{"required": ["path"]}, {"required": ["base64"]}],
             "additionalProperties": False},
        ],
    },
    "Message": {
        "type": "object",
        "required": ["id", "company", "status"],
        "properties": {
            "id": {"type": "string"}, "company": {"type": "string"}, "to": {"type": "string"},
            "jid": {"type": "string"}, "kind": {"type": "string", "enum": ["text", "image", "document", "audio"]},
            "status": {"type": "string", "enum": list(STATUSES)},
            "wa_id": {"type": ["string", "null"], "description": "WhatsApp's message id once sent."},
            "attempts": {"type": "integer"},
            "error": _nullable({"type": "object", "properties": {
                "code": {"enum": [code.value for code in ErrorCode],
                         "description": "e.g. not_on_whatsapp, invalid_recipient, media_invalid, too_large, "
                                        "send_failed, send_interrupted, expired"},
                "message": {"type": ["string", "null"]}}}),
            "idempotency_key": {"type": ["string", "null"]},
            "created_at": _TIME, "updated_at": _TIME, "expires_at": _TIME,
            "sent_at": _TIME_OR_NULL, "delivered_at": _TIME_OR_NULL, "read_at": _TIME_OR_NULL,
            "caption": {"type": ["string", "null"]}, "filename": {"type": ["string", "null"]},
            "mimetype": {"type": ["string", "null"]}, "size": {"type": "integer"},
            "paced_until": {**_TIME_OR_NULL, "description": "Only while `queued`: the company's sending waits for "
                            "pacing until then (null: it does not wait). Messages go in order, so the ones behind "
                            "the next message wait at least as long."},
            "paced_reason": {"type": ["string", "null"], "enum": ["rate", "first_contact_budget", "paused", None],
                             "description": "Only while `queued`: why it waits (see Sending)."},
        },
        "additionalProperties": True,
    },
    "Event": {
        "description": "One line of GET /v1/events: an event (with seq) or a stream line (heartbeat, stream.end).",
        "oneOf": [_ref(_event_name(kind)) for kind in (*_EVENT_FIELDS, *_STREAM_LINES)],
    },
    **_event_schemas(),
    "Qr": {
        "type": "object",
        "required": ["code", "expires_at"],
        "properties": {"code": {"type": "string", "description": "The QR payload; render it or use ?format=png"},
                       "expires_at": _TIME_OR_NULL},
    },
    "DoctorReport": {
        "type": "object", "required": ["clean", "findings"],
        "properties": {
            "clean": {"type": "boolean", "description": "true when there is no finding"},
            "findings": {"type": "array", "items": {
                "type": "object", "required": ["check", "severity", "subject", "message", "fix"],
                "properties": {
                    "check": {"type": "string", "enum": list(DOCTOR_CHECKS), "description": "Stable id of the check."},
                    "severity": {"type": "string", "enum": ["error", "warning"]},
                    "subject": {"type": "string", "description": "A path, a company id."},
                    "message": {"type": "string"},
                    "fix": {"type": "string", "description": "What to do about it."},
                }}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "version", "uptime_seconds", "companies"],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded", "stopping"],
                       "description": "`degraded` while the disk holding the store is full (see `storage`)."},
            "version": {"type": "string"},
            "pid": {"type": "integer"},
            "started_at": _TIME,
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
                    "path": {"type": "string", "description": "The SQLite file, or the PostgreSQL DSN (password "
                                                              "redacted)."},
                    "backend": {"type": "string", "enum": ["sqlite", "postgresql"]},
                    "since": {"type": "string", "format": "date-time"},
                    "message": {"type": "string"},
                },
            },
            "sending_paused": {"type": "object", "additionalProperties": _ref("Sending"),
                               "description": "Companies whose sending a rate-limit error paused, by id."},
        },
    },
    "BaileysImportReport": {
        "type": "object",
        "description": "What an import did (or, with dry_run, would do): the JSON `whatsappd import-baileys --json` "
                       "prints for each company.",
        "required": ["company", "source", "target", "dry_run", "ok", "error", "counts", "checks", "unmapped",
                     "warnings"],
        "properties": {
            "company": {"type": "string"},
            "source": {"type": "string", "description": "The Baileys folder: {import.baileys_root}/session-{id}."},
            "target": {"type": "string", "description": "The company's whatsappd session directory."},
            "dry_run": {"type": "boolean"},
            "ok": {"const": True},
            "error": {"type": "null"},
            "jid": {"type": ["string", "null"]}, "lid": {"type": ["string", "null"]},
            "push_name": {"type": ["string", "null"]}, "platform": {"type": ["string", "null"]},
            "creds_sha256": {"type": ["string", "null"]},
            "baileys_layout": {"type": ["string", "null"], "enum": ["6", "7", None]},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "What was converted, by kind (pre_keys, sessions, sender_keys, ...)."},
            "checks": {"type": "object", "additionalProperties": {"type": "integer"},
                       "description": "Key pairs and signatures verified."},
            "unmapped": {"type": "array", "description": "What has no place in whatsapp's store, and why.",
                         "items": {"type": "object", "required": ["item", "reason"],
                                   "properties": {"item": {"type": "string"}, "reason": {"type": "string"}}}},
            "warnings": {"type": "array", "items": {"type": "string"}},
            "neonize_jid": {"type": ["string", "null"],
                            "description": "The JID neonize listed when it opened the new store (not on a dry run)."},
            "provenance": {"type": ["string", "null"], "description": "The provenance file written beside the store."},
        },
        "additionalProperties": True,
    },
    "ReloadResult": {
        "type": "object",
        "required": ["ok", "added", "removed", "changed", "settings", "restart_required", "webhooks"],
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
            "webhooks": {"type": "object", "required": ["added", "changed", "removed"],
                         "description": "Webhook ids the reload started, restarted with another definition (or "
                                        "source: a [[webhooks]] entry now shadows, or no longer shadows, a PUT one; "
                                        "the cursor is kept), and stopped. added, removed and changed above are "
                                        "company ids.",
                         "properties": {k: {"type": "array", "items": {"type": "string"}}
                                        for k in ("added", "changed", "removed")}},
        },
    },
}

# The arguments of the simulate actions (each action reads the ones it needs; others are ignored).
_SIMULATE_INPUT = {
    "type": "object", "required": ["action"],
    "properties": {
        "action": {"type": "string", "enum": list(SIMULATE_ACTIONS), "description":
                   "scan: the QR is scanned (jid, push_name, connect); drop / restore: the connection is lost / "
                   "back; logged_out, replaced, ban (seconds, reason), outdated, fail_connect: how WhatsApp ends a "
                   "connection; crash, hang (after): the worker dies / freezes; incoming: someone writes (from, "
                   "group, push_name, id, kind, text, caption, filename, mimetype, data, size); receipt: receipts "
                   "for sent messages (ids, receipt, chat, sender); stats: what the simulator has sent; burst: "
                   "count incoming texts (text, from, push_name, rate); clock: the server's clock runs skew "
                   "seconds off this machine's."},
        "jid": {"type": "string"}, "push_name": {"type": "string"}, "connect": {"type": "boolean"},
        "reason": {"type": "string"}, "seconds": {"type": "number", "minimum": 0},
        "after": {"type": "number", "minimum": 0},
        "from": {"type": "string", "description": "Phone digits or …@s.whatsapp.net."},
        "group": {"type": ["boolean", "string"], "description": "true, false or a group JID."},
        "id": {"type": "string"}, "kind": {"type": "string"}, "text": {"type": "string"},
        "caption": {"type": "string"}, "filename": {"type": "string"}, "mimetype": {"type": "string"},
        "data": {"type": "string", "description": "The media bytes, base64."}, "size": {"type": "integer"},
        "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1000,
                "description": "Outbox ids (msg_…) or WhatsApp ids."},
        "receipt": {"type": "string", "enum": ["delivered", "read", "played"]},
        "chat": {"type": "string"}, "sender": {"type": "string"},
        "count": {"type": "integer", "minimum": 0, "maximum": 100_000}, "rate": {"type": "number", "exclusiveMinimum": 0},
        "skew": {"type": "number", "minimum": -MAX_CLOCK_SKEW, "maximum": MAX_CLOCK_SKEW},
    },
    "additionalProperties": True,
}

_COMPANY_OUT = _json(_ref("Company"), "The company.")

# Webhooks (issue 12; README "Webhooks").
_WEBHOOK_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": WEBHOOK_ID_PATTERN}}
_WEBHOOK_FILTERS = {
    "events": {"type": "array", "items": {"type": "string", "enum": list(EVENT_TYPES)},
               "description": "Event types to deliver; empty or left out: all."},
    "companies": {"type": "array", "items": {"type": "string", "pattern": COMPANY_ID_PATTERN},
                  "description": "Companies whose events to deliver; empty or left out: all."},
}
SCHEMAS["Webhook"] = {
    "type": "object",
    "required": ["id", "url", "events", "companies", "source", "state", "cursor", "last_seq", "lag"],
    "properties": {
        "id": {"type": "string", "pattern": WEBHOOK_ID_PATTERN},
        "url": {"type": "string"}, **_WEBHOOK_FILTERS,
        "source": {"type": "string", "enum": ["config", "runtime"]},
        "has_secret": {"const": True, "description": "The secret is write-only: never shown."},
        "state": {"type": "string", "enum": ["ok", "retrying", "failing"],
                  "description": "failing: webhook_delivery.failing_after POSTs in a row failed; still retried."},
        "cursor": {"type": "integer", "description": "The newest seq delivered (or left out by the filters)."},
        "last_seq": {"type": "integer", "description": "The journal's newest seq."},
        "lag": {"type": "integer", "description": "last_seq - cursor: journal events not yet delivered or passed over."},
        "pending_since": _TIME_OR_NULL, "delivered": {"type": "integer"}, "failures": {"type": "integer"},
        "consecutive_failures": {"type": "integer"},
        "last_error": _nullable({"type": "object", "properties": {
            "message": {"type": "string"}, "seq": {"type": "integer"}, "at": _TIME_OR_NULL}}),
        "last_success_at": _TIME_OR_NULL, "next_attempt_at": _TIME_OR_NULL,
        "lost_events": {"type": "integer", "description": "Events pruned from the journal before delivery (since start)."},
        "last_lost": _nullable({"type": "object", "properties": {
            "first_seq": {"type": "integer"}, "last_seq": {"type": "integer"}, "count": {"type": "integer"},
            "at": _TIME_OR_NULL}}),
    },
    "additionalProperties": True,
}
SCHEMAS["WebhookInput"] = {
    "type": "object",
    "required": ["url"],
    "properties": {
        "id": {"type": "string", "description": "Optional: if given, the path's id (400 otherwise)."},
        "url": {"type": "string", "minLength": 1, "maxLength": 2048,
                "examples": ["https://crm.example.com/hooks/whatsapp", "unix:/run/crm/hooks.sock:/whatsapp"],
                "description": "http://, https:// (no user:password@), or unix:/absolute/path.sock:/route."},
        "secret": {"type": "string", "minLength": MIN_SECRET, "maxLength": 1024,
                   "description": "The HMAC-SHA256 key (write-only). Required when the webhook is created; "
                                  "left out of an update, the current one is kept."},
        **_WEBHOOK_FILTERS,
    },
    "additionalProperties": False,
}
_WEBHOOK_OUT = _json(_ref("Webhook"), "The webhook and its delivery.")

PATHS: dict[str, dict[str, Any]] = {
    "/v1/health": {
        "get": {
            "summary": "Version, uptime and companies counted by state",
            "operationId": "health",
            "responses": _responses({"200": _json(_ref("Health"), "The daemon is up.")}),
        }
    },
    "/v1/companies": {
        "get": {
            "summary": "Every company with its state",
            "operationId": "listCompanies",
            "responses": _responses({"200": _json(
                {"type": "object", "required": ["companies"],
                 "properties": {"companies": {"type": "array", "items": _ref("Company")}}},
                "All companies, sorted by id.")}),
        }
    },
    "/v1/companies/{id}": {
        "parameters": [_COMPANY_ID],
        "get": {
            "summary": "One company's state, since, JID, push name, last error, reconnect and worker",
            "description": "A stopped company with a stored session (not stopped by an operator) is "
                           "restored by this call, as the old CRM's status call did.",
            "operationId": "getCompany",
            "responses": _responses({"200": _COMPANY_OUT}, *_COMPANY),
        },
        "put": {
            "summary": "Add (201) or update (200) a company at runtime; persisted in the state directory",
            "operationId": "putCompany",
            "requestBody": {"content": {"application/json": {"schema": _ref("CompanyInput")}}},
            "responses": _responses({"200": _json(_ref("Company"), "Updated."), "201": _json(_ref("Company"), "Added.")},
                                    "invalid_company_id", *_BODY, "defined_in_config"),
        },
        "delete": {
            "summary": "Stop the company; with ?wipe=true also unlink it and wipe its session",
            "description": "Operator acts on one company run one at a time. A DELETE that waited for "
                           "another DELETE which removed the company answers that one's result.",
            "operationId": "deleteCompany",
            "parameters": [{"name": "wipe", "in": "query", "schema": {"type": "boolean", "default": False},
                            "description": "true/false (also 1/0, yes/no)."}],
            "responses": _responses({"200": _json({"type": "object", "required": ["id", "state"], "properties": {
                "id": {"type": "string"}, "state": _ref("State"), "removed": {"const": True},
                "unlinked": {"type": "boolean"}, "wiped": {"type": "boolean"}, "note": {"type": "string"}}},
                "Stopped (and wiped); removed: a runtime company is gone.")},
                *_COMPANY, *_ROUTED, *_COMMAND, "not_connected", "logout_failed"),
        },
    },
    "/v1/companies/{id}/connect": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Start the company: restore its session, or start pairing when it has none",
            "description": "Answers once the worker reported how it goes (connecting, pairing...) or "
                           "after 10 s.",
            "operationId": "connectCompany",
            "responses": _responses({"200": _json(_ref("Company"), "Already running."),
                                     "202": _json(_ref("Company"), "Started.")}, *_COMPANY, *_ROUTED),
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
                {"name": "format", "in": "query", "schema": {"type": "string", "enum": ["", "json", "png", "text"]}},
                {"name": "ansi", "in": "query", "schema": {"type": "boolean", "default": False}},
            ],
            "responses": _responses({"200": {"description": "The QR code.", "content": {
                "application/json": {"schema": _ref("Qr")}, "image/png": {}, "text/plain": {}}}},
                *_COMPANY, "no_qr"),
        },
    },
    "/v1/companies/{id}/pair-code": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Pair with a phone number instead of a QR code",
            "operationId": "pairCode",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["phone"],
                "properties": {"phone": {"type": "string", "pattern": _PHONE_DIGITS, "examples": ["+55 11 99999-9999"],
                                         "description": "International format: country code first"}}}}}},
            "responses": _responses({"200": _json({"type": "object", "required": ["code", "expires_at"], "properties": {
                "code": {"type": "string", "pattern": "^[A-Z0-9]{4}-[A-Z0-9]{4}$"}, "expires_at": _TIME_OR_NULL}},
                "The code to type on the phone.")},
                *_COMPANY, *_ROUTED, *_BODY, "invalid_phone", "not_pairing", *_COMMAND, "pair_phone_failed"),
        },
    },
    "/v1/companies/{id}/logout": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Unlink the device on WhatsApp and wipe the session (locally when not connected)",
            "operationId": "logout",
            "responses": _responses({"200": _json({"type": "object", "required": ["unlinked", "wiped", "state"],
                                                   "properties": {
                "unlinked": {"type": "boolean"}, "wiped": {"type": "boolean"}, "state": _ref("State"),
                "note": {"type": "string"}}}, "Logged out.")},
                *_COMPANY, *_ROUTED, *_COMMAND, "not_connected", "logout_failed"),
        },
    },
    "/v1/companies/{id}/restart": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Restart the company's worker now (also leaves `failed`)",
            "operationId": "restart",
            "responses": _responses({"202": _json(_ref("Company"), "Restarted.")}, *_COMPANY, *_ROUTED),
        },
    },
    "/v1/companies/{id}/sending/resume": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "End the company's rate-limit pause now: its queued messages go again (README: Send pacing)",
            "description": "Idempotent. `resumed: true`: a pause was ended (logged with the caller's uid, and "
                           "journaled as a `company.sending` event with `by: operator`); `resumed: false`: the "
                           "company was not paused, nothing changed. Pacing's rate and first-contact budget "
                           "still apply: only the pause is lifted.",
            "operationId": "resumeSending",
            "responses": _responses({"200": _json({
                "type": "object", "required": ["company", "resumed", "sending"],
                "properties": {"company": {"type": "string"}, "resumed": {"type": "boolean"},
                               "sending": _ref("Sending")}}, "The company's sending now.")}, *_COMPANY, *_ROUTED),
        },
    },
    "/v1/companies/{id}/simulate": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Drive a simulator company (404 not_found for companies on the real engine)",
            "operationId": "simulate",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _SIMULATE_INPUT}}},
            "responses": _responses({"200": _json({"type": "object"}, "Done; what the action did."),
                                     "202": _json({"type": "object", "properties": {
                                         "action": {"type": "string"}, "sent": {"const": True}}},
                                         "Sent (crash, hang: no answer).")},
                *_COMPANY, *_ROUTED, "not_found", *_BODY, *_COMMAND, "invalid_argument", "unknown_action", "not_pairing",
                "not_connected", "not_reconnecting", "unknown_message", "store_failed"),
        },
    },
    "/v1/companies/{id}/import-baileys": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Move the company from the old CRM's Baileys session, without a QR scan",
            "description": "The source is `{import.baileys_root}/session-{id}` (the setting; never a path from the "
                           "request; a symbolic link is refused); while import.baileys_root is empty the route answers "
                           "409 `import_disabled`. The company must use engine neonize, be stopped (no worker) and "
                           "have no whatsappd session. `dry_run: true` checks and converts everything and writes "
                           "nothing (200); otherwise the store is written, checked, opened by neonize, and the "
                           "company is started: it restores the session and logs in, never `pairing` (201). A "
                           "refusal writes nothing; its code says why.",
            "operationId": "importBaileys",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["dry_run"], "additionalProperties": False,
                "properties": {"dry_run": {"type": "boolean",
                                           "description": "true: check only, write nothing."}}}}}},
            "responses": _responses({
                "200": _json(_ref("BaileysImportReport"), "Dry run: the import would succeed; nothing was written."),
                "201": _json(_ref("BaileysImportReport"), "Imported; the company is starting."),
            }, *_COMPANY, *_BODY, "import_disabled", "wrong_engine", *IMPORT_REFUSALS),
        },
    },
    "/v1/companies/{id}/messages": {
        "parameters": [_COMPANY_ID],
        "post": {
            "summary": "Queue a message; it is stored durably before the answer",
            "description": "Sent in order per company while connected; kept while disconnected; after `ttl` "
                           "it becomes `expired`. `Idempotency-Key`: the same key within "
                           "outbox.idempotency_window never sends twice: it answers 200, `Idempotent-Replayed: "
                           "true`, with the message as it is now (its current status); with a different body "
                           "it is 422. `?wait=sent` holds "
                           "the answer until the message is sent, failed or expired (at most outbox.max_wait, "
                           "or `timeout` seconds, which goes only with wait=sent).",
            "operationId": "sendMessage",
            "parameters": [
                {"name": "Idempotency-Key", "in": "header",
                 "schema": {"type": "string", "pattern": "^[!-~]([ -~]{0,253}[!-~])?$"},
                 "description": "1 to 255 printable ASCII characters."},
                {"name": "wait", "in": "query", "schema": {"type": "string", "enum": ["sent"]}},
                {"name": "timeout", "in": "query", "schema": {"type": "number", "minimum": 0}},
            ],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("MessageInput")}}},
            "responses": _responses({
                "200": _json(_ref("Message"), "A replay of an earlier request with the same Idempotency-Key: "
                             "that message with its current status."),
                "202": _json(_ref("Message"), "Stored; status `queued` (or later with ?wait=sent)."),
            }, *_COMPANY, *_BODY, "invalid_message", "invalid_recipient", "unreadable_file", "company_unavailable",
                "idempotency_key_reused", "storage_full"),
        },
    },
    "/v1/companies/{id}/messages/{mid}": {
        "parameters": [_COMPANY_ID, {"name": "mid", "in": "path", "required": True, "schema": {"type": "string"},
                                     "description": "The message's id (msg_…)."}],
        "get": {
            "summary": "An outgoing message's status: queued, sending, sent, delivered, read, failed, expired",
            "operationId": "getMessage",
            "responses": _responses({"200": _json(_ref("Message"), "The message.")}, *_COMPANY, "message_not_found"),
        },
    },
    "/v1/companies/{id}/contacts/{phone}": {
        "parameters": [_COMPANY_ID, {"name": "phone", "in": "path", "required": True, "schema": _PHONE}],
        "get": {
            "summary": "Whether a phone number is on WhatsApp, and its JID",
            "operationId": "checkContact",
            "responses": _responses({"200": _json({"type": "object", "required": ["phone", "on_whatsapp", "jid"],
                                                   "properties": {
                "phone": {"type": "string"}, "on_whatsapp": {"type": "boolean"},
                "jid": {"type": ["string", "null"]}}}, "The answer.")},
                *_COMPANY, "invalid_recipient", "not_connected", *_COMMAND, "invalid_phone", "check_failed"),
        },
    },
    "/v1/companies/{id}/media/{message_id}": {
        "parameters": [_COMPANY_ID, {"name": "message_id", "in": "path", "required": True,
                                     "schema": {"type": "string"}, "description": "The WhatsApp id of an "
                                     "incoming media message (the `id` of its message.incoming event)."}],
        "get": {
            "summary": "The bytes of an incoming media message, downloaded from WhatsApp",
            "operationId": "getMedia",
            "responses": _responses({"200": {"description": "The media, with its own content type.",
                                             "content": {"*/*": {}}}},
                                    *_COMPANY, "media_not_found", "not_connected", *_COMMAND, "media_unavailable",
                                    "download_failed", "invalid_argument"),
        },
    },
    "/v1/events": {
        "get": {
            "summary": "Newline-delimited JSON stream of events: the backlog after `since`, then live ones",
            "description": "Each event has a `seq`; reconnect with `since=<last seq>` to resume with no gap "
                           "and no duplicate, across daemon restarts. Without `since`, only new events. A "
                           "`heartbeat` line comes every events.heartbeat_interval. A reader that falls "
                           "too far behind gets a final `stream.end` line with `resume_from`. Pairing events "
                           "carry the QR `code` on the live stream only; it is never stored. Each line is one "
                           "of the Event schemas, told apart by `type`.",
            "operationId": "events",
            "parameters": [
                {"name": "since", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                           "maximum": 999_999_999_999_999_999}},
                {"name": "company", "in": "query", "schema": {"type": "array", "items": {
                    "type": "string", "pattern": COMPANY_ID_PATTERN}}, "style": "form", "explode": True},
                {"name": "type", "in": "query", "schema": {"type": "array", "items": {
                    "type": "string", "enum": list(EVENT_TYPES)}}, "style": "form", "explode": True},
            ],
            "responses": _responses({"200": {"description": "The stream.", "content": {"application/x-ndjson": {
                "schema": _ref("Event")}}}}, "invalid_company_id", "cursor_ahead", "since_expired"),
        },
    },
    "/v1/metrics": {
        "get": {
            "summary": "Prometheus metrics: companies and their states, outbox, send and connect latency, process",
            "description": "Prometheus text format 0.0.4, or OpenMetrics 1.0 when Accept asks for "
                           "application/openmetrics-text. The same body is served over plain HTTP at "
                           "GET /metrics when [metrics] listen is set (README, \"Monitoring\").",
            "operationId": "metrics",
            "responses": _responses({"200": {"description": "Metrics.", "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}}}}}),
        },
    },
    "/v1/webhooks": {
        "get": {
            "summary": "Every webhook with its delivery state, cursor, lag and last error",
            "operationId": "listWebhooks",
            "responses": _responses({"200": _json(
                {"type": "object", "required": ["webhooks"],
                 "properties": {"webhooks": {"type": "array", "items": _ref("Webhook")}}}, "All webhooks, by id.")}),
        }
    },
    "/v1/webhooks/{id}": {
        "parameters": [_WEBHOOK_ID],
        "get": {
            "summary": "One webhook: its filters, delivery state, cursor, lag, last error, lost events",
            "operationId": "getWebhook",
            "responses": _responses({"200": _WEBHOOK_OUT}, "invalid_webhook_id", "webhook_not_found"),
        },
        "put": {
            "summary": "Add (201) or replace (200) a webhook; stored before the answer",
            "description": "Every journal event matching the filters is POSTed to url, one at a time, in seq "
                           "order, signed (README \"Webhooks\"). A new webhook gets the events from now on; a "
                           "replaced one keeps its cursor. A webhook of the config file is changed there (409).",
            "operationId": "putWebhook",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("WebhookInput")}}},
            "responses": _responses({"200": _json(_ref("Webhook"), "Replaced."), "201": _json(_ref("Webhook"), "Added.")},
                                    "invalid_webhook_id", *_BODY, "invalid_webhook", "defined_in_config",
                                    "storage_full"),
        },
        "delete": {
            "summary": "Remove a webhook added through the API, with its cursor",
            "operationId": "deleteWebhook",
            "responses": _responses({"200": _json({"type": "object", "required": ["id", "removed", "cursor"], "properties": {
                "id": {"type": "string"}, "removed": {"const": True}, "cursor": {"type": "integer"}}}, "Removed.")},
                "invalid_webhook_id", "webhook_not_found", "defined_in_config", "storage_full"),
        },
    },
    "/v1/reload": {
        "post": {
            "summary": "Reload the configuration file now (parse, validate, diff, apply)",
            "description": "Returns once the reload is applied or has failed. An invalid file leaves "
                           "the running configuration untouched and answers 422 config_invalid with "
                           "error.problems listing each problem.",
            "operationId": "reload",
            "responses": _responses({"200": _json(_ref("ReloadResult"), "Applied; what changed.")},
                                    *_BODY, "config_invalid"),
        }
    },
    "/v1/backup": {
        "post": {
            "summary": "A consistent backup archive of the state directory, streamed (gzip'ed tar)",
            "description": "Every SQLite store is copied through SQLite's online backup API while the daemon "
                           "runs; the archive holds manifest.json (versions, per-file sha256, each company's "
                           "JID and state, the journal's last seq), the journal/outbox database, companies.json, "
                           "the effective config and each company's session. `company` (repeatable) limits it to "
                           "those companies' sessions, without the journal. Restore it with `whatsappd restore`. "
                           "It holds the sessions' credentials: keep it encrypted (README: Backups).",
            "operationId": "backup",
            "parameters": [{"name": "company", "in": "query", "schema": {"type": "array", "items": {
                "type": "string", "pattern": COMPANY_ID_PATTERN}}, "style": "form", "explode": True}],
            "responses": _responses({"200": {"description": "The archive.", "content": {"application/gzip": {}}}},
                                    *_COMPANY, "backup_failed"),
        }
    },
    "/v1/doctor": {
        "get": {
            "summary": "Is anything wrong? The findings of `whatsappd doctor`, plus company states and clock skew",
            "description": "Reads the state directory (modes, owners, integrity_check of every store, sizes, "
                           "legacy sessions, sessions and companies, session locks, free space), the control "
                           "socket, and what the daemon knows live (companies failed, banned or outdated; the "
                           "clock against the last server time a worker saw). Changes nothing.",
            "operationId": "doctor",
            "responses": _responses({"200": _json(_ref("DoctorReport"), "The findings; none when clean.")}),
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "This document",
            "operationId": "openapi",
            "responses": _responses({"200": {"description": "OpenAPI 3.1 document", "content": {"application/json": {}}}}),
        }
    },
}


def _name_pattern() -> None:
    """Give CompanyInput.name the pattern of terminal.py's rule. Deriving it scans all of Unicode
    (about 0.2 s), so it happens when the document is first asked for, not at import: the import
    is on the daemon's path to READY=1."""
    SCHEMAS["CompanyInput"]["properties"]["name"].setdefault("pattern", safe_text_pattern())


def openapi_document(version: str) -> dict[str, Any]:
    _name_pattern()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "whatsappd control API",
            "version": version,
            "description": "HTTP/1.1 over the daemon's Unix socket, e.g. "
                           "`curl --unix-socket /run/whatsappd/control.sock http://localhost/v1/health`. "
                           'Errors are {"error": {"code": "<stable_snake_case>", "message": "..."}}; each '
                           "operation lists the codes it can answer. Any path answers 404 `not_found` when "
                           "no route matches and 405 `method_not_allowed` (with Allow) for a wrong method.",
        },
        "servers": [{"url": "http://localhost", "description": "any host name; the socket decides"}],
        "paths": PATHS,
        "components": {"schemas": SCHEMAS},
    }

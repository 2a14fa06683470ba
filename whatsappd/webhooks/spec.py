"""A webhook's definition: id, target URL, filters and secret; parsed and checked once, wherever it
comes from (`[[webhooks]]` in the config file or PUT /v1/webhooks/{id}); and how a POST is signed.

Kept free of asyncio and aiohttp: config.py (read by whatsappctl, which must start fast) uses it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from whatsappd.ids import InvalidCompanyId, check_company_id

__all__ = [
    "EVENT_TYPES_HEADER", "MIN_SECRET", "InvalidWebhook", "SEQ_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WEBHOOK_ID_HEADER",
    "WEBHOOK_ID_PATTERN", "Target", "WebhookConfig", "check_webhook_id", "parse_target", "parse_webhook",
    "parse_webhooks", "sign",
]

#: Webhook ids have the company id's grammar (they appear in logs, metrics labels and paths).
WEBHOOK_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_WEBHOOK_ID = re.compile(WEBHOOK_ID_PATTERN[1:-1])
#: A secret shorter than this is refused: it is an HMAC key (`openssl rand -hex 32` makes a good one).
MIN_SECRET = 16
_MAX_SECRET = 1024
_MAX_URL = 2048
_KEYS = ("id", "url", "secret", "events", "companies")

#: The headers of each POST (README "Webhooks").
TIMESTAMP_HEADER = "X-Whatsappd-Timestamp"
SIGNATURE_HEADER = "X-Whatsappd-Signature"
WEBHOOK_ID_HEADER = "X-Whatsappd-Webhook"
SEQ_HEADER = "X-Whatsappd-Seq"
EVENT_TYPES_HEADER = "X-Whatsappd-Event"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: "sha256=" + hex HMAC-SHA256(secret, "<timestamp>.<body>")."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def check_webhook_id(value: object) -> str:
    if not isinstance(value, str) or _WEBHOOK_ID.fullmatch(value) is None:
        raise ValueError(f"{value!r} is not a valid webhook id: use 1 to 64 characters of a-z, 0-9, '_' and '-', "
                         "starting with a letter or digit")
    return value


@dataclass(frozen=True)
class Target:
    """Where the POSTs go: an http(s) URL, or a route on a Unix socket (socket set)."""

    url: str  # what aiohttp requests (for a Unix socket: http://localhost + the route)
    socket: str | None = None


def parse_target(value: object) -> Target:
    """`http://host[:port]/path`, `https://…`, or `unix:/path/to.sock:/route`; ValueError says why not."""
    if not isinstance(value, str) or not value or len(value) > _MAX_URL:
        raise ValueError(f"expected a URL string of at most {_MAX_URL} characters")
    if any(ord(c) <= 0x20 or ord(c) == 0x7f for c in value):
        raise ValueError("a URL may not contain spaces or control characters")
    if value.startswith("unix:"):
        socket, sep, route = value[len("unix:"):].partition(":/")
        if not socket.startswith("/") or not sep:
            raise ValueError('expected "unix:/absolute/path/to.sock:/route", e.g. "unix:/run/crm/hooks.sock:/whatsapp"')
        return Target(f"http://localhost/{route}", socket)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError('expected an http:// or https:// URL, or "unix:/path/to.sock:/route"')
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are refused (they would be shown by GET and in logs); "
                         "the receiver checks the signature made with the secret instead")
    if parts.fragment:
        raise ValueError("a URL fragment (#...) is never sent; leave it out")
    try:
        parts.port  # noqa: B018 (raises for a bad port)
    except ValueError as exc:
        raise ValueError(f"bad port: {exc}") from None
    return Target(value)


@dataclass(frozen=True)
class WebhookConfig:
    """One webhook as configured. Empty filters match everything."""

    id: str
    url: str
    secret: str
    events: tuple[str, ...] = ()
    companies: tuple[str, ...] = ()

    @property
    def target(self) -> Target:
        return parse_target(self.url)

    def wants(self, company: str | None, type_: str) -> bool:
        return ((not self.companies or company in self.companies)
                and (not self.events or type_ in self.events))

    def definition(self) -> dict[str, Any]:
        """As stored and as written in TOML (the secret included: never shown by the API)."""
        out: dict[str, Any] = {"id": self.id, "url": self.url, "secret": self.secret}
        if self.events:
            out["events"] = list(self.events)
        if self.companies:
            out["companies"] = list(self.companies)
        return out

    def public(self) -> dict[str, Any]:
        """What GET shows: everything but the secret."""
        return {"id": self.id, "url": self.url, "events": list(self.events), "companies": list(self.companies)}


def _strings(item: dict[str, Any], key: str) -> list[Any]:
    value = item.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of strings")
    return value


class InvalidWebhook(ValueError):
    """A webhook definition that cannot be used; `problems` lists each problem, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_webhook(item: object, previous_secret: str | None = None) -> WebhookConfig:
    """One webhook table or body; InvalidWebhook listing every problem found.

    previous_secret: an update through the API may leave the secret out to keep the old one.
    """
    from whatsappd.store.journal import EVENT_TYPES  # here only: whatsappctl reads config.py

    if not isinstance(item, dict):
        raise InvalidWebhook(["expected a table (a JSON object) with id, url, secret, events, companies"])
    problems = [f"{key}: unknown key (allowed: {', '.join(_KEYS)})" for key in sorted(set(item) - set(_KEYS))]
    webhook_id = ""
    try:
        webhook_id = check_webhook_id(item.get("id"))
    except ValueError as exc:
        problems.append(f"id: {exc}" if "id" in item else "id: missing")
    url = item.get("url")
    try:
        parse_target(url)
    except ValueError as exc:
        problems.append(f"url: {exc}" if url is not None else "url: missing")
    secret = item.get("secret", previous_secret)
    if not isinstance(secret, str) or not MIN_SECRET <= len(secret) <= _MAX_SECRET or not secret.isprintable():
        problems.append(f"secret: {'missing; ' if secret is None else ''}expected {MIN_SECRET} to {_MAX_SECRET} "
                        "printable characters (e.g. the output of `openssl rand -hex 32`)")
    events: list[Any] = []
    companies: list[Any] = []
    try:
        events = _strings(item, "events")
        unknown = sorted(set(events) - set(EVENT_TYPES))
        if unknown:
            problems.append(f"events: unknown event types {', '.join(map(repr, unknown))}; known: "
                            f"{', '.join(EVENT_TYPES)} (an empty list: all)")
    except ValueError as exc:
        problems.append(str(exc))
    try:
        companies = _strings(item, "companies")
        for company in companies:
            check_company_id(company)
    except (ValueError, InvalidCompanyId) as exc:
        problems.append(f"companies: {exc}")
    if problems:
        raise InvalidWebhook(problems)
    assert isinstance(url, str) and isinstance(secret, str)
    return WebhookConfig(webhook_id, url, secret, tuple(dict.fromkeys(events)), tuple(dict.fromkeys(companies)))


def parse_webhooks(raw: object, problems: list[str]) -> tuple[WebhookConfig, ...]:
    """`[[webhooks]]` of the config file; each problem appended as one line."""
    if not isinstance(raw, list):
        problems.append("webhooks: expected a list of tables, written [[webhooks]]")
        return ()
    out: list[WebhookConfig] = []
    for index, item in enumerate(raw):
        try:
            webhook = parse_webhook(item)
        except InvalidWebhook as exc:
            where = f"webhooks[{index}]" + (f" (id {item['id']!r})" if isinstance(item, dict) and "id" in item else "")
            problems.extend(f"{where}.{problem}" for problem in exc.problems)
            continue
        if any(w.id == webhook.id for w in out):
            problems.append(f"webhooks[{index}] (id {webhook.id!r}): duplicate webhook id; each id may appear once")
            continue
        out.append(webhook)
    return tuple(out)

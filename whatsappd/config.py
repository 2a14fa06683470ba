"""Configuration: every setting in one table, loaded from TOML into frozen objects.

Each `Setting` keeps name, type, default, validator and help together (the gunicorn habit),
so parsing, `whatsappd check-config` and the documented example file cannot drift apart.
Loading never exits the process: it raises `ConfigError`, and the caller decides (exit 78 at
start, keep the old config on reload).
"""

from __future__ import annotations

import grp
import json
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from whatsappd.ids import InvalidCompanyId, check_company_id
from whatsappd.metrics.address import ListenAddress, parse_listen, render_listen
from whatsappd.pacing import PacingPolicy, Rate, parse_rate
from whatsappd.terminal import describe, first_unsafe
from whatsappd.webhooks.spec import WebhookConfig, parse_webhooks

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SETTINGS",
    "CompanyConfig",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "diff_configs",
    "format_duration",
    "load_config",
    "parse_duration",
    "parse_size",
    "render_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/whatsappd/whatsappd.toml")
ENGINES = ("neonize", "simulator")
LAUNCHERS = ("zygote", "exec")
#: A company's proxy URL; the OpenAPI document uses it too (anchored for JSON Schema).
PROXY_PATTERN = r"^(socks5|http|https)://[^\s/]+(:\d+)?/?$"
LOG_FORMATS = ("auto", "journal", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
STORE_BACKENDS = ("sqlite", "postgresql")


class ConfigError(Exception):
    """The configuration cannot be used. `problems` lists every error found, each one line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Value parsers. Each takes the raw TOML value and returns the typed value or raises
# ValueError with the part of the sentence after "key = value: ".

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "k": 1024, "K": 1024, "KiB": 1024, "KB": 1000, "M": 1024**2, "MiB": 1024**2,
    "MB": 1000**2, "G": 1024**3, "GiB": 1024**3, "GB": 1000**3,
}


def parse_duration(value: object) -> float:
    """'30s', '5m', '1h30m', '250ms' -> seconds. Bare numbers are refused: units avoid mistakes."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError('expected a duration string such as "30s", "5m" or "1h30m"')
    text = value.strip()
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError('expected a duration such as "30s", "5m" or "1h30m" (units: ms, s, m, h, d)')
    return total


def format_duration(seconds: float) -> str:
    """The exact inverse of parse_duration, for check-config output: 300.0 -> '5m', 1.5 -> '1s500ms'."""
    millis = round(seconds * 1000, 3)
    rest, fraction = divmod(millis, 1000)
    rest = int(rest)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    if fraction:
        parts.append(f"{round(fraction, 3):g}ms")
    return "".join(parts) or "0s"


def parse_size(value: object) -> int:
    """'1MiB', '512KiB', 1048576 -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if match:
            return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    raise ValueError('expected a size such as "1MiB", "512KiB" or a number of bytes')


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _path(value: object) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty path string")
    path = Path(value)
    if not path.is_absolute():
        raise ValueError("expected an absolute path")
    return path


def _mode(value: object) -> int:
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{3}", value):
        mode = int(value, 8)
    else:
        raise ValueError('expected an octal mode string such as "0660"')
    if mode & 0o600 != 0o600:
        raise ValueError("the owner must keep read and write access (at least 0600)")
    if mode & 0o111:
        raise ValueError("a socket mode has no execute bits")
    return mode


def _group(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a group name or an empty string")
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ValueError("no such group on this system") from None
    return value


def _country(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError('expected an ISO country code such as "BR", or "" for none')
    if not value:
        return ""
    import phonenumbers  # here only: whatsappctl reads this module too, and must start fast

    if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError('expected an ISO country code such as "BR", or "" for none')
    return value.upper()


def _dirs(value: object) -> tuple[Path, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.startswith("/") for v in value):
        raise ValueError('expected a list of absolute directory paths, e.g. ["/srv/crm/uploads"]')
    return tuple(Path(v) for v in value)


def _optional_path(value: object) -> Path | None:
    """An absolute path, or "" for none (the feature it names is then off)."""
    if value == "":
        return None
    return _path(value)


def _render_dirs(value: tuple[Path, ...]) -> list[str]:
    return [str(v) for v in value]


def _dsn(value: object) -> str:
    """A PostgreSQL URL, or "" for none. Only the URL form: neonize's Go side (lib/pq) takes a
    store for PostgreSQL only when its name starts with "postgres", and would open a key=value
    DSN as a SQLite file."""
    if not isinstance(value, str):
        raise ValueError('expected a string such as "postgresql://whatsappd@db.example.com/whatsappd"')
    if value and not re.match(r"postgres(ql)?://", value):
        raise ValueError('expected a URL starting with "postgresql://" (or "postgres://"), '
                         'e.g. "postgresql://whatsappd@db.example.com/whatsappd"')
    return value


def _host_id(value: object) -> str:
    """A cluster host id, or "" for the machine's hostname (resolved where it is used)."""
    if not isinstance(value, str) or (value and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value)):
        raise ValueError('expected 1 to 64 characters of A-Z, a-z, 0-9, ".", "_" and "-", starting with a '
                         'letter or digit (e.g. "wa-3"), or "" for the hostname')
    return value


def _choice(options: tuple[str, ...]) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(repr(o) for o in options)}")
        return str(value)

    return parse


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"expected a whole number from {lo} to {hi}")
        return value

    return parse


def _float_range(lo: float, hi: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise ValueError(f"expected a number from {lo:g} to {hi:g}")
        return float(value)

    return parse


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def _duration_range(lo: float, hi: float) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)
        if not lo <= seconds <= hi:
            raise ValueError(f"expected a duration from {format_duration(lo)} to {format_duration(hi)}")
        return seconds

    return parse


def _uids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError("expected a list of numeric user ids, e.g. [0, 1001]")
    return tuple(value)


def _gids(value: object) -> tuple[int, ...]:
    """Group names or numbers -> gids (names are resolved now, so a typo fails at load)."""
    if not isinstance(value, list):
        raise ValueError('expected a list of group names or ids, e.g. ["crm", 1001]')
    gids = []
    for item in value:
        if isinstance(item, int) and not isinstance(item, bool) and item >= 0:
            gids.append(item)
        elif isinstance(item, str):
            try:
                gids.append(grp.getgrnam(item).gr_gid)
            except KeyError:
                raise ValueError(f"no group named {item!r} on this system") from None
        else:
            raise ValueError('expected a list of group names or ids, e.g. ["crm", 1001]')
    return tuple(gids)


# ---------------------------------------------------------------------------------------------
# The settings table.


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    parse: Callable[[object], Any]
    default: Any  # the raw TOML value, parsed like a user's value (None: computed at load)
    help: str
    reloadable: bool = True
    render: Callable[[Any], Any] | None = None  # typed value -> TOML value for check-config

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def attr(self) -> str:
        return f"{self.section}_{self.key}"


def _render_path(p: Path | None) -> str:
    return "" if p is None else str(p)


def _render_mode(m: int) -> str:
    return f"0{m:o}"


SETTINGS: tuple[Setting, ...] = (
    Setting("daemon", "state_dir", _path, None,
            "Where sessions, the event journal and the outbox live. Default: $STATE_DIRECTORY "
            "under systemd, /var/lib/whatsappd for root, $XDG_STATE_HOME/whatsappd otherwise.",
            reloadable=False, render=_render_path),
    Setting("daemon", "shutdown_timeout", _duration_range(1, 600), "20s",
            "Time budget for a graceful stop (SIGTERM); workers still running then are killed.",
            render=format_duration),
    Setting("control", "socket_path", _path, None,
            "The control socket. Default: $RUNTIME_DIRECTORY/control.sock under systemd, "
            "/run/whatsappd/control.sock for root, $XDG_RUNTIME_DIR/whatsappd/control.sock otherwise. "
            "Ignored when systemd hands the socket over (whatsappd.socket).",
            reloadable=False, render=_render_path),
    Setting("control", "socket_mode", _mode, "0660",
            "Permissions of the socket file the daemon binds itself.",
            reloadable=False, render=_render_mode),
    Setting("control", "socket_group", _group, "",
            "Group owning the socket file (empty: the daemon's own group).", reloadable=False),
    Setting("control", "allowed_uids", _uids, [],
            "If this or allowed_groups is non-empty, only these peer uids (checked with "
            "SO_PEERCRED) may use the API; root and the daemon's own user always may.",
            render=list),
    Setting("control", "allowed_groups", _gids, [],
            "Group names or ids whose members may use the API (primary or supplementary group).",
            render=list),
    Setting("control", "max_body_size", lambda v: _checked_size(v, 1024, 1024**3), "16MiB",
            "Largest request body accepted; larger requests get 413.", reloadable=False,
            render=format_size),
    Setting("control", "idle_timeout", _duration_range(1, 3600), "60s",
            "An idle client connection is closed after this long.", reloadable=False,
            render=format_duration),
    Setting("control", "max_connections", _int_range(1, 10000), 256,
            "Open client connections at most; more are answered 503 and closed.", reloadable=False),
    Setting("control", "max_connections_per_uid", _int_range(1, 10000), 128,
            "Open client connections one peer uid may hold at most (its next ones are answered 503), "
            "so one client cannot take every slot; keep it below max_connections.", reloadable=False),
    Setting("logging", "format", _choice(LOG_FORMATS), "auto",
            "auto: journald logfmt under systemd, console on a terminal, JSON otherwise."),
    Setting("logging", "level", _choice(LOG_LEVELS), "info", "Lowest level logged."),
    Setting("reconnect", "initial_delay", _duration_range(0.01, 3600), "1s",
            "First retry delay bound after a transient failure.", render=format_duration),
    Setting("reconnect", "multiplier", _float_range(1, 10), 2.0,
            "Each consecutive failure multiplies the delay bound by this."),
    Setting("reconnect", "max_delay", _duration_range(0.01, 86400), "5m",
            "Cap of the delay bound (the delay is drawn uniformly below it: full jitter).",
            render=format_duration),
    Setting("reconnect", "stable_after", _duration_range(1, 86400), "60s",
            "A connection that lasts this long resets the backoff.", render=format_duration),
    Setting("reconnect", "connect_rate", _float_range(0.01, 1000), 2.0,
            "New connection attempts per second across all companies (storm protection)."),
    Setting("reconnect", "connect_timeout", _duration_range(1, 3600), "60s",
            "A connect attempt that neither succeeds nor fails by then is abandoned (the worker "
            "is killed) and counts as a transient failure.", render=format_duration),
    Setting("workers", "heartbeat_interval", _duration_range(0.1, 60), "5s",
            "How often a worker proves it is alive.", render=format_duration),
    Setting("workers", "heartbeat_timeout", _duration_range(1, 600), "30s",
            "A worker silent for this long is killed and restarted.", render=format_duration),
    Setting("workers", "stop_grace", _duration_range(0.1, 300), "10s",
            "How long a worker may take to disconnect when asked to stop, before SIGKILL.",
            render=format_duration),
    Setting("workers", "pairing_timeout", _duration_range(10, 3600), "170s",
            "Hard deadline for a QR or phone-code pairing; then the worker is killed.",
            render=format_duration),
    Setting("workers", "paired_connect_timeout", _duration_range(1, 600), "30s",
            "After a successful pairing the server forces one reconnect; if the company is not "
            "connected within this, its worker is restarted.", render=format_duration),
    Setting("workers", "stuck_reconnecting_after", _duration_range(1, 86400), "4m",
            "A worker that stays `reconnecting` this long (keep-alive timeouts the library keeps "
            "retrying by itself) is restarted.", render=format_duration),
    Setting("workers", "crash_limit", _int_range(1, 1000), 5,
            "Crashes within crash_window that put a company in `failed` until an operator acts."),
    Setting("workers", "crash_window", _duration_range(1, 86400), "10m",
            "The window for crash_limit.", render=format_duration),
    Setting("workers", "launcher", _choice(LAUNCHERS), "zygote",
            "How workers start. zygote: forked from one process per engine that has already "
            "imported the worker code (about 11-13 MiB per neonize company instead of 42-50); "
            "exec: each worker is a new Python process. Applies at restart.", reloadable=False),
    Setting("journal", "max_age", _duration_range(60, 365 * 86400), "7d",
            "Events older than this are deleted from the journal.", render=format_duration),
    Setting("journal", "max_events", _int_range(1000, 100_000_000), 1_000_000,
            "At most this many events are kept (the oldest go first)."),
    Setting("events", "heartbeat_interval", _duration_range(0.1, 300), "15s",
            "A stream reader gets a heartbeat line this often when nothing else happens.",
            render=format_duration),
    Setting("events", "reader_buffer", _int_range(10, 1_000_000), 10000,
            "Live events buffered per stream reader; a reader further behind is cut off "
            "(it resumes from its last seq)."),
    Setting("events", "write_timeout", _duration_range(0.1, 600), "10s",
            "A stream reader that accepts no data for this long is disconnected.",
            render=format_duration),
    Setting("outbox", "default_ttl", _duration_range(1, 30 * 86400), "24h",
            "A message not sent within its ttl becomes `expired` (per message: \"ttl\").",
            render=format_duration),
    Setting("outbox", "max_ttl", _duration_range(1, 365 * 86400), "7d",
            "The largest ttl a message may ask for.", render=format_duration),
    Setting("outbox", "idempotency_window", _duration_range(60, 30 * 86400), "24h",
            "An Idempotency-Key repeated within this never sends twice; the replay answers the "
            "message with its current status.", render=format_duration),
    Setting("outbox", "send_timeout", _duration_range(1, 600), "60s",
            "A send the worker does not answer within this restarts the worker; the message's "
            "fate is then settled from the worker's send log.", render=format_duration),
    Setting("outbox", "max_wait", _duration_range(0.1, 600), "60s",
            "The longest ?wait=sent may hold a request.", render=format_duration),
    Setting("outbox", "media_dirs", _dirs, [],
            "Directories whose files a message may attach by path (e.g. [\"/srv/crm/uploads\"]); "
            "empty: only base64 content. No symbolic link below them is followed, and the state "
            "directory is never allowed.", render=_render_dirs),
    Setting("outbox", "max_file_size", lambda v: _checked_size(v, 1024, 2 * 1024**3), "64MiB",
            "Largest media file a message may attach (by path or base64).", render=format_size),
    Setting("outbox", "default_country", _country, "",
            "The country of phone numbers written without '+' (ISO code, e.g. \"BR\": \"(11) 99999-9999\" "
            "is then +55 11 99999-9999). Empty: digits without '+' must start with the country code "
            "(5511999999999). Set it if your users type national numbers: read with a country code, "
            "one such as 51 99123-4567 (Porto Alegre) is a valid number in Peru."),
    Setting("import", "baileys_root", _optional_path, "",
            "The old CRM's Baileys sessions directory (holding session-<id>/ folders), e.g. "
            "\"/srv/crm/sessions\": POST /v1/companies/{id}/import-baileys imports the company from "
            "session-<id>/ in it, never from a path a request names. Empty: that route is off "
            "(409 import_disabled); `whatsappd import-baileys` works either way.",
            render=_render_path),
    Setting("metrics", "listen", parse_listen, "",
            "Also serve the Prometheus metrics (GET /metrics, nothing else, no authentication) over plain "
            "HTTP at this IP address and port, e.g. \"127.0.0.1:9464\" (Prometheus cannot scrape a Unix "
            "socket). Empty: only GET /v1/metrics on the control socket. Host names are refused; a "
            "non-loopback address is used because you wrote it, with a warning at start.",
            reloadable=False, render=render_listen),

    # Send pacing (issue 12; whatsappd/pacing.py says why each default is what it is). Every key
    # may be overridden per company: a [companies.pacing] table, or "pacing" in PUT /v1/companies.
    Setting("pacing", "enabled", _bool, True,
            "Pace each company's sends (the bucket, jitter, first-contact budget, typing). false: "
            "send as fast as WhatsApp answers. A rate-limit pause applies either way."),
    Setting("pacing", "rate", parse_rate, "4/min",
            "Sustained sends per company, e.g. \"6/min\", \"20/h\", \"1/s\" (a token bucket's refill). "
            "Default well below what ban reports show as dangerous.", render=str),
    Setting("pacing", "burst", _int_range(1, 1000), 3,
            "Messages that may go back to back before the rate applies. Reports show bans after "
            "bursts of 5-8 messages to new contacts, hence 3."),
    Setting("pacing", "jitter", _duration_range(0, 3600), "3s",
            "Each send waits an extra random 0..jitter after the rate allows it, so gaps are not "
            "machine-regular (the bucket keeps the long-run rate).", render=format_duration),
    Setting("pacing", "first_contact_per_day", _int_range(1, 1_000_000), 15,
            "Distinct recipients who never wrote to this number that may be sent to in any 24 hours "
            "(kept in the store: a restart does not reset it). Restrictions (error 463) are reported "
            "after 20-30 a day, hence 15. A message over budget waits, and the ones behind it too "
            "(order is kept)."),
    Setting("pacing", "typing_per_char", _duration_range(0, 1), "40ms",
            "Show \"typing…\" to the recipient for this long per character before a text (0s: off).",
            render=format_duration),
    Setting("pacing", "typing_max", _duration_range(0, 30), "6s",
            "The longest \"typing…\" before one text.", render=format_duration),
    Setting("pacing", "limit_pause", _duration_range(1, 7 * 86400), "1h",
            "When WhatsApp answers a send with a rate-limit or restriction error (463, 429), the "
            "company sends nothing for this long instead of retrying into a ban.",
            render=format_duration),

    # Webhook delivery (issue 12; the webhooks themselves are [[webhooks]] tables, README "Webhooks").
    Setting("webhook_delivery", "timeout", _duration_range(0.1, 600), "10s",
            "A POST not answered within this counts as failed (and is retried): a hung receiver holds "
            "its own webhook back this long per attempt, never the daemon or other webhooks.",
            render=format_duration),
    Setting("webhook_delivery", "initial_delay", _duration_range(0.01, 3600), "1s",
            "Bound of the first retry delay after a failed POST; it doubles with each failure in a row "
            "(the delay is drawn uniformly below the bound: full jitter).", render=format_duration),
    Setting("webhook_delivery", "max_delay", _duration_range(0.01, 86400), "5m",
            "Cap of the retry delay bound: a receiver that is down is tried at least this often.",
            render=format_duration),
    Setting("webhook_delivery", "failing_after", _int_range(1, 1_000_000), 5,
            "Failed POSTs in a row after which a webhook is marked `failing` (it keeps retrying and "
            "resumes from its cursor when the receiver answers again)."),

    # The simulator's fake WhatsApp shared by several daemons on one machine (issue 13).
    Setting("simulator", "server_dir", _optional_path, "",
            "Simulator companies only: a directory shared by several daemons on this machine, holding "
            "each company's fake-WhatsApp \"server\" (server_dir/<company>/: the paired device, the send "
            "log, the connection log), so that the daemons of a test cluster see one WhatsApp: a company "
            "paired on one is paired on all, a message is sent once whoever sends it, and a second "
            "connection of a company replaces the first (`replaced`). Empty: each daemon's simulator "
            "keeps all of it in its own session directory.", reloadable=False, render=_render_path),

    Setting("store", "backend", _choice(STORE_BACKENDS), "sqlite",
            "Where the journal and the outbox live: \"sqlite\" (one file in state_dir, the default) or "
            "\"postgresql\" (the database store.dsn names; `whatsappd migrate` creates its tables, and "
            "the daemon runs it at start).", reloadable=False),
    Setting("store", "dsn", _dsn, "",
            "With backend = \"postgresql\": the database, as a URL such as "
            "\"postgresql://whatsappd@db.example.com/whatsappd?sslmode=verify-full\" (or with "
            "?host=/run/postgresql for a Unix socket). Keep the password out of it: libpq reads "
            "~/.pgpass or PGPASSFILE.", reloadable=False),

    # Several hosts on one PostgreSQL (issue 13; whatsappd/cluster/).
    Setting("cluster", "enabled", _bool, False,
            "Run as one of several hosts sharing store.dsn, each company owned by one host at a time "
            "(leases; see docs/INTERNALS.md \"Company leases\"). Needs store.backend = \"postgresql\".",
            reloadable=False),
    Setting("cluster", "host_id", _host_id, "",
            "This host's stable, unique name in the cluster (1-64 of A-Z a-z 0-9 . _ -). Empty: the "
            "machine's hostname.", reloadable=False),
    Setting("cluster", "lease_ttl", _duration_range(1, 3600), "15s",
            "How long a company's lease lasts in the database without renewal: a dead host's companies "
            "are taken over after about lease_ttl + renew_interval.", reloadable=False, render=format_duration),
    Setting("cluster", "renew_interval", _duration_range(0.1, 600), "5s",
            "How often a host renews all its leases (one statement) and looks for companies to take. "
            "At most (lease_ttl - fence_margin) / 2, so one failed renewal does not lose them.",
            reloadable=False, render=format_duration),
    Setting("cluster", "fence_margin", _duration_range(0.1, 600), "3s",
            "A host stops a company's worker when lease_ttl - fence_margin has passed, by its own "
            "monotonic clock, since the start of its last successful renewal: before the lease can "
            "expire for the other hosts, if its clock runs no slower than the database's by more than "
            "fence_margin / lease_ttl. Also covers the time a worker takes to die.",
            reloadable=False, render=format_duration),
    Setting("cluster", "max_companies", _int_range(1, 100_000), 400,
            "Companies this host owns at most (each is a worker process: about 11-13 MiB with the "
            "zygote launcher). Hosts spread companies evenly below their caps.", reloadable=False),
)

#: The [pacing] keys, each also allowed in a company's pacing table.
PACING_KEYS = tuple(s.key for s in SETTINGS if s.section == "pacing")
_PACING_SETTINGS = {s.key: s for s in SETTINGS if s.section == "pacing"}


def _checked_size(value: object, lo: int, hi: int) -> int:
    size = parse_size(value)
    if not lo <= size <= hi:
        raise ValueError(f"expected a size from {format_size(lo)} to {format_size(hi)}")
    return size


_COMPANY_KEYS = ("id", "name", "engine", "proxy", "pacing")
MAX_NAME_LENGTH = 200


def check_company_name(value: object) -> str:
    """A company's display name, or ValueError saying why not: at most 200 characters, none of
    them a control or format character (a name is printed by whatsappctl and in logs, where such
    a character could rewrite the screen or forge a line; see whatsappd.terminal)."""
    if not isinstance(value, str) or len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"expected a string of at most {MAX_NAME_LENGTH} characters")
    index = first_unsafe(value)
    if index is not None:
        raise ValueError(f"character {index + 1} is {describe(value[index])}, a control or formatting character; "
                         "a name may not contain those (they could rewrite a terminal or forge a line)")
    return value


@dataclass(frozen=True)
class CompanyConfig:
    id: str
    name: str = ""
    engine: str = "neonize"
    proxy: str | None = None  # e.g. "socks5://127.0.0.1:1080"
    #: This company's [pacing] overrides: (key, parsed value) pairs, sorted by key.
    pacing: tuple[tuple[str, Any], ...] = ()

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.name:
            out["name"] = self.name
        out["engine"] = self.engine
        if self.proxy:
            out["proxy"] = self.proxy
        if self.pacing:
            out["pacing"] = {key: _render_pacing(key, value) for key, value in self.pacing}
        return out


@dataclass(frozen=True)
class Config:
    """The effective configuration. Attribute names are `{section}_{key}`."""

    source: str  # the file it came from, or "built-in defaults"
    daemon_state_dir: Path
    daemon_shutdown_timeout: float
    control_socket_path: Path
    control_socket_mode: int
    control_socket_group: str
    control_allowed_uids: tuple[int, ...]
    control_allowed_groups: tuple[int, ...]
    control_max_body_size: int
    control_idle_timeout: float
    control_max_connections: int
    control_max_connections_per_uid: int
    logging_format: str
    logging_level: str
    reconnect_initial_delay: float
    reconnect_multiplier: float
    reconnect_max_delay: float
    reconnect_stable_after: float
    reconnect_connect_rate: float
    reconnect_connect_timeout: float
    workers_heartbeat_interval: float
    workers_heartbeat_timeout: float
    workers_stop_grace: float
    workers_pairing_timeout: float
    workers_paired_connect_timeout: float
    workers_stuck_reconnecting_after: float
    workers_crash_limit: int
    workers_crash_window: float
    workers_launcher: str
    journal_max_age: float
    journal_max_events: int
    events_heartbeat_interval: float
    events_reader_buffer: int
    events_write_timeout: float
    outbox_default_ttl: float
    outbox_max_ttl: float
    outbox_idempotency_window: float
    outbox_send_timeout: float
    outbox_max_wait: float
    outbox_media_dirs: tuple[Path, ...]
    outbox_max_file_size: int
    outbox_default_country: str
    import_baileys_root: Path | None
    metrics_listen: ListenAddress | None
    pacing_enabled: bool
    pacing_rate: Rate
    pacing_burst: int
    pacing_jitter: float
    pacing_first_contact_per_day: int
    pacing_typing_per_char: float
    pacing_typing_max: float
    pacing_limit_pause: float

    webhook_delivery_timeout: float
    webhook_delivery_initial_delay: float
    webhook_delivery_max_delay: float
    webhook_delivery_failing_after: int

    simulator_server_dir: Path | None

    store_backend: str
    store_dsn: str

    cluster_enabled: bool
    cluster_host_id: str
    cluster_lease_ttl: float
    cluster_renew_interval: float
    cluster_fence_margin: float
    cluster_max_companies: int
    companies: tuple[CompanyConfig, ...] = ()
    webhooks: tuple[WebhookConfig, ...] = ()

    @property
    def sessions_dir(self) -> Path:
        return self.daemon_state_dir / "sessions"

    def company(self, company_id: str) -> CompanyConfig | None:
        return next((c for c in self.companies if c.id == company_id), None)

    def pacing_policy(self, company: CompanyConfig | None = None) -> PacingPolicy:
        """The [pacing] settings with company's overrides applied."""
        values = {key: getattr(self, f"pacing_{key}") for key in PACING_KEYS}
        values.update(company.pacing if company is not None else ())
        return PacingPolicy.from_settings(values)


# Every setting must have a field of the same name, and no field may lack a setting.
assert {s.attr for s in SETTINGS} == {f.name for f in fields(Config)} - {"source", "companies", "webhooks"}


def default_paths(env: Mapping[str, str] | None = None, uid: int | None = None) -> tuple[Path, Path]:
    """(state_dir, socket_path) when the config does not name them.

    systemd's StateDirectory=/RuntimeDirectory= win; then root's system paths; then the XDG
    per-user paths, so that a newcomer's `whatsappd run` works without root or a config file.
    """
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    home = Path(env.get("HOME") or Path.home())
    if env.get("STATE_DIRECTORY"):
        state = Path(env["STATE_DIRECTORY"].split(":")[0])
    elif uid == 0:
        state = Path("/var/lib/whatsappd")
    else:
        state = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state") / "whatsappd"
    if env.get("RUNTIME_DIRECTORY"):
        sock = Path(env["RUNTIME_DIRECTORY"].split(":")[0]) / "control.sock"
    elif uid == 0:
        sock = Path("/run/whatsappd/control.sock")
    elif env.get("XDG_RUNTIME_DIR"):
        sock = Path(env["XDG_RUNTIME_DIR"]) / "whatsappd" / "control.sock"
    else:
        # No per-user runtime dir (e.g. su without a login session): a private dir in the state dir.
        sock = state / "control.sock"
    return state, sock


def parse_companies(raw: object, problems: list[str]) -> tuple[CompanyConfig, ...]:
    if not isinstance(raw, list):
        problems.append("companies: expected a list of tables, written [[companies]]")
        return ()
    companies: list[CompanyConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        where = f"companies[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: expected a table, written [[companies]]")
            continue
        unknown = sorted(set(item) - set(_COMPANY_KEYS))
        for key in unknown:
            problems.append(f"{where}.{key}: unknown key (allowed: {', '.join(_COMPANY_KEYS)})")
        try:
            cid = check_company_id(item.get("id"))
        except InvalidCompanyId as exc:
            problems.append(f"{where}.id = {item.get('id')!r}: {exc}" if "id" in item
                            else f"{where}: missing required key 'id'")
            continue
        where = f"companies[{index}] (id {cid!r})"
        if cid in seen:
            problems.append(f"{where}: duplicate company id; each id may appear once")
            continue
        seen.add(cid)
        try:
            name = check_company_name(item.get("name", ""))
        except ValueError as exc:
            problems.append(f"{where}.name = {item.get('name')!r}: {exc}")
            continue
        engine = item.get("engine", "neonize")
        if engine not in ENGINES:
            problems.append(f"{where}.engine = {engine!r}: expected one of {', '.join(map(repr, ENGINES))}")
            continue
        proxy = item.get("proxy")
        if proxy is not None and (
            not isinstance(proxy, str) or not re.fullmatch(PROXY_PATTERN, proxy)
        ):
            problems.append(
                f"{where}.proxy = {proxy!r}: expected a proxy URL such as \"socks5://127.0.0.1:1080\""
            )
            continue
        pacing = parse_company_pacing(item.get("pacing", {}), f"{where}.pacing", problems)
        if pacing is None:
            continue
        companies.append(CompanyConfig(id=cid, name=name, engine=engine, proxy=proxy or None, pacing=pacing))
    return tuple(companies)


def parse_company_pacing(raw: object, where: str, problems: list[str]) -> tuple[tuple[str, Any], ...] | None:
    """A company's pacing overrides ({key: value}, keys of [pacing]); None (and problems) if invalid."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a table of [pacing] keys, e.g. {{ rate = \"6/min\", burst = 3 }}")
        return None
    before = len(problems)
    parsed: list[tuple[str, Any]] = []
    for key in sorted(raw):
        setting = _PACING_SETTINGS.get(key)
        if setting is None:
            problems.append(f"{where}.{key}: unknown key (allowed: {', '.join(PACING_KEYS)})")
            continue
        try:
            parsed.append((key, setting.parse(raw[key])))
        except ValueError as exc:
            problems.append(f"{where}.{key} = {_show(raw[key])}: {exc}")
    return tuple(parsed) if len(problems) == before else None


def _render_pacing(key: str, value: Any) -> Any:
    setting = _PACING_SETTINGS[key]
    return setting.render(value) if setting.render else value


def build_config(
    data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None, uid: int | None = None
) -> Config:
    """Validate a parsed TOML document. Collects every problem before raising ConfigError."""
    problems: list[str] = []
    sections = {s.section for s in SETTINGS}
    for key in data:
        if key not in sections and key not in ("companies", "webhooks"):
            allowed = ", ".join(f"[{s}]" for s in sorted(sections)) + ", [[companies]], [[webhooks]]"
            problems.append(f"{key}: unknown section or key (allowed: {allowed})")
    for section in sections:
        value = data.get(section, {})
        if not isinstance(value, dict):
            problems.append(f"{section}: expected a table, written [{section}]")
            continue
        known = {s.key for s in SETTINGS if s.section == section}
        for key in sorted(set(value) - known):
            problems.append(f"{section}.{key}: unknown key (allowed in [{section}]: {', '.join(sorted(known))})")

    state_default, socket_default = default_paths(env, uid)
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        table = data.get(setting.section, {})
        raw = table.get(setting.key, setting.default) if isinstance(table, dict) else setting.default
        if raw is None:  # computed default
            values[setting.attr] = state_default if setting.key == "state_dir" else socket_default
            continue
        try:
            values[setting.attr] = setting.parse(raw)
        except ValueError as exc:
            problems.append(f"{setting.dotted} = {_show(raw)}: {exc}")
    companies = parse_companies(data.get("companies", []), problems)
    webhooks = parse_webhooks(data.get("webhooks", []), problems)
    if not problems:
        if values["reconnect_max_delay"] < values["reconnect_initial_delay"]:
            problems.append(
                f"reconnect.max_delay = {_show(format_duration(values['reconnect_max_delay']))}: must not "
                f"be shorter than reconnect.initial_delay ({format_duration(values['reconnect_initial_delay'])})"
            )
        if values["workers_heartbeat_timeout"] <= values["workers_heartbeat_interval"] * 2:
            problems.append(
                "workers.heartbeat_timeout: must be more than twice workers.heartbeat_interval, "
                "or one late heartbeat would kill a healthy worker"
            )
        if values["webhook_delivery_max_delay"] < values["webhook_delivery_initial_delay"]:
            problems.append("webhook_delivery.max_delay: must not be shorter than webhook_delivery.initial_delay")
        root = values["import_baileys_root"]
        if root is not None and root.is_relative_to(values["daemon_state_dir"]):
            problems.append(
                f"import.baileys_root = {_show(str(root))}: must not lie inside daemon.state_dir "
                f"({values['daemon_state_dir']}): whatsappd's own sessions are never a Baileys source"
            )
    if values.get("store_backend") == "postgresql" and values.get("store_dsn") == "":
        problems.append('store.dsn: required with store.backend = "postgresql" (the database to use, '
                        'e.g. "postgresql://whatsappd@db.example.com/whatsappd")')
    _check_cluster(values, problems)
    if problems:
        raise ConfigError(source, problems)
    return Config(source=source, companies=companies, webhooks=webhooks, **values)


def _check_cluster(values: dict[str, Any], problems: list[str]) -> None:
    """The [cluster] keys together (each parsed alone already, when present in values); with
    enabled = true, an empty host_id becomes the machine's hostname (which must fit the rule)."""
    ttl, renew, margin = (values.get(f"cluster_{k}") for k in ("lease_ttl", "renew_interval", "fence_margin"))
    if ttl is not None and margin is not None and margin >= ttl:
        problems.append(f"cluster.fence_margin = {_show(format_duration(margin))}: must be shorter than "
                        f"cluster.lease_ttl ({format_duration(ttl)})")
    elif ttl is not None and margin is not None and renew is not None and renew > (ttl - margin) / 2:
        problems.append(f"cluster.renew_interval = {_show(format_duration(renew))}: must be at most (lease_ttl - "
                        f"fence_margin) / 2 = {format_duration((ttl - margin) / 2)}, so a host renews at least "
                        "twice before it must fence itself and one failed renewal does not cost its companies")
    if not values.get("cluster_enabled"):
        return
    if values.get("store_backend") != "postgresql":
        problems.append('cluster.enabled = true: needs store.backend = "postgresql" (the hosts share its '
                        "leases, company registry, journal and outbox); a single host on SQLite needs no [cluster]")
    if values.get("cluster_host_id") == "":
        hostname = socket.gethostname()
        try:
            values["cluster_host_id"] = _host_id(hostname)
        except ValueError:
            problems.append(f"cluster.host_id: not set, and this machine's hostname {_show(hostname)} does not fit "
                            "a host id (1 to 64 characters of A-Z, a-z, 0-9, \".\", \"_\" and \"-\", starting with "
                            "a letter or digit); set cluster.host_id")


def _show(raw: object) -> str:
    if isinstance(raw, str):
        return f'"{raw}"'
    return repr(raw)


def _syntax_error(path: Path, exc: tomllib.TOMLDecodeError) -> ConfigError:
    # tomllib says "Invalid value (at line 3, column 9)"; keep that, it is what a person needs.
    return ConfigError(str(path), [f"TOML syntax error: {exc}"])


def load_config(
    path: Path | None = None, env: Mapping[str, str] | None = None, uid: int | None = None
) -> Config:
    """Load the config file; with path=None, the default file if it exists, else built-ins.

    An explicitly named file that does not exist is an error (a typo must not silently run
    the daemon with defaults).
    """
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return build_config({}, "built-in defaults", env, uid)
        path = DEFAULT_CONFIG_PATH
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(path), ["the file does not exist; create it or pass --config with the right path"]) from None
    except IsADirectoryError:
        raise ConfigError(str(path), ["this is a directory, not a config file"]) from None
    except PermissionError:
        raise ConfigError(
            str(path), [f"permission denied reading the file as uid {os.getuid()}; check its owner and mode"]
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"the file is not UTF-8 text (byte {exc.start})"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, exc) from None
    return build_config(data, str(path), env, uid)


def render_config(config: Config) -> str:
    """The effective configuration as TOML, with each setting's help as a comment."""
    lines = [f"# effective configuration (from {config.source})"]
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]"]
        value = getattr(config, setting.attr)
        shown = setting.render(value) if setting.render else value
        lines.append(f"{setting.key} = {toml_value(shown)}")
    for company in config.companies:
        lines += ["", "[[companies]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in company.to_toml().items() if k != "pacing"]
        if company.pacing:
            lines += ["[companies.pacing]"] + [f"{k} = {toml_value(v)}" for k, v in company.to_toml()["pacing"].items()]
    for webhook in config.webhooks:  # the secret is never printed
        lines += ["", "[[webhooks]]"]
        lines += [f"{k} = {toml_value(v)}" for k, v in webhook.definition().items() if k != "secret"]
        lines.append("# secret: set, not shown")
    return "\n".join(lines) + "\n"


def toml_value(value: object) -> str:
    """A Python value as a TOML value (strings escaped, lists and numbers as TOML writes them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    # A TOML basic string has JSON's escapes; DEL is the one control character JSON leaves raw.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes: companies by id, settings by dotted key."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()  # reloadable settings that changed (applied)
    restart_required: tuple[str, ...] = ()  # settings that changed but apply only at restart

    def as_dict(self) -> dict[str, list[str]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self)}

    @property
    def empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(self))


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    old_c = {c.id: c for c in old.companies}
    new_c = {c.id: c for c in new.companies}
    settings: list[str] = []
    restart: list[str] = []
    for setting in SETTINGS:
        if getattr(old, setting.attr) != getattr(new, setting.attr):
            (settings if setting.reloadable else restart).append(setting.dotted)
    return ConfigDiff(
        added=tuple(sorted(new_c.keys() - old_c.keys())),
        removed=tuple(sorted(old_c.keys() - new_c.keys())),
        changed=tuple(sorted(k for k in old_c.keys() & new_c.keys() if old_c[k] != new_c[k])),
        settings=tuple(settings),
        restart_required=tuple(restart),
    )


def example_file(settings: Iterable[Setting] = SETTINGS) -> str:
    """The documented example config (etc/whatsappd.toml is this, checked by a test)."""
    lines = [
        "# whatsappd configuration: /etc/whatsappd/whatsappd.toml",
        "# Every key is optional; the value shown is the built-in default.",
        "# Durations are written like \"30s\", \"5m\", \"1h30m\"; sizes like \"16MiB\".",
        "# Check a file with: whatsappd check-config --config PATH",
    ]
    section = None
    for setting in settings:
        if setting.section != section:
            section = setting.section
            lines += ["", f"[{section}]"]
        lines.append("")
        lines += [f"# {line}" for line in _wrap(setting.help)]
        default = setting.default
        if default is None:  # computed: show what root gets without systemd
            state, sock = default_paths(env={}, uid=0)
            default = str(state if setting.key == "state_dir" else sock)
        default = toml_value(default)
        lines.append(f"#{setting.key} = {default}")
    lines += [
        "",
        "# One table per company. id: ^[a-z0-9][a-z0-9_-]{0,63}$ (it names the session directory).",
        "# engine: \"neonize\" (real WhatsApp, default) or \"simulator\" (a fake for development).",
        "# proxy: optional, e.g. \"socks5://127.0.0.1:1080\".",
        "#[[companies]]",
        "#id = \"acme\"",
        "#name = \"ACME Imóveis\"",
        "#engine = \"neonize\"",
        "# Optional, after a company's keys: its own pacing (any [pacing] key), e.g. for a number",
        "# that has sent for years:",
        "#   [companies.pacing]",
        "#   rate = \"10/min\"",
        "#   first_contact_per_day = 40",

        "",
        "# One table per webhook (README \"Webhooks\"): every journal event matching its filters is",
        "# POSTed to url, signed with secret (HMAC-SHA256). url: http://, https:// or",
        "# \"unix:/path/to.sock:/route\". events, companies: empty or left out: all.",
        "# Webhooks added with PUT /v1/webhooks/{id} cannot reuse an id defined here.",
        "#[[webhooks]]",
        "#id = \"crm\"",
        "#url = \"https://crm.example.com/hooks/whatsapp\"",
        "#secret = \"<the output of: openssl rand -hex 32>\"",
        "#events = [\"message.incoming\", \"message.status\"]",
        "#companies = []",
    ]
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int = 92) -> list[str]:
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return out + ([line] if line else [])

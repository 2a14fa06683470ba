"""Logging: structlog, one event per line, rendered for wherever stderr goes.

- journald (JOURNAL_STREAM names stderr's dev:ino): logfmt with a `<N>` syslog priority prefix,
  which journald turns into the entry's priority (so `journalctl -p warning` filters), and no
  timestamp of our own (the journal has one);
- a terminal: structlog's console renderer;
- anything else (files, pipes, containers): JSON with an ISO timestamp.

Standard-library loggers (aiohttp, neonize's Python side) go through the same renderer.
Secrets (QR codes, pairing codes, keys, message bodies) are never rendered at info or above.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["SENSITIVE_KEYS", "configure_logging", "current_format", "detect_format", "get_logger"]

#: Keys whose values are secret: they are replaced by "[redacted]" unless the level is debug.
SENSITIVE_KEYS = frozenset(
    {"qr", "qr_code", "code", "pair_code", "pairing_code", "key", "keys", "secret", "text", "body",
     "caption", "content", "password", "token"}
)

_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3, "critical": 2}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


_current: dict[str, Any] = {"format": "json"}


def current_format() -> str:
    """The format in use (resolved from 'auto'); workers are told to log the same way."""
    return str(_current["format"])


def get_logger(**bound: Any) -> Any:
    """The daemon's logger (a structlog bound logger; `company=` binds a company)."""
    return structlog.get_logger("whatsappd", **bound)


def detect_format(stream: TextIO, env: MutableMapping[str, str] | None = None) -> str:
    """'journal', 'console' or 'json' for a stream, following systemd's JOURNAL_STREAM rule."""
    env = os.environ if env is None else env
    try:
        fileno = stream.fileno()
        stat = os.fstat(fileno)
    except (OSError, ValueError, AttributeError):
        return "json"
    journal = env.get("JOURNAL_STREAM", "")
    if journal and journal == f"{stat.st_dev}:{stat.st_ino}":
        return "journal"
    if os.isatty(fileno):
        return "console"
    return "json"


def _redact(_logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    if method != "debug":
        for key in SENSITIVE_KEYS.intersection(event):
            event[key] = "[redacted]"
    return event


class _JournalRenderer:
    """logfmt with the syslog priority as a `<N>` prefix (sd-daemon(3) convention)."""

    def __init__(self) -> None:
        self._logfmt = structlog.processors.LogfmtRenderer(
            key_order=["event", "company"], drop_missing=True, bool_as_flag=False
        )

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = str(event.get("level", method))
        line = self._logfmt(logger, method, event)
        # A multi-line value (a traceback) must not start unprefixed journal entries.
        line = line.replace("\n", "\\n")
        return f"<{_PRIORITY.get(level, 6)}>{line}"


def configure_logging(
    fmt: str = "auto", level: str = "info", stream: TextIO | None = None
) -> str:
    """Set up structlog and the stdlib root logger; return the format actually used.

    Safe to call again (on reload): handlers are replaced, not added. Called again with what is
    in force already, it changes nothing (a zygote's worker: rebuilding it all would copy part of
    the zygote's heap into each worker).
    """
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = detect_format(stream)
    root = logging.getLogger()
    installed = _current.get("handler")
    if (_current.get("args") == (fmt, level, stream) and root.handlers == [installed]
            and root.level == _LEVELS[level] and structlog.get_config()["processors"] is _current.get("processors")):
        return fmt
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.ExtraAdder(),
        _redact,
    ]
    if fmt != "journal":
        shared.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    renderer: Any
    if fmt == "journal":
        renderer = _JournalRenderer()
    elif fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=True)
    else:
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    pre_render: list[Any] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if fmt != "console":
        pre_render.append(structlog.processors.format_exc_info)

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[*pre_render, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    # aiohttp's access log duplicates our own request line; its other loggers stay useful.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    processors = [*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter]
    structlog.configure(
        processors=processors,
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,
    )
    _current.update(format=fmt, args=(fmt, level, stream), handler=handler, processors=processors)
    return fmt

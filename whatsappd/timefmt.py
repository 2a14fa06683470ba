"""Times as the API, the journal and the workers write them: ISO 8601, UTC, milliseconds, Z."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["iso", "iso_or_none", "parse_iso"]


def iso(ts: float) -> str:
    """A Unix time as e.g. 2026-11-29T07:35:41.123Z."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(ts: float | None) -> str | None:
    return None if ts is None else iso(ts)


def parse_iso(text: object) -> float | None:
    """An ISO 8601 time (a Z suffix accepted) as a Unix time; None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()

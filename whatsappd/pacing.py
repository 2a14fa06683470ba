"""Send pacing: when a company's next message may go out, decided from numbers alone.

Why: WhatsApp restricts or bans numbers that send like a machine. whatsmeow's maintainers answer
ban reports with "don't spam"; users report restrictions (error 463) after 20-30 messages a day
to people who never wrote first, and bans after bursts of 5-8 such messages. So each company's
outbox passes three gates before every send (README: "Send pacing"):

- a token bucket (`rate`, `burst`): at most `burst` messages back to back, then one per 1/rate;
- random jitter: each send waits an extra uniform(0, `jitter`) after the bucket allows it, so
  the gaps are not machine-regular (the bucket refills meanwhile: the long-run rate stays `rate`);
- a first-contact budget: at most `first_contact_per_day` distinct recipients who never wrote to
  this number, in any rolling 24 hours (the store counts them, so it holds across restarts).

And a pause: when WhatsApp answers a send with a rate-limit or restriction error, the company
sends nothing for `limit_pause`.

Everything here is pure: the caller passes the time (`now`, Unix seconds) and what the store
knows; randomness comes from an injected `random.Random`. The sender (sender.py) asks
`CompanyPacer.decide` before each send and waits until the answer's time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "FIRST_CONTACT_WINDOW",
    "CompanyPacer",
    "PacingPolicy",
    "Rate",
    "Wait",
    "WaitReason",
    "bucket_slack",
    "bucket_violations",
    "parse_rate",
]

#: The first-contact budget counts recipients over this many seconds, rolling (not calendar days,
#: so no time zone decides when it refills).
FIRST_CONTACT_WINDOW = 86400.0

_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}
_RATE_HINT = 'expected a rate such as "6/min", "20/h" or "1/s" (a number, "/", and s, min, h or d)'


@dataclass(frozen=True)
class Rate:
    """A send rate as written ("6/min") and as used (per second)."""

    text: str
    per_second: float

    def __str__(self) -> str:
        return self.text


def parse_rate(value: object) -> Rate:
    """'6/min', '20/h', '1/s', '0.5/s' -> Rate; ValueError saying what is expected otherwise."""
    if not isinstance(value, str):
        raise ValueError(_RATE_HINT)
    match = _RATE.fullmatch(value)
    if match is None:
        raise ValueError(_RATE_HINT)
    count = float(match.group(1))
    if count <= 0:
        raise ValueError("a rate must be more than zero; " + _RATE_HINT)
    per_second = count / _RATE_UNITS[match.group(2)]
    if per_second > 1000:
        raise ValueError("a rate above 1000/s is not pacing; " + _RATE_HINT)
    return Rate(f"{match.group(1)}/{match.group(2)}", per_second)


@dataclass(frozen=True)
class PacingPolicy:
    """One company's pacing settings, effective (the [pacing] section with the company's overrides)."""

    enabled: bool = True
    rate: Rate = Rate("4/min", 4 / 60)
    burst: int = 3
    jitter: float = 3.0  # seconds
    first_contact_per_day: int = 15
    typing_per_char: float = 0.04  # seconds of "typing…" per character of a text; 0: none
    typing_max: float = 6.0
    limit_pause: float = 3600.0  # seconds without sending after a rate-limit error

    @classmethod
    def from_settings(cls, values: dict[str, Any]) -> PacingPolicy:
        """From {key: parsed value} of the [pacing] settings (config.py's names without the prefix)."""
        return cls(**{k: v for k, v in values.items() if k in cls.__dataclass_fields__})

    def typing_for(self, kind: str, text: str | None) -> float:
        """Seconds of "typing…" presence before sending this message (texts only, and only when on)."""
        if not self.enabled or kind != "text" or not text or self.typing_per_char <= 0:
            return 0.0
        return round(min(len(text) * self.typing_per_char, self.typing_max), 3)


class WaitReason(StrEnum):
    """Why a company's next message waits (the API's `paced_reason`)."""

    RATE = "rate"  # the token bucket, or the jitter after the previous send
    FIRST_CONTACT_BUDGET = "first_contact_budget"  # too many new recipients in the last 24 h
    PAUSED = "paused"  # WhatsApp answered with a rate-limit error


@dataclass(frozen=True)
class Wait:
    """The next message may not go before `until` (Unix seconds), for `reason`."""

    until: float
    reason: WaitReason


class _Bucket:
    """A token bucket: `burst` tokens at most, refilled at `rate` per second; a send takes one.

    Its state changes only when a send takes a token, so `ready_at` is a fixed moment that a
    later call (at any time) answers the same, and the jitter can be added to it.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.at = now  # when tokens was counted

    def ready_at(self) -> float:
        """When the bucket holds a whole token (the past, if it does already)."""
        return self.at + max(0.0, 1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        # max(0, ...): a wall clock set back refills nothing rather than draining tokens.
        self.tokens = min(float(self.burst), self.tokens + max(0.0, now - self.at) * self.rate) - 1
        self.at = max(self.at, now)


class CompanyPacer:
    """One company's pacing state: its bucket, the jitter drawn for its next send, and a pause."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._bucket: _Bucket | None = None
        self.last_send: float | None = None
        self._jitter = 0.0  # drawn after each send, for the next one
        self.paused_until: float | None = None
        self.pause_reason: str | None = None

    def _bucket_for(self, policy: PacingPolicy, now: float) -> _Bucket:
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = _Bucket(policy.rate.per_second, policy.burst, now)
        elif (bucket.rate, bucket.burst) != (policy.rate.per_second, policy.burst):
            # A reload changed the settings: keep what is spent, under the new cap.
            bucket.rate, bucket.burst = policy.rate.per_second, policy.burst
            bucket.tokens = min(bucket.tokens, float(policy.burst))
        return bucket

    def restore(self, policy: PacingPolicy, sent_times: Sequence[float]) -> None:
        """Replay the company's recent send times (oldest first), so a restart grants no new burst."""
        for at in sent_times:
            self._bucket_for(policy, at).take(at)
            self.last_send = at

    def decide(self, policy: PacingPolicy, now: float, first_contacts: Sequence[float] | None = None) -> Wait | None:
        """None: the next message may reach WhatsApp at now; else until when it waits, and why.

        now may lie ahead of the clock by the "typing…" time that precedes the send: the
        constraints hold for the moment the message reaches WhatsApp.

        first_contacts: for a message to a recipient who never wrote to this number (and was not
        contacted within the window already), the times the other first contacts of the last 24 h
        were made, any order; None for a known recipient.
        """
        if self.paused_until is not None:
            if now < self.paused_until:
                return Wait(self.paused_until, WaitReason.PAUSED)
            self.paused_until = self.pause_reason = None
        if not policy.enabled:
            return None
        ready = self._bucket_for(policy, now).ready_at()
        if self.last_send is not None:
            # The jitter comes on top of what the bucket allows, so even a steady stream's gaps vary.
            ready = max(ready, self.last_send) + self._jitter
        waits = [Wait(ready, WaitReason.RATE)]
        if first_contacts is not None:
            recent = sorted(t for t in first_contacts if t > now - FIRST_CONTACT_WINDOW)
            if len(recent) >= policy.first_contact_per_day:
                # Free again once enough of them leave the window for one more to fit.
                oldest_to_leave = recent[len(recent) - policy.first_contact_per_day]
                waits.append(Wait(oldest_to_leave + FIRST_CONTACT_WINDOW, WaitReason.FIRST_CONTACT_BUDGET))
        latest = max(waits, key=lambda w: w.until)
        return latest if latest.until > now else None

    def sent(self, policy: PacingPolicy, now: float) -> None:
        """A send went out at now: it took a token; draw the jitter before the next one."""
        if policy.enabled:
            self._bucket_for(policy, now).take(now)
        self.last_send = now
        self._jitter = self._rng.uniform(0.0, policy.jitter) if policy.enabled and policy.jitter > 0 else 0.0

    def pause(self, until: float, reason: str) -> None:
        self.paused_until, self.pause_reason = until, reason


def bucket_slack(times: Sequence[float], rate: float, burst: int) -> list[float]:
    """For each send (Unix times, in order), how long after a token bucket of (rate, burst), full at
    the first send, would have allowed it (at least; 0 for the first): < 0 came that much too early."""
    slack: list[float] = []
    tokens, last = float(burst), times[0] if times else 0.0
    for index, at in enumerate(times):
        tokens = min(float(burst), tokens + max(0.0, at - last) * rate)
        if tokens < 1:
            slack.append(-(1 - tokens) / rate)
        else:
            slack.append(0.0 if index == 0 else min(at - last, (tokens - 1) / rate))
        last = max(last, at)
        tokens -= 1
    return slack


def bucket_violations(times: Sequence[float], rate: float, burst: int, tolerance: float = 0.002) -> list[str]:
    """Which sends (Unix times, in order) a token bucket of (rate, burst), full at the first send,
    would not have allowed; tolerance: seconds of timestamp rounding forgiven per send. []: all fit."""
    problems = [f"send {n + 1} at {b:.3f} is earlier than the one before it ({a:.3f})"
                for n, (a, b) in enumerate(zip(times, times[1:], strict=False), start=1) if b < a]
    problems += [f"send {n + 1} came {-s:.3f}s before the bucket had a token"
                 for n, s in enumerate(bucket_slack(times, rate, burst)) if s < -tolerance]
    return problems

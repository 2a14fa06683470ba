"""Reconnect pacing: per-company capped exponential backoff with full jitter, and one global limit
on how many new connection attempts start per second.

Both exist for the same reason: reconnect storms get numbers banned. Full jitter spreads the
companies that failed together (a network return, a daemon restart) over the whole delay
window instead of retrying in lockstep; the rate limiter bounds the worst case regardless.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Backoff", "BackoffPolicy", "Clock", "RateLimiter", "Uniform"]

#: Seconds from an arbitrary origin that never goes backwards (time.monotonic by default).
Clock = Callable[[], float]


class Uniform(Protocol):
    """Anything with random.uniform's signature: the random module or a random.Random."""

    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait before reconnect attempt n: uniform(0, min(max_delay, initial_delay * multiplier**n))."""

    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    stable_after: float = 60.0  # seconds connected before the failure count starts over

    def __post_init__(self) -> None:
        for name in ("initial_delay", "multiplier", "max_delay", "stable_after"):
            value = getattr(self, name)
            # bool is an int; True seconds would be a typo, not a setting.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"backoff {name} must be a number of seconds, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"backoff {name} must be a positive finite number, got {value!r}")
        if self.multiplier < 1:
            raise ValueError(
                f"backoff multiplier must be at least 1 (delays must not shrink), got {self.multiplier!r}"
            )
        if self.max_delay < self.initial_delay:
            raise ValueError(
                f"backoff max_delay ({self.max_delay!r}) must not be smaller than "
                f"initial_delay ({self.initial_delay!r})"
            )

    def cap(self, attempt: int) -> float:
        """The upper bound of the delay before attempt number `attempt` (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be 0 or more, got {attempt}")
        if self.multiplier == 1:
            return float(self.initial_delay)
        # multiplier**attempt raises OverflowError for large attempts (near 1024 for 2.0), so
        # never compute it once the cap is reached: below this exponent the power stays under
        # max_delay/initial_delay, hence finite. Rounding in the log at most moves the switch
        # by one attempt, where min() gives the same answer either way.
        if attempt >= math.ceil(math.log(self.max_delay / self.initial_delay, self.multiplier)):
            return float(self.max_delay)
        return float(min(self.max_delay, self.initial_delay * self.multiplier**attempt))


class Backoff:
    """One company's reconnect state: consecutive failures and when it last connected.

    The supervisor calls next_delay() after each failed attempt or dropped connection, and
    connected() when a connection comes up. The failure count starts over only once a
    connection has lasted stable_after seconds: a session that connects and drops at once
    (bad session, flapping network) must keep backing off, not retry every initial_delay.
    """

    def __init__(self, policy: BackoffPolicy | None = None, *, clock: Clock = time.monotonic) -> None:
        self._policy = policy if policy is not None else BackoffPolicy()
        self._clock = clock
        self._attempt = 0
        self._connected_since: float | None = None

    @property
    def policy(self) -> BackoffPolicy:
        return self._policy

    @policy.setter
    def policy(self, policy: BackoffPolicy) -> None:
        # A config reload keeps the failure count: the new bounds apply from the next delay.
        self._policy = policy

    @property
    def attempt(self) -> int:
        """Consecutive failures so far; the next delay is drawn for this attempt number."""
        return self._attempt

    @property
    def connected_since(self) -> float | None:
        return self._connected_since

    def next_delay(self, rng: Uniform = random) -> float:
        """Seconds to wait before the next attempt; counts one more failure.

        A connection that was up long enough resets the count first, so a drop after hours of
        service retries quickly even if nobody called maybe_reset() in between.
        """
        self.maybe_reset()
        self._connected_since = None
        delay = rng.uniform(0.0, self._policy.cap(self._attempt))
        self._attempt += 1
        return delay

    def connected(self, now: float | None = None) -> None:
        """Record that a connection is up (since now, default the clock)."""
        self._connected_since = self._clock() if now is None else now

    def maybe_reset(self, now: float | None = None) -> bool:
        """Reset the failure count if connected for at least stable_after; True if it did."""
        if self._connected_since is None:
            return False
        now = self._clock() if now is None else now
        if now - self._connected_since < self._policy.stable_after:
            return False
        self._attempt = 0
        return True

    def reset(self) -> None:
        """Forget all failures (e.g. an operator asked for a reconnect now)."""
        self._attempt = 0
        self._connected_since = None


# A token this close to whole counts as whole: float refill arithmetic can land a hair short
# of 1.0 exactly at the scheduled moment, which would only cost one more tiny timer.
_EPSILON = 1e-9


class RateLimiter:
    """A token bucket for new connection attempts, shared by all companies; asyncio only.

    acquire() waits first come, first served. There is no polling: while anyone waits, one
    timer is armed for the exact moment the next token is due. The bucket starts full.
    All methods must be called from the event loop's thread.
    """

    def __init__(self, rate: float, burst: int = 1, *, clock: Clock = time.monotonic) -> None:
        self._rate = _check_rate(rate)
        self._burst = _check_burst(burst)
        self._clock = clock
        self._tokens = float(self._burst)
        self._updated = clock()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    @property
    def rate(self) -> float:
        """Tokens (connection attempts) per second."""
        return self._rate

    @rate.setter
    def rate(self, rate: float) -> None:
        # Tokens earned so far were earned at the old rate; only the future uses the new one.
        rate = _check_rate(rate)
        self._refill(self._clock())
        self._rate = rate
        self._dispatch()

    @property
    def burst(self) -> int:
        """How many attempts may start back to back after a quiet period."""
        return self._burst

    @burst.setter
    def burst(self, burst: int) -> None:
        burst = _check_burst(burst)
        self._refill(self._clock())
        self._burst = burst
        self._tokens = min(self._tokens, burst)
        self._dispatch()

    @property
    def waiting(self) -> int:
        """How many acquire() calls are waiting for a token."""
        return sum(1 for f in self._waiters if not f.done())

    def try_acquire(self) -> bool:
        """Take a token if one is free and nobody is queued ahead; never waits."""
        if self._waiters:
            return False
        self._refill(self._clock())
        if self._tokens < 1 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1)
        return True

    async def acquire(self) -> None:
        """Wait until this caller may start one connection attempt (FIFO among waiters)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        # Granting right away sets the result before the await, which then does not yield.
        self._dispatch()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Granted, but our task was cancelled before it could use the token: hand it
                # to the next waiter rather than lose it.
                self._refill(self._clock())
                self._tokens = min(float(self._burst), self._tokens + 1)
            else:
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            self._dispatch()
            raise

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self._updated)  # a clock must not go backwards; be safe anyway
        self._tokens = min(float(self._burst), self._tokens + elapsed * self._rate)
        self._updated = now

    def _dispatch(self) -> None:
        """Grant tokens to the head of the queue, then arm one timer for the next token."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._refill(self._clock())
        while self._waiters:
            head = self._waiters[0]
            if head.done():  # cancelled; its acquire() removes it later, skip it now
                self._waiters.popleft()
                continue
            if self._tokens < 1 - _EPSILON:
                break
            self._waiters.popleft()
            self._tokens = max(0.0, self._tokens - 1)
            head.set_result(None)
        if self._waiters:
            delay = (1 - self._tokens) / self._rate
            self._timer = self._waiters[0].get_loop().call_later(delay, self._dispatch)


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"the connection rate must be a positive number of attempts per second, got {rate!r}")
    return float(rate)


def _check_burst(burst: int) -> int:
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"the connection burst must be a whole number of at least 1, got {burst!r}")
    return burst

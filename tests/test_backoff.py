"""whatsappd.supervisor.backoff: capped exponential backoff with full jitter, and the connect-rate limiter."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import pytest

from whatsappd.supervisor.backoff import Backoff, BackoffPolicy, RateLimiter


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class UpperBound:
    """An rng that always returns the top of the range, exposing the cap next_delay used."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --- BackoffPolicy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial_delay": 0}, "initial_delay must be a positive"),
        ({"initial_delay": -1}, "initial_delay must be a positive"),
        ({"max_delay": math.inf}, "max_delay must be a positive finite"),
        ({"multiplier": math.nan}, "multiplier must be a positive finite"),
        ({"stable_after": 0}, "stable_after must be a positive"),
        ({"multiplier": 0.5}, "multiplier must be at least 1"),
        ({"initial_delay": 10, "max_delay": 5}, "must not be smaller than initial_delay"),
        ({"initial_delay": True}, "must be a number of seconds"),
        ({"max_delay": "300"}, "must be a number of seconds"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], message: str) -> None:
    """Invalid policies raise ValueError with a sentence naming the setting."""
    with pytest.raises(ValueError, match=message):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_accepts_edge_values() -> None:
    """multiplier 1 (constant delay) and max == initial are valid policies."""
    assert BackoffPolicy(multiplier=1).cap(50) == 1.0
    assert BackoffPolicy(initial_delay=5, max_delay=5).cap(0) == 5.0


def test_cap_grows_exponentially_then_stays_at_max() -> None:
    """cap(n) = min(max, initial * multiplier**n): 1, 2, 4, ... 256, then 300 for good."""
    policy = BackoffPolicy()
    assert [policy.cap(n) for n in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


@pytest.mark.parametrize("attempt", [1024, 10_000, 10**18])
def test_cap_never_overflows(attempt: int) -> None:
    """Huge attempt counts give max_delay, not an OverflowError."""
    assert BackoffPolicy().cap(attempt) == 300.0
    assert BackoffPolicy(multiplier=1e300).cap(attempt) == 300.0
    # A multiplier barely above 1 takes millions of attempts to reach the cap, but gets there.
    assert BackoffPolicy(multiplier=1.000001).cap(attempt * 10**7) == 300.0


# --- Backoff -------------------------------------------------------------------------------


def test_next_delay_uses_the_cap_of_the_current_attempt() -> None:
    """The n-th consecutive failure draws from [0, cap(n)], starting at attempt 0."""
    backoff = Backoff(BackoffPolicy(initial_delay=1, multiplier=3, max_delay=50))
    assert backoff.attempt == 0
    assert [backoff.next_delay(UpperBound()) for _ in range(6)] == [1, 3, 9, 27, 50, 50]
    assert backoff.attempt == 6


def test_full_jitter_distribution() -> None:
    """Delays are never negative nor above the cap, and average half the cap (full jitter)."""
    rng = random.Random(20240601)
    policy = BackoffPolicy(initial_delay=1, multiplier=2, max_delay=8)
    backoff = Backoff(policy)
    at_cap: list[float] = []
    for _ in range(20_000):
        cap = policy.cap(backoff.attempt)
        delay = backoff.next_delay(rng)
        assert 0.0 <= delay <= cap
        if cap == 8:
            at_cap.append(delay)
    assert statistics.fmean(at_cap) == pytest.approx(4.0, abs=0.1)
    # Full jitter uses the whole window, not just its top half.
    assert min(at_cap) < 0.1 and max(at_cap) > 7.9


def test_default_rng_is_the_random_module() -> None:
    """Without an rng argument next_delay still stays within the cap."""
    backoff = Backoff()
    assert all(0 <= backoff.next_delay() <= BackoffPolicy().cap(n) for n in range(20))


def test_reset_only_after_a_stable_connection() -> None:
    """The failure count resets after stable_after seconds connected, not before."""
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy(stable_after=60), clock=clock)
    for _ in range(3):
        backoff.next_delay(UpperBound())
    backoff.connected()
    clock.now += 59.9
    assert backoff.maybe_reset() is False
    assert backoff.attempt == 3
    clock.now += 0.1
    assert backoff.maybe_reset() is True
    assert backoff.attempt == 0


def test_short_connection_keeps_backing_off() -> None:
    """A connection that drops before stable_after does not reset, even much later."""
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy(stable_after=60), clock=clock)
    backoff.next_delay(UpperBound())
    backoff.next_delay(UpperBound())
    backoff.connected()
    clock.now += 5
    assert backoff.next_delay(UpperBound()) == 4.0  # attempt 2: still growing
    clock.now += 1000  # long after the drop: that connection no longer counts
    assert backoff.maybe_reset() is False
    assert backoff.attempt == 3


def test_drop_after_stable_connection_starts_over() -> None:
    """next_delay after a long-lived connection starts from attempt 0 without maybe_reset()."""
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy(stable_after=60), clock=clock)
    for _ in range(5):
        backoff.next_delay(UpperBound())
    backoff.connected()
    clock.now += 3600
    assert backoff.next_delay(UpperBound()) == 1.0
    assert backoff.attempt == 1


def test_connected_accepts_an_explicit_time() -> None:
    """connected(now)/maybe_reset(now) work with times given by the caller."""
    backoff = Backoff(BackoffPolicy(stable_after=10), clock=FakeClock(0))
    backoff.next_delay(UpperBound())
    backoff.connected(100.0)
    assert backoff.maybe_reset(105.0) is False
    assert backoff.maybe_reset(110.0) is True


def test_reset_forgets_everything() -> None:
    """reset() zeroes the count and forgets the connection."""
    backoff = Backoff(clock=FakeClock())
    backoff.next_delay(UpperBound())
    backoff.connected()
    backoff.reset()
    assert backoff.attempt == 0 and backoff.connected_since is None


def test_policy_swap_keeps_the_count() -> None:
    """A reloaded policy applies from the next delay; the failure count is kept."""
    backoff = Backoff(BackoffPolicy(max_delay=300))
    for _ in range(4):
        backoff.next_delay(UpperBound())
    backoff.policy = BackoffPolicy(max_delay=10)
    assert backoff.next_delay(UpperBound()) == 10.0
    assert backoff.attempt == 5


# --- RateLimiter: token arithmetic with a fake clock ----------------------------------------


def test_try_acquire_spaces_tokens_by_the_rate() -> None:
    """At 2/s with burst 1, a token is free every 0.5 s and no sooner."""
    clock = FakeClock()
    limiter = RateLimiter(2, clock=clock)
    assert limiter.try_acquire() is True
    assert limiter.try_acquire() is False
    clock.now += 0.49
    assert limiter.try_acquire() is False
    clock.now += 0.01
    assert limiter.try_acquire() is True


def test_burst_allows_back_to_back_then_refills_to_burst_only() -> None:
    """A full bucket of burst N allows N at once; a long idle time does not bank more."""
    clock = FakeClock()
    limiter = RateLimiter(1, burst=3, clock=clock)
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]
    clock.now += 3600
    assert [limiter.try_acquire() for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("rate", [0, -1, math.inf, math.nan, True])
def test_rate_validation(rate: float) -> None:
    """The rate must be a positive finite number, at construction and at run time."""
    with pytest.raises(ValueError, match="connection rate"):
        RateLimiter(rate)
    limiter = RateLimiter(1)
    with pytest.raises(ValueError, match="connection rate"):
        limiter.rate = rate
    assert limiter.rate == 1.0


@pytest.mark.parametrize("burst", [0, 1.5, True])
def test_burst_validation(burst: int) -> None:
    """The burst must be a whole number of at least 1."""
    with pytest.raises(ValueError, match="connection burst"):
        RateLimiter(1, burst=burst)


# --- RateLimiter: real asyncio, real time ----------------------------------------------------


def test_acquires_are_spaced_and_fifo() -> None:
    """10 acquires at 20/s take about 0.45 s, 0.05 s apart, in the order they queued."""

    async def main() -> tuple[list[int], list[float]]:
        limiter = RateLimiter(20)
        order: list[int] = []
        times: list[float] = []

        async def one(i: int) -> None:
            await limiter.acquire()
            order.append(i)
            times.append(time.monotonic())

        start = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(10)))
        return order, [t - start for t in times]

    order, times = asyncio.run(main())
    assert order == list(range(10))
    # Lower bounds are exact by construction; upper bounds leave room for a loaded CI machine.
    assert 0.44 <= times[-1] < 0.7
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert min(gaps) >= 0.045


def test_rate_change_applies_to_waiters() -> None:
    """Raising the rate while someone waits lets them in early; lowering it delays them."""

    async def main() -> tuple[float, float]:
        limiter = RateLimiter(1)
        await limiter.acquire()  # empties the bucket
        start = time.monotonic()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.1)
        limiter.rate = 20  # 0.1 token earned at 1/s; 0.9 more at 20/s = 0.045 s
        await waiter
        faster = time.monotonic() - start

        limiter.rate = 20
        await limiter.acquire()
        start = time.monotonic()
        waiter = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.01)
        limiter.rate = 4  # ~0.2 token earned; 0.8 more at 4/s = 0.2 s
        await waiter
        slower = time.monotonic() - start
        return faster, slower

    faster, slower = asyncio.run(main())
    assert 0.13 <= faster < 0.5  # at the old rate it would have been 1 s
    assert 0.19 <= slower < 0.6  # at the old rate it would have been 0.05 s


def test_cancelled_waiter_does_not_hold_up_the_queue() -> None:
    """A cancelled acquire gives up its place: the next waiter gets the very next token."""

    async def main() -> float:
        limiter = RateLimiter(10)
        await limiter.acquire()
        start = time.monotonic()
        first = asyncio.create_task(limiter.acquire())
        second = asyncio.create_task(limiter.acquire())
        await asyncio.sleep(0.02)
        first.cancel()
        await second
        elapsed = time.monotonic() - start
        with pytest.raises(asyncio.CancelledError):
            await first
        assert limiter.waiting == 0
        return elapsed

    # 0.1 s is the next token; had the cancelled task kept its place it would be 0.2 s.
    assert 0.09 <= asyncio.run(main()) < 0.19


def test_waiting_does_not_busy_poll() -> None:
    """A long wait sleeps: the process uses almost no CPU while a waiter waits 0.5 s."""

    async def main() -> tuple[float, float]:
        limiter = RateLimiter(2)
        await limiter.acquire()
        wall, cpu = time.monotonic(), time.process_time()
        await limiter.acquire()
        return time.monotonic() - wall, time.process_time() - cpu

    wall, cpu = asyncio.run(main())
    assert wall >= 0.49
    assert cpu < 0.05


def test_limiter_binds_to_no_event_loop() -> None:
    """A limiter built outside any loop works in asyncio.run, and keeps its bucket across runs."""
    limiter = RateLimiter(1, burst=2)
    start = time.monotonic()
    asyncio.run(limiter.acquire())
    asyncio.run(limiter.acquire())
    assert time.monotonic() - start < 0.5
    assert limiter.try_acquire() is False  # the burst of 2 is spent; the next token is 1 s away

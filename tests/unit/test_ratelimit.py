"""MemoryRateLimiter on a fake clock: bursts, refill, both-or-neither, debt, threads, concurrency slots."""

from __future__ import annotations

import threading

import pytest

from prefixserve.adapters.errors import BadRequestError, InvalidIdError, RateLimitedError
from prefixserve.adapters.ratelimit import (
    MemoryRateLimiter,
    RateLimits,
    RedisRateLimiter,
    open_rate_limiter,
)
from tests.fixtures.ratelimit import passes, refusal


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryRateLimiter:
    return MemoryRateLimiter(clock=clock)


def test_burst_then_429_with_retry_after(limiter):
    limits = RateLimits(requests_per_s=2, burst_s=3)  # capacity 6
    assert [passes(limiter, limits) for _ in range(6)] == [True] * 6
    err = refusal(limiter, limits)
    assert (err.status, err.code) == (429, "rate_limited")
    assert err.retry_after == pytest.approx(0.5)  # one token at 2/s
    assert "2 requests/s" in err.message and "acme" in err.message
    assert passes(limiter, limits, tenant="globex")  # tenants have their own buckets


def test_refill_over_time_is_capped_at_capacity(limiter, clock):
    limits = RateLimits(requests_per_s=2, burst_s=3)
    while passes(limiter, limits):
        pass
    clock.advance(0.5)
    assert passes(limiter, limits) and not passes(limiter, limits)
    clock.advance(0.25)  # half a token: not yet
    assert refusal(limiter, limits).retry_after == pytest.approx(0.25)
    clock.advance(3600)
    assert sum(passes(limiter, limits) for _ in range(20)) == 6  # an idle hour still holds only one burst
    smaller = RateLimits(requests_per_s=2, burst_s=1)  # limits changed: level clipped to the new capacity
    clock.advance(3600)
    assert sum(passes(limiter, smaller) for _ in range(20)) == 2


def test_capacity_is_at_least_one_request(limiter, clock):
    limits = RateLimits(requests_per_s=0.5, burst_s=0)  # rate * burst = 0: capacity 1
    assert passes(limiter, limits) and not passes(limiter, limits)
    clock.advance(2)
    assert passes(limiter, limits)


def test_rows_bucket_is_independent_of_requests_bucket(limiter):
    rows_only = RateLimits(rows_per_s=10, burst_s=1)  # 10 rows, any number of requests
    assert passes(limiter, rows_only, rows=4) and passes(limiter, rows_only, rows=4)
    err = refusal(limiter, rows_only, rows=4)
    assert err.retry_after == pytest.approx(0.2) and "10 rows/s" in err.message and "requests/s" not in err.message
    assert passes(limiter, rows_only, rows=2)
    assert all(passes(limiter, rows_only, rows=0) for _ in range(100))  # no rows, no row tokens
    requests_only = RateLimits(requests_per_s=1, burst_s=3)
    assert all(passes(limiter, requests_only, rows=10_000, tenant="globex") for _ in range(3))
    assert "rows/s" not in refusal(limiter, requests_only, rows=1, tenant="globex").message


def test_both_buckets_or_neither(limiter):
    limits = RateLimits(requests_per_s=1, rows_per_s=1, burst_s=10)  # 10 requests, 10 rows
    assert passes(limiter, limits, rows=8)
    refusal(limiter, limits, rows=5)  # rows short: the request token is not taken either
    assert all(passes(limiter, limits, rows=0) for _ in range(9))  # so all 9 remaining requests pass
    err = refusal(limiter, limits, rows=1)  # requests short (rows would do): no row token is taken
    assert "1 requests/s" in err.message and "rows/s" not in err.message
    assert passes(limiter, limits, rows=2, tenant="globex")
    short_of_both = RateLimits(requests_per_s=0.25, rows_per_s=1, burst_s=4)  # 1 request, 4 rows
    assert passes(limiter, short_of_both, rows=4, tenant="initech")
    both = refusal(limiter, short_of_both, rows=3, tenant="initech")
    assert both.retry_after == pytest.approx(4.0)  # the longer wait: 4 s for a request, 3 s for 3 rows
    assert "0.25 requests/s and 1 rows/s" in both.message


def test_retry_after_is_the_longer_wait(limiter):
    limits = RateLimits(requests_per_s=10, rows_per_s=1, burst_s=2)  # 20 requests, 2 rows
    assert passes(limiter, limits, rows=2)
    assert refusal(limiter, limits, rows=2).retry_after == pytest.approx(2.0)  # rows: 2 tokens at 1/s


def test_request_larger_than_the_bucket_passes_when_full_then_pays_its_debt(limiter, clock):
    limits = RateLimits(rows_per_s=10, burst_s=1)  # 10 rows
    assert passes(limiter, limits, rows=1)
    assert refusal(limiter, limits, rows=25).retry_after == pytest.approx(0.1)  # until full, not until 25
    clock.advance(0.1)
    assert passes(limiter, limits, rows=25)  # full bucket: passes, leaves -15
    assert refusal(limiter, limits, rows=1).retry_after == pytest.approx(1.6)  # -15 -> 1 at 10/s
    clock.advance(1.6)
    assert passes(limiter, limits, rows=1)


def test_zero_is_unlimited(limiter):
    unlimited = RateLimits()
    assert all(passes(limiter, unlimited, rows=1000) for _ in range(10_000))
    assert limiter.enter("acme", unlimited) is None
    limiter.leave("acme", None)
    assert limiter.in_flight("acme") == 0


def test_many_threads_take_exact_token_counts(limiter):
    # frozen clock: no refill, so exactly min(500 requests, 1500 rows / 2) = 500 of 3200 calls pass
    limits = RateLimits(requests_per_s=50, rows_per_s=150, burst_s=10)
    start, wins = threading.Barrier(16), []

    def hammer() -> None:
        start.wait()
        wins.append(sum(passes(limiter, limits, rows=2) for _ in range(200)))

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(wins) == 500
    buckets = limiter._buckets["acme"]
    assert (buckets.requests, buckets.rows) == (0.0, 500.0)  # every refusal took nothing


def test_concurrency_slots(limiter):
    limits = RateLimits(max_concurrent=2)
    a, b = limiter.enter("acme", limits), limiter.enter("acme", limits)
    assert a and b and a != b
    with pytest.raises(RateLimitedError) as err:
        limiter.enter("acme", limits)
    assert err.value.retry_after == 1.0 and err.value.status == 429 and "2 calls in flight" in err.value.message
    assert limiter.enter("globex", limits) is not None  # per tenant
    limiter.leave("acme", a)
    limiter.leave("acme", a)  # a repeat does not free someone else's slot
    c = limiter.enter("acme", limits)
    with pytest.raises(RateLimitedError):
        limiter.enter("acme", limits)
    limiter.leave("acme", b), limiter.leave("acme", c)
    assert limiter.in_flight("acme") == 0


def test_concurrent_context_manager_releases_on_error(limiter):
    limits = RateLimits(max_concurrent=1)
    with pytest.raises(ValueError), limiter.concurrent("acme", limits):
        assert limiter.in_flight("acme") == 1
        with pytest.raises(RateLimitedError):
            limiter.enter("acme", limits)
        raise ValueError("the classify call failed")
    assert limiter.in_flight("acme") == 0
    with limiter.concurrent("acme", limits):
        pass


def test_bad_input_is_a_clear_error(limiter):
    limits = RateLimits(rows_per_s=1)
    for rows in (-1, True, 1.5, "3"):
        with pytest.raises(BadRequestError):
            limiter.acquire("acme", limits, rows=rows)
    for tenant in ("a:b", "", "../x"):
        with pytest.raises(InvalidIdError):
            limiter.acquire(tenant, limits, rows=1)
        with pytest.raises(InvalidIdError):
            limiter.enter(tenant, RateLimits(max_concurrent=1))


def test_capacities_rule():
    assert RateLimits(requests_per_s=3, rows_per_s=100, burst_s=2).capacities() == (6.0, 200.0)
    assert RateLimits(requests_per_s=0.1, rows_per_s=0.1, burst_s=1).capacities() == (1.0, 1.0)


def test_open_rate_limiter_picks_the_backend_from_the_store_url():
    for url in ("file:///var/lib/prefixserve", "memory://", None):
        assert isinstance(open_rate_limiter(url), MemoryRateLimiter)
    # redis-py connects lazily: nothing is contacted here
    redis_limiter = open_rate_limiter("redis://:s3cret@127.0.0.1:1/2?prefix=x:")
    assert isinstance(redis_limiter, RedisRateLimiter)
    assert redis_limiter.prefix == "x:" and "s3cret" not in redis_limiter.url and redis_limiter.url.endswith("/2")
    assert redis_limiter.bucket_key("acme") == "x:rl:acme" and redis_limiter.slots_key("acme") == "x:rl:acme:slots"
    assert RedisRateLimiter("rediss://127.0.0.1:1/0").prefix == "ps:"
    assert RedisRateLimiter("redis://127.0.0.1:1/0?prefix=x:", prefix="y:").prefix == "y:"
    redis_limiter.close()

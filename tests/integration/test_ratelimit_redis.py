"""RedisRateLimiter against a real redis-server: the memory semantics, shared by replicas, expiry, outages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from prefixserve.adapters.errors import RateLimitedError, StoreUnavailableError
from prefixserve.adapters.ratelimit import RateLimits, RedisRateLimiter, open_rate_limiter
from tests.fixtures.ratelimit import passes, refusal
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.redis

SLOW = 0.001  # tokens/s: refill is negligible while a test runs, so token counts are exact


@pytest.fixture
def url(redis_server, redis_prefix) -> str:
    return f"{redis_server.url}?prefix={redis_prefix}"


@pytest.fixture
def limiter(url) -> Iterator[RedisRateLimiter]:
    made = open_rate_limiter(url)
    assert isinstance(made, RedisRateLimiter)
    yield made
    made.close()


@pytest.fixture
def spare_redis(redis_server, tmp_path) -> Iterator[RedisServer]:
    """A private redis-server, so stopping it or adding users never disturbs the shared one."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop(kill=False)


def wait_of(err: RateLimitedError) -> float:
    assert err.retry_after is not None
    return err.retry_after


def bucket(redis_server, limiter: RedisRateLimiter, tenant: str = "acme") -> dict[str, float]:
    raw = redis_server.client().hgetall(limiter.bucket_key(tenant))
    return {k.decode(): float(v) for k, v in raw.items()}


def test_burst_then_429_then_refill_on_server_time(limiter):
    limits = RateLimits(requests_per_s=0.5, burst_s=10)  # 5 requests, one more every 2 s
    assert [passes(limiter, limits) for _ in range(5)] == [True] * 5
    err = refusal(limiter, limits)
    assert (err.status, err.code) == (429, "rate_limited") and 1.0 < wait_of(err) <= 2.0
    fast = RateLimits(requests_per_s=20, burst_s=0.25)  # 5 requests, one more every 50 ms
    taken = 0
    while passes(limiter, fast, tenant="globex"):
        taken += 1
    assert taken >= 5
    wait = wait_of(refusal(limiter, fast, tenant="globex"))
    assert 0 < wait <= 0.05
    time.sleep(wait + 0.01)
    assert passes(limiter, fast, tenant="globex")


def test_rows_bucket_and_both_or_neither(limiter, redis_server):
    limits = RateLimits(requests_per_s=SLOW, rows_per_s=SLOW, burst_s=10 / SLOW)  # 10 requests, 10 rows
    assert passes(limiter, limits, rows=8)
    assert "rows/s" in refusal(limiter, limits, rows=5).message  # rows short: no request token taken
    assert all(passes(limiter, limits, rows=0) for _ in range(9))
    err = refusal(limiter, limits, rows=1)  # requests short: no row token taken
    assert "requests/s" in err.message and "rows/s" not in err.message
    state = bucket(redis_server, limiter)
    assert state["r"] == pytest.approx(0, abs=0.01) and state["w"] == pytest.approx(2, abs=0.01)
    rows_only = RateLimits(rows_per_s=SLOW, burst_s=4 / SLOW)
    assert all(passes(limiter, rows_only, rows=1, tenant="globex") for _ in range(4))
    assert not passes(limiter, rows_only, rows=1, tenant="globex")
    assert "r" not in bucket(redis_server, limiter, "globex")  # an unlimited bucket is not kept


def test_request_larger_than_the_bucket_passes_when_full_then_pays_its_debt(limiter, redis_server):
    limits = RateLimits(rows_per_s=10, burst_s=1)  # 10 rows
    assert passes(limiter, limits, rows=25)
    assert bucket(redis_server, limiter)["w"] == pytest.approx(-15, abs=0.1)
    assert 1.4 < wait_of(refusal(limiter, limits, rows=1)) <= 1.6  # -15 -> 1 at 10/s


def test_zero_is_unlimited_and_touches_nothing(limiter, redis_server):
    assert all(passes(limiter, RateLimits(max_concurrent=0), rows=1000) for _ in range(50))
    assert limiter.enter("acme", RateLimits()) is None
    assert not redis_server.client().exists(limiter.bucket_key("acme"), limiter.slots_key("acme"))


def test_two_replicas_share_one_budget_exactly(url):
    replicas = [RedisRateLimiter(url), RedisRateLimiter(url)]  # two Ingress replicas, two clients
    limits = RateLimits(requests_per_s=SLOW, burst_s=20 / SLOW)  # 20 requests for everyone
    start, wins = threading.Barrier(100), []

    def race(limiter: RedisRateLimiter) -> None:
        start.wait()
        if passes(limiter, limits):
            wins.append(1)

    threads = [threading.Thread(target=race, args=(replicas[i % 2],)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 20
    slots = RateLimits(max_concurrent=3)
    held = [replicas[0].enter("acme", slots), replicas[1].enter("acme", slots), replicas[0].enter("acme", slots)]
    for replica in replicas:
        with pytest.raises(RateLimitedError) as err:
            replica.enter("acme", slots)
        assert err.value.retry_after == 1.0
    replicas[1].leave("acme", held[0])  # any replica may give a slot back
    with replicas[1].concurrent("acme", slots):
        assert replicas[0].in_flight("acme") == 3
    assert replicas[0].in_flight("acme") == 2
    for replica in replicas:
        replica.close()


def test_idle_tenants_vanish(limiter, redis_server, url):
    admin = redis_server.client()
    limiter.acquire("acme", RateLimits(requests_per_s=20, burst_s=0.25), rows=1)  # full again after 50 ms
    assert 0 < admin.pttl(limiter.bucket_key("acme")) <= 51
    limiter.acquire("globex", RateLimits(rows_per_s=SLOW, burst_s=10 / SLOW), rows=3)  # 3000 s to refill 3 rows
    assert 2_990_000 < admin.pttl(limiter.bucket_key("globex")) <= 3_000_001
    leased = RedisRateLimiter(url, slot_lease_s=0.1)  # a replica that dies holding its slot
    one = RateLimits(max_concurrent=1)
    leased.enter("acme", one)
    with pytest.raises(RateLimitedError):
        leased.enter("acme", one)
    time.sleep(0.25)
    assert not admin.exists(limiter.bucket_key("acme"), leased.slots_key("acme"))
    leased.leave("acme", leased.enter("acme", one))  # the lease ran out: the slot is back
    leased.close()


def test_stopped_redis_is_a_503_then_recovers(spare_redis):
    limiter = RedisRateLimiter(f"{spare_redis.url}?prefix=ps:", retries=1)
    limits = RateLimits(requests_per_s=1, max_concurrent=1)
    limiter.acquire("acme", limits, rows=1)
    spare_redis.stop(kill=True)
    try:
        for call in (lambda: limiter.acquire("acme", limits, rows=1), lambda: limiter.enter("acme", limits)):
            with pytest.raises(StoreUnavailableError) as err:
                call()
            assert err.value.status == 503 and err.value.retry_after == 1.0 and "127.0.0.1" in err.value.message
        limiter.leave("acme", "some-slot")  # best effort: never raises (it runs in a finally)
    finally:
        spare_redis.start()
    limiter.acquire("acme", limits, rows=1)  # without AOF the restart reset the bucket to full
    limiter.close()


def test_password_from_env_and_never_keys(spare_redis, monkeypatch):
    admin = spare_redis.client()
    admin.execute_command("ACL", "SETUSER", "psuser", "on", ">s3cret", "~*", "&*", "+@all")
    admin.config_resetstat()
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "s3cret")
    limiter = open_rate_limiter(f"redis://psuser@127.0.0.1:{spare_redis.port}/3?prefix=rl-test:")
    assert isinstance(limiter, RedisRateLimiter) and "s3cret" not in limiter.url
    limits = RateLimits(requests_per_s=1, rows_per_s=5, max_concurrent=2)
    with limiter.concurrent("acme", limits):
        limiter.acquire("acme", limits, rows=2)
    assert spare_redis.client(db=3).exists("rl-test:rl:acme") and not admin.exists("rl-test:rl:acme")
    assert "cmdstat_keys" not in admin.info("commandstats")
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "wrong")
    bad = RedisRateLimiter(f"redis://psuser@127.0.0.1:{spare_redis.port}/3", retries=1)
    with pytest.raises(StoreUnavailableError):
        bad.acquire("acme", limits, rows=1)
    for made in (limiter, bad):
        made.close()

"""Per-tenant rate limits: what a tenant may send (``RateLimits``), enforced by token buckets.

The Ingress calls :meth:`RateLimiter.acquire` before it forwards a classify request (429 with
``Retry-After`` when over) and holds a :meth:`RateLimiter.concurrent` slot while the call is in flight.
:func:`open_rate_limiter` picks the backend from the store URL: Redis stores get :class:`RedisRateLimiter`
(every Ingress replica shares one budget), anything else :class:`MemoryRateLimiter` (per process).

Decisions:

* Two token buckets per tenant, ``requests`` (1 token per request) and ``rows`` (1 token per input row).
  ``acquire`` takes from both or from neither, atomically; a rate of 0 means that bucket is not kept.
* Capacity = ``max(rate * burst_s, 1)``. A request needing more rows than that passes once the rows bucket
  is *full* and leaves it in debt (below zero): one big request is never refused forever, and the
  long-run rate still holds because the tenant's next requests wait the debt out. So ``retry_after`` is
  the time until the bucket holds ``min(need, capacity)``; the Ingress rounds it up for ``Retry-After``.
  (A stored capacity of ``max(rate * burst_s, rows)`` would starve big requests while small ones flow.)
* A tenant not seen before, or idle long enough, starts with full buckets. Redis keys get a PEXPIRE of
  exactly the time until their buckets are full again (a missing key *is* a full bucket), so idle tenants
  vanish without a sweep. Changing a tenant's limits takes effect on its next request (levels are clipped
  to the new capacity).
* Clocks: the memory limiter uses an injectable monotonic clock; the Redis script reads the Redis server's
  ``TIME``, so Ingress replicas with skewed clocks still share one consistent bucket.
* Redis trouble fails *closed*: ``StoreUnavailableError`` (503, ``retry_after=1``) after the client's
  retries (same backoff as the store, so a Redis restart is ridden out). Failing open would buy nothing:
  the Ingress reads the same Redis (``store.head``) for every classify anyway, and it would let floods
  through exactly when Redis is struggling. A Redis restart without AOF resets buckets to full (one burst);
  a script retried after its reply was lost may take twice (errs on the strict side).
* Concurrency slots (``max_concurrent``): :meth:`RateLimiter.enter` returns a slot id (``None`` when
  unlimited, nothing taken) and :meth:`RateLimiter.leave` gives it back (idempotent). In memory they are
  per process; in Redis a sorted set of leases (slot id -> expiry) shared by all replicas, so the slots of
  a crashed replica come back after ``slot_lease_s``. A full tenant gets 429 with ``retry_after=1``.
* Calls block (Redis round trips): the Ingress runs them in a thread, like its store calls. Tenant names
  pass ``check_tenant`` (no ``:``), so ``<prefix>rl:<tenant>`` keys cannot collide.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

from .errors import BadRequestError, PrefixServeError, RateLimitedError, StoreUnavailableError
from .store.ids import check_tenant
from .store.redis_common import connect

if TYPE_CHECKING:
    import redis

log = logging.getLogger("prefixserve.ratelimit")
_R = TypeVar("_R")
SLOT_RETRY_AFTER = 1.0  # seconds: a slot frees when some call finishes; there is no better estimate
_MAX_TTL_MS = 30 * 24 * 3600 * 1000  # clamp for absurdly slow rates (an early expiry only refills early)


@dataclass(frozen=True)
class RateLimits:
    """Token-bucket limits for one tenant; 0 = unlimited.

    ``requests_per_s`` / ``rows_per_s`` refill their buckets; a bucket holds ``burst_s`` seconds of its
    rate (at least one request / one request's rows), so short bursts pass and floods get 429.
    ``max_concurrent`` caps a tenant's classify calls in flight at once (0 = unlimited).
    """

    requests_per_s: float = 0.0
    rows_per_s: float = 0.0
    burst_s: float = 2.0
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "rows_per_s", "burst_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"rate limit {name} must be a number >= 0, got {value!r}")
        if isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 0:
            raise ValueError(f"rate limit max_concurrent must be an int >= 0, got {self.max_concurrent!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RateLimits:
        known = {k: data[k] for k in ("requests_per_s", "rows_per_s", "burst_s", "max_concurrent") if k in data}
        return cls(**known)

    def capacities(self) -> tuple[float, float]:
        """(requests bucket, rows bucket) capacity: ``max(rate * burst_s, 1)`` each (see the module notes)."""
        return max(self.requests_per_s * self.burst_s, 1.0), max(self.rows_per_s * self.burst_s, 1.0)


class RateLimiter(Protocol):
    """What the Ingress needs. Implementations: :class:`MemoryRateLimiter`, :class:`RedisRateLimiter`."""

    def acquire(self, tenant: str, limits: RateLimits, *, rows: int) -> None:
        """Take 1 request token and ``rows`` row tokens (both or neither), or raise ``RateLimitedError``
        whose ``retry_after`` is the seconds until both buckets hold enough."""
        ...

    def enter(self, tenant: str, limits: RateLimits) -> str | None:
        """Take a concurrency slot: its id, ``None`` when ``max_concurrent`` is 0 (nothing taken), or
        ``RateLimitedError(retry_after=1)`` when ``max_concurrent`` calls are already in flight."""
        ...

    def leave(self, tenant: str, slot: str | None) -> None:
        """Give back a slot from :meth:`enter` (``None`` and repeats are no-ops; never raises)."""
        ...

    def close(self) -> None: ...

    @contextlib.contextmanager
    def concurrent(self, tenant: str, limits: RateLimits) -> Iterator[None]:
        """``with limiter.concurrent(tenant, limits):`` holds one slot for the block."""
        slot = self.enter(tenant, limits)
        try:
            yield
        finally:
            self.leave(tenant, slot)


def _check_rows(rows: int) -> int:
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise BadRequestError(f"rows must be an int >= 0, got {rows!r}")
    return rows


def _is_free(limits: RateLimits, rows: int) -> bool:
    """Nothing to count: no bucket applies to this request (no lock, no Redis round trip)."""
    return not limits.requests_per_s and not (limits.rows_per_s and rows)


def _refused(tenant: str, limits: RateLimits, rows: int, over: int, wait: float) -> RateLimitedError:
    """``over``: bit 1 = requests bucket, bit 2 = rows bucket."""
    parts = [f"{limits.requests_per_s:g} requests/s"] if over & 1 else []
    parts += [f"{limits.rows_per_s:g} rows/s (this request has {rows} rows)"] if over & 2 else []
    return RateLimitedError(
        f"tenant {tenant!r} is over its rate limit of {' and '.join(parts)}; retry in {wait:.3g} s", retry_after=wait
    )


def _slots_full(tenant: str, limits: RateLimits) -> RateLimitedError:
    return RateLimitedError(
        f"tenant {tenant!r} already has {limits.max_concurrent} calls in flight (its max_concurrent)",
        retry_after=SLOT_RETRY_AFTER,
    )


@dataclass
class _Buckets:
    requests: float | None  # tokens; None: not kept (unlimited), full once limited again
    rows: float | None
    at: float  # clock reading of the last update


class MemoryRateLimiter(RateLimiter):
    """In-process buckets and slots behind one lock (every operation is O(1)); ``clock`` is injectable.

    Per process: N Ingress replicas each allow the full limit. One small entry per tenant seen (tenants
    are authenticated, so the map is bounded by the number of tenants).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, _Buckets] = {}
        self._slots: dict[str, set[str]] = {}
        self._slot_ids = itertools.count(1)

    def acquire(self, tenant: str, limits: RateLimits, *, rows: int) -> None:
        check_tenant(tenant), _check_rows(rows)
        if _is_free(limits, rows):
            return
        req_rate, row_rate = limits.requests_per_s, limits.rows_per_s
        req_cap, row_cap = limits.capacities()
        with self._lock:
            now = self._clock()
            old = self._buckets.get(tenant)
            dt = max(0.0, now - old.at) if old is not None else 0.0

            def level(stored: float | None, rate: float, cap: float) -> float:
                return cap if stored is None else min(cap, stored + dt * rate)

            req = level(old.requests if old else None, req_rate, req_cap)
            row = level(old.rows if old else None, row_rate, row_cap)
            wait, over = 0.0, 0
            if req_rate and req < 1.0:
                wait, over = (1.0 - req) / req_rate, 1
            need = min(rows, row_cap)
            if row_rate and rows and row < need:
                wait, over = max(wait, (need - row) / row_rate), over | 2
            if over:
                raise _refused(tenant, limits, rows, over, wait)
            self._buckets[tenant] = _Buckets(req - 1.0 if req_rate else None, row - rows if row_rate else None, now)

    def enter(self, tenant: str, limits: RateLimits) -> str | None:
        check_tenant(tenant)
        if not limits.max_concurrent:
            return None
        with self._lock:
            held = self._slots.setdefault(tenant, set())
            if len(held) >= limits.max_concurrent:
                raise _slots_full(tenant, limits)
            slot = str(next(self._slot_ids))
            held.add(slot)
            return slot

    def leave(self, tenant: str, slot: str | None) -> None:
        if slot is None:
            return
        with self._lock:
            held = self._slots.get(tenant)
            if held is not None:
                held.discard(slot)
                if not held:
                    del self._slots[tenant]

    def in_flight(self, tenant: str) -> int:
        """Slots held now (for tests and metrics)."""
        with self._lock:
            return len(self._slots.get(tenant, ()))

    def close(self) -> None:
        pass


# Both buckets of one tenant in one step. KEYS[1]: <prefix>rl:<tenant>, a HASH r (request tokens),
# w (row tokens), t (server time of the last update, microseconds). ARGV: request rate, request capacity,
# row rate, row capacity, rows. Returns {1} (taken) or {0, microseconds to wait, over (1 requests | 2 rows)}.
# Numbers go to redis.call as Lua numbers (Redis formats them with 17 digits: no precision lost).
ACQUIRE_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local state = redis.call('HMGET', KEYS[1], 'r', 'w', 't')
local dt = 0
if state[3] then dt = math.max(0, now - tonumber(state[3])) / 1000000 end
local function level(stored, rate, cap)
  if not stored then return cap end
  return math.min(cap, tonumber(stored) + dt * rate)
end
local rrate, rcap = tonumber(ARGV[1]), tonumber(ARGV[2])
local wrate, wcap, rows = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local r, w = level(state[1], rrate, rcap), level(state[2], wrate, wcap)
local wait, over = 0, 0
if rrate > 0 and r < 1 then wait, over = (1 - r) / rrate, 1 end
local need = math.min(rows, wcap)
if wrate > 0 and rows > 0 and w < need then wait, over = math.max(wait, (need - w) / wrate), over + 2 end
if over > 0 then return {0, math.ceil(wait * 1000000), over} end
local ttl = 0
if rrate > 0 then
  r = r - 1; ttl = (rcap - r) / rrate; redis.call('HSET', KEYS[1], 'r', r)
else redis.call('HDEL', KEYS[1], 'r') end
if wrate > 0 then
  w = w - rows; ttl = math.max(ttl, (wcap - w) / wrate); redis.call('HSET', KEYS[1], 'w', w)
else redis.call('HDEL', KEYS[1], 'w') end
redis.call('HSET', KEYS[1], 't', now)
redis.call('PEXPIRE', KEYS[1], math.min(math.ceil(ttl * 1000) + 1, tonumber(ARGV[6])))
return {1}
"""

# One concurrency slot. KEYS[1]: <prefix>rl:<tenant>:slots, a ZSET slot id -> lease expiry (server ms).
# ARGV: max_concurrent, slot id, lease ms. Returns 1 (taken) or 0 (full).
ENTER_SCRIPT = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


class RedisRateLimiter(RateLimiter):
    """Buckets and slots in Redis, shared by every Ingress replica: one Lua script per call.

    ``url_or_client``: a store URL (``redis://[:pw@]host:port/db?prefix=ps:`` or ``rediss://``; the
    password may come from ``PREFIXSERVE_REDIS_PASSWORD``, as for the store) or a ``redis.Redis``.
    ``prefix`` defaults to the URL's ``?prefix=``, else ``ps:``. Keys: ``<prefix>rl:<tenant>`` (buckets)
    and ``<prefix>rl:<tenant>:slots`` (leases), both with a PEXPIRE; ``KEYS`` is never used.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        prefix: str | None = None,
        *,
        password: str | None = None,
        retries: int = 8,
        socket_timeout: float = 5.0,
        slot_lease_s: float = 120.0,
    ):
        if isinstance(url_or_client, str):
            self._r, self.prefix, self.url = connect(
                url_or_client, prefix, password, retries=retries, socket_timeout=socket_timeout
            )
        else:
            self.prefix, self.url, self._r = "ps:" if prefix is None else prefix, "redis", url_or_client
        self.slot_lease_ms = max(1, math.ceil(slot_lease_s * 1000))
        self._acquire = self._r.register_script(ACQUIRE_SCRIPT)
        self._enter = self._r.register_script(ENTER_SCRIPT)

    def bucket_key(self, tenant: str) -> str:
        return f"{self.prefix}rl:{check_tenant(tenant)}"

    def slots_key(self, tenant: str) -> str:
        return f"{self.prefix}rl:{check_tenant(tenant)}:slots"

    def _guarded(self, call: Callable[[], _R]) -> _R:
        """Connection trouble (after the client's retries) -> 503 with ``Retry-After``; fail closed."""
        import redis

        try:
            return call()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(f"redis at {self.url} is unreachable: {exc}", retry_after=1.0) from None
        except redis.ResponseError as exc:
            raise PrefixServeError(f"redis error: {exc}", code="store_error", status=500) from None

    def acquire(self, tenant: str, limits: RateLimits, *, rows: int) -> None:
        key = self.bucket_key(tenant)
        if _is_free(limits, _check_rows(rows)):
            return
        req_cap, row_cap = limits.capacities()
        args = [limits.requests_per_s, req_cap, limits.rows_per_s, row_cap, rows, _MAX_TTL_MS]
        reply = self._guarded(lambda: self._acquire(keys=[key], args=[repr(float(a)) for a in args]))
        if int(reply[0]) != 1:
            raise _refused(tenant, limits, rows, int(reply[2]), int(reply[1]) / 1e6)

    def enter(self, tenant: str, limits: RateLimits) -> str | None:
        key = self.slots_key(tenant)
        if not limits.max_concurrent:
            return None
        slot = uuid.uuid4().hex
        taken = self._guarded(lambda: self._enter(keys=[key], args=[limits.max_concurrent, slot, self.slot_lease_ms]))
        if not int(taken):
            raise _slots_full(tenant, limits)
        return slot

    def leave(self, tenant: str, slot: str | None) -> None:
        if slot is None:
            return
        try:
            self._r.zrem(self.slots_key(tenant), slot)
        except Exception as exc:  # in a ``finally``: never mask the reply; the lease frees the slot anyway
            log.warning("could not release a concurrency slot of tenant %r (its lease will): %s", tenant, exc)

    def in_flight(self, tenant: str) -> int:
        """Slots held now, counting leases not yet collected (for tests and metrics)."""
        return int(self._guarded(lambda: self._r.zcard(self.slots_key(tenant))))

    def close(self) -> None:
        self._r.close()


def open_rate_limiter(store_url: str | None, **opts: Any) -> RateLimiter:
    """:class:`RedisRateLimiter` for ``redis://`` / ``rediss://`` store URLs (``opts`` go to it, e.g.
    ``retries``), else :class:`MemoryRateLimiter` (file and memory stores serve one machine; with several
    Ingress replicas there, each enforces the full limit)."""
    if store_url and urlsplit(store_url).scheme in ("redis", "rediss"):
        return RedisRateLimiter(store_url, **opts)
    return MemoryRateLimiter()

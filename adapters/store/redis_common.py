"""The Redis store's plumbing (:mod:`.redis_store`): URL parsing, the client, key names, and Redis
errors turned into the store's errors.

Error mapping (``guard``): connection trouble after the client's own retries, and replies that mean
"this server takes no writes right now" -- ``OOM`` (maxmemory with noeviction), ``READONLY`` (a
replica), ``MISCONF`` (persistence failing), ``BUSY``, ``MASTERDOWN``, ``NOREPLICAS``, ``TRYAGAIN``
-- become ``StoreUnavailableError`` (503 with ``retry_after``); any other reply error stays a 500.
A refused write changes nothing: Redis checks OOM, READONLY and MISCONF before a script's first
write, and the put path cleans up what it wrote before the refusal (see :mod:`.redis_store`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import PrefixServeError
from .base import DEFAULT_KEEP_VERSIONS, DEFAULT_RETAIN_GRACE_S, StoreBase, unavailable
from .keys import env_secret, resolve_pepper
from .redis_scripts import SCRIPTS

PASSWORD_ENV = "PREFIXSERVE_REDIS_PASSWORD"  # or PREFIXSERVE_REDIS_PASSWORD_FILE: a file holding it
DEFAULT_ORPHAN_AGE_S = 60.0  # a blob written but unpublished this long belongs to a crashed put

_S = TypeVar("_S", bound=StoreBase)
_P = ParamSpec("_P")
_R = TypeVar("_R")

# reply codes (the first word of a Redis error) that mean "no writes for now", and what to call them
_REFUSALS = {
    "OOM": "out of memory (maxmemory)",
    "READONLY": "a read-only replica",
    "MISCONF": "persistence is failing (MISCONF)",
    "BUSY": "busy running a script",
    "MASTERDOWN": "its master is down",
    "NOREPLICAS": "not enough replicas",
    "TRYAGAIN": "asked to try again",
}


def refusal(exc: Exception) -> str | None:
    """Why Redis refused a write, if ``exc`` is such a reply; None for other errors."""
    import redis.exceptions as rex

    if isinstance(exc, rex.OutOfMemoryError):
        return _REFUSALS["OOM"]
    if isinstance(exc, rex.ReadOnlyError):
        return _REFUSALS["READONLY"]
    if isinstance(exc, rex.TryAgainError):
        return _REFUSALS["TRYAGAIN"]
    if isinstance(exc, rex.ResponseError):  # in a MULTI: "Command # 1 (...) of pipeline caused error: MISCONF ..."
        return _REFUSALS.get(str(exc).rpartition("caused error: ")[2].split(" ", 1)[0])
    return None


def guard(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Turn connection trouble and refused writes into a 503 the server can report (see above)."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        import redis

        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise unavailable(f"redis at {self.url} is unreachable: {exc}") from None
        except redis.ResponseError as exc:
            reason = refusal(exc)
            if reason is not None:
                raise unavailable(f"redis at {self.url} takes no writes now: {reason}; retry later") from None
            raise PrefixServeError(f"redis error: {exc}", code="store_error", status=500) from None

    return wrapper


def text(reply: bytes | str) -> str:
    """redis-py types replies as ``bytes | str``; this client keeps ``decode_responses`` off (blobs are binary)."""
    return reply.decode() if isinstance(reply, bytes) else reply


def parse_redis_url(url: str, prefix: str | None = None, password: str | None = None) -> tuple[str, str, str | None]:
    """(url for redis-py without our ``prefix`` query, key prefix, password) from a store URL.

    Password, first found: the argument, the URL, env ``PREFIXSERVE_REDIS_PASSWORD``, the file env
    ``PREFIXSERVE_REDIS_PASSWORD_FILE`` names."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    key_prefix = prefix if prefix is not None else query.pop("prefix", "ps:")
    query.pop("prefix", None)
    password = password or (unquote(parts.password) if parts.password else None) or env_secret(PASSWORD_ENV)
    return urlunsplit(parts._replace(query=urlencode(query))), key_prefix, password


def connect(
    url: str,
    prefix: str | None = None,
    password: str | None = None,
    *,
    retries: int = 8,
    socket_timeout: float = 5.0,
    health_check_interval: float = 0,
) -> tuple[Any, str, str]:
    """(redis client, key prefix, the URL without its password) for a store URL.

    The one place clients are made (store and rate limiter alike): connection errors and timeouts are
    retried with jittered exponential backoff, so a Redis restart is ridden out, not reported.
    """
    import redis
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.retry import Retry

    client_url, key_prefix, secret = parse_redis_url(url, prefix, password)
    parts = urlsplit(client_url)
    shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # never echo a password
    client = redis.Redis.from_url(
        client_url,
        password=secret,
        socket_timeout=socket_timeout,
        socket_connect_timeout=2.0,
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=health_check_interval,
    )
    return client, key_prefix, shown


class RedisBase(StoreBase):
    """The client, the key prefix and the registered scripts; the subclasses add the operations."""

    def __init__(
        self,
        url: str,
        *,
        validator=None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        retain_grace_s: float = DEFAULT_RETAIN_GRACE_S,
        orphan_age_s: float = DEFAULT_ORPHAN_AGE_S,
        prefix: str | None = None,
        password: str | None = None,
        pepper: str | None = None,
        retries: int = 8,
        health_check_interval: float = 10,
        socket_timeout: float = 5.0,
    ):
        super().__init__(validator=validator, keep_versions=keep_versions, retain_grace_s=retain_grace_s)
        if not float(orphan_age_s) >= 0:
            raise ValueError("orphan_age_s must be >= 0")
        self._r, self.prefix, self.url = connect(
            url,
            prefix,
            password,
            retries=retries,
            socket_timeout=socket_timeout,
            health_check_interval=health_check_interval,
        )
        self.orphan_age_s = float(orphan_age_s)
        self._pepper = resolve_pepper(pepper)
        self.channel = f"{self.prefix}events"
        self._scripts: dict[str, Any] = {name: self._r.register_script(source) for name, source in SCRIPTS.items()}
        self._feed_thread: threading.Thread | None = None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _blob_prefix(self, tenant: str, prefix_id: str) -> str:
        return self._k("b", tenant, prefix_id, "")

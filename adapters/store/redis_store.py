"""``redis://host:port/db`` / ``rediss://``: one store shared by every replica and pod.

Keys (``P`` = key prefix, ``?prefix=`` or ``prefix=``, default ``ps:``; names passed ``check_id``
so they never contain ``:``)::

    P tenants                 SET   tenant names (listed with SSCAN; ``KEYS`` is never used)
    P t:<T>                   HASH  max_adapters, max_bytes, bytes (usage), created
    P tk:<T>                  SET   the tenant's key ids
    P k:<key id>              HASH  salted + peppered key hash -> tenant
    P a:<T>                   HASH  prefix id -> current VersionInfo JSON (the pointer + metadata)
    P vs:<T>:<I>              HASH  version -> VersionInfo JSON (the kept versions)
    P seq:<T>                 HASH  prefix id -> last version number (survives deletes)
    P b:<T>:<I>:<n>           STRING immutable blob (written with SET NX)
    P events                  pub/sub channel of {"t", "p", "v"} (v null: deleted)

``put``: validate, ``HINCRBY`` the version, ``SET NX`` the blob, then one Lua script checks the
tenant and its quota, moves the pointer, records the version, collects old ones and ``PUBLISH``es
-- atomically (an over-quota or raced put deletes its blob and changes nothing). ``get`` reads the
pointer, then the immutable blob it names, and checks its sha256: never torn. The scripts live in
:mod:`.redis_scripts`; they build some key names themselves, so this needs standalone Redis (any DB)
or one shard, not Redis Cluster.

Durability is Redis's: run it with ``appendonly yes`` (``appendfsync always`` to lose nothing on a
crash; ``everysec`` risks the last second). Connection errors retry with jittered exponential
backoff (a restart is ridden out); when retries run out a ``StoreUnavailableError`` (503) is raised.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from ..errors import ConflictError, NotFoundError, PrefixServeError, QuotaExceededError, StoreUnavailableError
from .base import DEFAULT_KEEP_VERSIONS, Quota, StoreBase, TenantInfo, VersionInfo
from .ids import check_id, check_tenant, check_version
from .keys import new_key, parse_api_key, resolve_pepper, verify
from .redis_scripts import SCRIPTS

PASSWORD_ENV = "PREFIXSERVE_REDIS_PASSWORD"
_MISSING = "adapter {!r} not found"


_S = TypeVar("_S", bound=StoreBase)
_P = ParamSpec("_P")
_R = TypeVar("_R")


def _guard(method: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
    """Turn connection trouble (after the client's own retries) into a 503 the server can report."""

    @functools.wraps(method)
    def wrapper(self: _S, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        import redis

        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(f"redis at {self.url} is unreachable: {exc}") from None
        except redis.ResponseError as exc:
            raise PrefixServeError(f"redis error: {exc}", code="store_error", status=500) from None

    return wrapper


def _text(reply: bytes | str) -> str:
    """redis-py types replies as ``bytes | str``; this client keeps ``decode_responses`` off (blobs are binary)."""
    return reply.decode() if isinstance(reply, bytes) else reply


def parse_redis_url(url: str, prefix: str | None = None, password: str | None = None) -> tuple[str, str, str | None]:
    """(url for redis-py without our ``prefix`` query, key prefix, password) from a store URL."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    key_prefix = prefix if prefix is not None else query.pop("prefix", "ps:")
    query.pop("prefix", None)
    password = password or (unquote(parts.password) if parts.password else None) or os.environ.get(PASSWORD_ENV)
    return urlunsplit(parts._replace(query=urlencode(query))), key_prefix, password


class RedisStore(StoreBase):
    def __init__(
        self,
        url: str,
        *,
        validator=None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        prefix: str | None = None,
        password: str | None = None,
        pepper: str | None = None,
        retries: int = 8,
        health_check_interval: float = 10,
        socket_timeout: float = 5.0,
    ):
        super().__init__(validator=validator, keep_versions=keep_versions)
        import redis
        from redis.backoff import ExponentialWithJitterBackoff
        from redis.retry import Retry

        client_url, self.prefix, secret = parse_redis_url(url, prefix, password)
        parts = urlsplit(client_url)
        self.url = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # never echo a password
        self._r = redis.Redis.from_url(
            client_url,
            password=secret,
            socket_timeout=socket_timeout,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), retries),
            retry_on_error=[redis.ConnectionError, redis.TimeoutError],
            health_check_interval=health_check_interval,
        )
        self._pepper = resolve_pepper(pepper)
        self.channel = f"{self.prefix}events"
        self._scripts = {name: self._r.register_script(source) for name, source in SCRIPTS.items()}
        self._feed_thread: threading.Thread | None = None

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _blob_prefix(self, tenant: str, prefix_id: str) -> str:
        return self._k("b", tenant, prefix_id, "")

    # adapters
    @_guard
    def put(self, tenant: str, prefix_id: str, data: bytes) -> VersionInfo:
        check_tenant(tenant), check_id(prefix_id)
        meta = self._validate(data)  # before anything is written
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        if not self._r.exists(self._k("t", tenant)):
            raise NotFoundError(f"tenant {tenant!r} not found")
        for _ in range(5):  # retried only when a concurrent put of the same id published a newer version
            version = int(self._r.hincrby(self._k("seq", tenant), prefix_id, 1))
            blob_key = self._blob_prefix(tenant, prefix_id) + str(version)
            if not self._r.set(blob_key, data, nx=True):
                continue
            info = VersionInfo(tenant, prefix_id, version, digest, len(data), meta, time.time())
            event = json.dumps({"t": tenant, "p": prefix_id, "v": version})
            res = self._scripts["publish"](
                keys=[self._k("t", tenant), self._k("a", tenant), self._k("vs", tenant, prefix_id), blob_key],
                args=[
                    prefix_id,
                    version,
                    info.to_json(),
                    len(data),
                    self.keep_versions,
                    self._blob_prefix(tenant, prefix_id),
                    self.channel,
                    event,
                ],
            )
            status = res[0].decode()
            if status == "ok":
                return info
            if status == "no_tenant":
                raise NotFoundError(f"tenant {tenant!r} not found")
            if status == "quota":
                quota = self.tenant_info(tenant).quota
                quota.check(tenant, int(res[1]), int(res[2]))
                raise QuotaExceededError(f"tenant {tenant!r} quota exceeded")
            if status == "no_blob":  # evicted under maxmemory between SET and publish
                raise StoreUnavailableError("redis dropped the blob before publish (maxmemory eviction?)")
        raise ConflictError(f"adapter {prefix_id!r} is being overwritten concurrently; retry")

    @_guard
    def head(self, tenant: str, prefix_id: str) -> VersionInfo:
        raw = self._r.hget(self._k("a", check_tenant(tenant)), check_id(prefix_id))
        if raw is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        return VersionInfo.from_json(raw)

    @_guard
    def get(self, tenant: str, prefix_id: str, version: int | None = None) -> tuple[VersionInfo, bytes]:
        """Pointer, then the immutable blob it names (plain GET: a Lua round trip would copy ~4 MB twice).

        Never torn: a blob never changes once named, and its sha256 is checked against the pointer.
        If the blob was collected between the two reads (``keep_versions`` newer puts in between),
        the pointer is read again.
        """
        check_tenant(tenant), check_id(prefix_id)
        v = None if version is None else check_version(version)
        missing = _MISSING.format(prefix_id) if v is None else f"version {v} of adapter {prefix_id!r} not found"
        for _ in range(8):
            if v is None:
                raw = self._r.hget(self._k("a", tenant), prefix_id)
            else:
                pipe = self._r.pipeline(transaction=False)
                pipe.hexists(self._k("a", tenant), prefix_id)  # a deleted adapter has no versions
                pipe.hget(self._k("vs", tenant, prefix_id), str(v))
                exists, raw = pipe.execute()
                raw = raw if exists else None
            if raw is None:
                raise NotFoundError(missing)
            info = VersionInfo.from_json(raw)
            # cast: decode_responses is off, so a blob comes back as bytes (redis-py types it bytes | str)
            data = cast("bytes | None", self._r.get(self._blob_prefix(tenant, prefix_id) + str(info.version)))
            if data is None:
                if v is not None:
                    raise NotFoundError(missing)
                continue
            if len(data) != info.size or hashlib.sha256(data).hexdigest() != info.sha256:
                raise PrefixServeError(f"stored blob of {prefix_id!r} v{info.version} is corrupt", code="corrupt")
            return info, data
        raise NotFoundError(missing)

    @_guard
    def list(self, tenant: str) -> list[VersionInfo]:
        check_tenant(tenant)
        pipe = self._r.pipeline(transaction=True)
        pipe.exists(self._k("t", tenant))
        pipe.hgetall(self._k("a", tenant))
        exists, pointers = pipe.execute()
        if not exists:
            raise NotFoundError(f"tenant {tenant!r} not found")
        return sorted((VersionInfo.from_json(v) for v in pointers.values()), key=lambda i: i.prefix_id)

    @_guard
    # builtins.list: in this class body ``list`` names the method above
    def versions(self, tenant: str, prefix_id: str) -> builtins.list[VersionInfo]:
        self.head(tenant, prefix_id)
        infos = [VersionInfo.from_json(v) for v in self._r.hvals(self._k("vs", tenant, prefix_id))]
        return sorted(infos, key=lambda i: i.version)

    @_guard
    def delete(self, tenant: str, prefix_id: str) -> None:
        check_tenant(tenant), check_id(prefix_id)
        event = json.dumps({"t": tenant, "p": prefix_id, "v": None})
        done = self._scripts["delete"](
            keys=[self._k("t", tenant), self._k("a", tenant), self._k("vs", tenant, prefix_id)],
            args=[prefix_id, self._blob_prefix(tenant, prefix_id), self.channel, event],
        )
        if not done:
            raise NotFoundError(_MISSING.format(prefix_id))

    # tenants and keys
    def _key_script(self, name: str, mode: str, quota: Quota | None = None) -> str | None:
        api_key, record = new_key(name, self._pepper)
        quota = quota or Quota()
        ok = self._scripts["issue_key"](
            keys=[self._k("tenants"), self._k("t", name), self._k("tk", name), self._k("k", record["key_id"])],
            args=[
                name,
                mode,
                json.dumps(record),
                record["key_id"],
                quota.max_adapters,
                quota.max_bytes,
                repr(time.time()),
                self.prefix,
            ],
        )
        return api_key if ok else None

    @_guard
    def create_tenant(self, name: str, quota: Quota | None = None) -> str:
        api_key = self._key_script(check_tenant(name), "create", quota)
        if api_key is None:
            raise ConflictError(f"tenant {name!r} already exists")
        return api_key

    @_guard
    def rotate_key(self, name: str, *, revoke_old: bool = True) -> str:
        api_key = self._key_script(check_tenant(name), "rotate" if revoke_old else "keep")
        if api_key is None:
            raise NotFoundError(f"tenant {name!r} not found")
        return api_key

    @_guard
    def revoke_key(self, name: str, key_id: str | None = None) -> int:
        check_tenant(name)
        n = self._scripts["revoke_keys"](
            keys=[self._k("t", name), self._k("tk", name)],
            args=[self.prefix, "" if key_id is None else check_id(key_id, "key id")],
        )
        if n < 0:
            raise NotFoundError(f"tenant {name!r} not found")
        return int(n)

    @_guard
    def set_quota(self, name: str, quota: Quota) -> None:
        done = self._scripts["set_quota"](
            keys=[self._k("t", check_tenant(name))], args=[quota.max_adapters, quota.max_bytes]
        )
        if not done:
            raise NotFoundError(f"tenant {name!r} not found")

    def _tenant_infos(self, names: builtins.list[str]) -> builtins.list[TenantInfo]:
        pipe = self._r.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._k("t", name))
            pipe.hlen(self._k("a", name))
            pipe.smembers(self._k("tk", name))
        res = pipe.execute()
        out = []
        for i, name in enumerate(names):
            rec, count, keys = res[3 * i : 3 * i + 3]
            if not rec:
                continue
            rec = {_text(k): _text(v) for k, v in rec.items()}
            quota = Quota(int(rec.get("max_adapters", 0)), int(rec.get("max_bytes", 0)))
            out.append(
                TenantInfo(
                    name,
                    quota,
                    int(count),
                    int(rec.get("bytes", 0)),
                    tuple(sorted(_text(k) for k in keys)),
                    float(rec.get("created", 0)),
                )
            )
        return out

    @_guard
    def tenant_info(self, name: str) -> TenantInfo:
        infos = self._tenant_infos([check_tenant(name)])
        if not infos:
            raise NotFoundError(f"tenant {name!r} not found")
        return infos[0]

    @_guard
    def list_tenants(self) -> builtins.list[TenantInfo]:
        names = sorted(_text(n) for n in self._r.sscan_iter(self._k("tenants"), count=500))
        return self._tenant_infos(names)

    @_guard
    def delete_tenant(self, name: str) -> None:
        check_tenant(name)
        done = self._scripts["delete_tenant"](
            keys=[
                self._k("tenants"),
                self._k("t", name),
                self._k("a", name),
                self._k("tk", name),
                self._k("seq", name),
            ],
            args=[name, self.prefix, self.channel],
        )
        if not done:
            raise NotFoundError(f"tenant {name!r} not found")

    @_guard
    def authenticate(self, api_key: str) -> str | None:
        parsed = parse_api_key(api_key)
        if parsed is None:
            return None
        key_id, secret = parsed
        rec = self._r.hgetall(self._k("k", key_id))
        return verify(secret, {_text(k): _text(v) for k, v in rec.items()}, self._pepper)

    @_guard
    def ping(self) -> None:
        self._r.ping()

    # change feed: pub/sub, a hint (versions in the cache keys, not the feed, keep replicas coherent)
    def _start_feed(self) -> None:
        from .redis_feed import listen  # imports redis: only once someone subscribes

        with self._subs_lock:
            if self._feed_thread is not None:
                return
            ready = threading.Event()
            self._feed_thread = threading.Thread(
                target=listen,
                args=(self._r, self.channel, self._emit),
                kwargs={"ready": ready, "closed": self._closed},
                name="redisstore-feed",
                daemon=True,
            )
            self._feed_thread.start()
        ready.wait(5.0)  # subscribed: events published from now on are delivered

    def close(self) -> None:
        super().close()
        if self._feed_thread is not None:
            self._feed_thread.join(timeout=2.0)
        self._r.close()

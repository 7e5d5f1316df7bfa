"""``redis://host:port/db`` / ``rediss://``: one store shared by every replica and pod.

Keys (``P`` = key prefix, ``?prefix=`` or ``prefix=``, default ``ps:``; names passed ``check_id``
so they never contain ``:``)::

    P tenants                 SET   tenant names (listed with SSCAN; ``KEYS`` is never used)
    P t:<T>                   HASH  max_adapters, max_bytes, bytes (usage), created, vbase, rl_* rate limits,
                                    tl_* training limits
    P tk:<T>                  SET   the tenant's key ids
    P k:<key id>              HASH  salted + peppered key hash -> tenant
    P a:<T>                   HASH  prefix id -> current VersionInfo JSON (the pointer + metadata)
    P pin:<T>                 HASH  prefix id -> the pinned version's record (``head`` serves it)
    P vs:<T>:<I>              HASH  version -> VersionInfo JSON (kept versions and those in grace)
    P gr:<T>:<I>              ZSET  versions dropped by retention, scored by when (server time)
    P seq:<T>                 HASH  prefix id -> last version number (survives deletes of the id)
    P pend:<T>                ZSET  '<I>:<n>' of blobs reserved but not yet published, by time
    P b:<T>:<I>:<n>           STRING immutable blob (a placeholder until its put writes it)
    P vfloor                  STRING highest version a deleted tenant used (survives every tenant)
    P probe                   STRING ``check_writable``'s probe (expires within a second)
    P events                  pub/sub channel of {"t", "p", "v"} (v null: deleted)
    P ds:<T> dsb:<T>:<D> job:<T>:<J> jobs:<T> jact:<T>    training datasets and jobs (:mod:`.redis_jobs`)

``put``: validate; *reserve* (one script: tenant exists, next version, pending marker, a placeholder
at the blob key, collect the tenant's stale pending blobs); *write* the blob over the placeholder
(WATCH/MULTI/EXEC: only while the placeholder is there, so never after ``delete_tenant``);
*publish* (one script: tenant, quota, pointer, version record, clear the pin, retention with its
grace window, drop the marker, ``PUBLISH``) -- atomically; a refused publish deletes its blob and changes nothing.
A put that fails between the steps deletes its blob and marker (``abandon``); a put that crashed
there leaves a marker, and a later put of the tenant deletes the blob once the marker is
``orphan_age_s`` old (``collect_orphans`` does the same on demand). ``get`` reads the version
record, then the immutable blob it names, and checks its sha256: never torn, never another blob.
``head`` reads the pointer and the pin in one MULTI (one round trip, one snapshot); ``pin`` and
``unpin`` are scripts (the version must be kept, checked in the same step that pins it).
The scripts live in :mod:`.redis_scripts`; they build some key names themselves, so this needs
standalone Redis (any DB) or one shard, not Redis Cluster.

Durability is Redis's: run it with ``appendonly yes`` (``appendfsync always`` to lose nothing on a
crash; ``everysec`` risks the last second). Connection errors retry with jittered exponential
backoff (a restart is ridden out); when retries run out, or Redis refuses writes (OOM, READONLY,
MISCONF...), a ``StoreUnavailableError`` (503, ``retry_after``) is raised (:mod:`.redis_common`).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import secrets
import threading
import time
from typing import cast

from ..errors import ConflictError, NotFoundError, QuotaExceededError
from .base import VersionHistory, VersionInfo, unavailable
from .ids import check_id, check_tenant, check_version
from .redis_common import PASSWORD_ENV, guard, parse_redis_url, text
from .redis_jobs import RedisJobs
from .redis_tenants import RedisTenants

__all__ = ["RedisStore", "parse_redis_url", "PASSWORD_ENV"]
_MISSING = "adapter {!r} not found"
_NO_VERSION = "version {} of adapter {!r} not found"
PLACEHOLDER = b"\x00prefixserve:pending\x00"  # holds a reserved blob key until the blob is written
_log = logging.getLogger(__name__)


class RedisStore(RedisJobs, RedisTenants):
    # adapters
    @guard
    def put(self, tenant: str, prefix_id: str, data: bytes) -> VersionInfo:
        check_tenant(tenant), check_id(prefix_id)
        meta = self._validate(data)  # before anything is written
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        for _ in range(5):  # retried only when the blob key was taken or a concurrent put published a newer version
            version = self._reserve(tenant, prefix_id)
            if version is None:
                continue
            try:
                self._write_blob(tenant, prefix_id, version, data)
                info = VersionInfo(tenant, prefix_id, version, digest, len(data), meta, time.time())
                status, *counts = self._publish(info)
            except BaseException:
                self._abandon(tenant, prefix_id, version)  # the refusal, not a failed cleanup, is raised
                raise
            if status == "ok":
                return info
            if status == "no_tenant":
                raise NotFoundError(f"tenant {tenant!r} not found")
            if status == "quota":
                quota = self.tenant_info(tenant).quota
                quota.check(tenant, int(counts[0]), int(counts[1]))
                raise QuotaExceededError(f"tenant {tenant!r} quota exceeded")
            if status == "no_blob":  # evicted under maxmemory, or collected as an orphan (a very slow put)
                raise unavailable("redis lost the blob before it was published (maxmemory eviction?); retry")
        raise ConflictError(f"adapter {prefix_id!r} is being overwritten concurrently; retry")

    # the steps of put (separate so that tests can stop between them, as a crash would)
    def _reserve(self, tenant: str, prefix_id: str) -> int | None:
        """Next version of the id, recorded as pending, its blob key held by ``PLACEHOLDER``; None if
        that key was taken (the caller takes the next number). Collects the tenant's stale pending blobs."""
        version = int(
            self._scripts["reserve"](
                keys=[self._k("t", tenant), self._k("seq", tenant), self._k("pend", tenant)],
                args=[prefix_id, self.prefix, tenant, repr(self.orphan_age_s), PLACEHOLDER],
            )
        )
        if version == -1:
            raise NotFoundError(f"tenant {tenant!r} not found")
        return None if version < 0 else version

    def _write_blob(self, tenant: str, prefix_id: str, version: int, data: bytes) -> None:
        """Replace the reserved placeholder with the blob, only while the placeholder is still there:
        ``delete_tenant`` or the orphan collector deleting it meanwhile aborts the write (WATCH)."""
        import redis

        key = self._blob_prefix(tenant, prefix_id) + str(version)
        with self._r.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.get(key) == PLACEHOLDER:
                    pipe.multi()
                    pipe.set(key, data, xx=True)
                    pipe.execute()
                    return
            except redis.WatchError:
                pass
        if not self._r.exists(self._k("t", tenant)):
            raise NotFoundError(f"tenant {tenant!r} not found")
        raise unavailable("the put took longer than the orphan age and its blob was collected; retry")

    def _publish(self, info: VersionInfo) -> list[str]:
        t, i, v = info.tenant, info.prefix_id, info.version
        res = self._scripts["publish"](
            keys=[
                self._k("t", t),
                self._k("a", t),
                self._k("vs", t, i),
                self._blob_prefix(t, i) + str(v),
                self._k("gr", t, i),
                self._k("pend", t),
                self._k("pin", t),
            ],
            args=[
                i,
                v,
                info.to_json(),
                info.size,
                self.keep_versions,
                self._blob_prefix(t, i),
                self.channel,
                json.dumps({"t": t, "p": i, "v": v}),
                repr(self.retain_grace_s),
                f"{i}:{v}",
            ],
        )
        return [text(x) for x in res]

    def _abandon(self, tenant: str, prefix_id: str, version: int) -> None:
        """Best effort: delete an unpublished blob and its marker (else the orphan collector will)."""
        try:
            self._scripts["abandon"](
                keys=[
                    self._k("vs", tenant, prefix_id),
                    self._blob_prefix(tenant, prefix_id) + str(version),
                    self._k("pend", tenant),
                ],
                args=[version, f"{prefix_id}:{version}"],
            )
        except Exception as exc:  # e.g. MISCONF refuses even deletes: the marker stays for the collector
            _log.warning("redis store: could not clean up %s/%s v%d: %r", tenant, prefix_id, version, exc)

    @guard
    def collect_orphans(self, tenant: str | None = None, max_age_s: float | None = None) -> int:
        """Delete blobs whose put reserved them more than ``max_age_s`` (default ``orphan_age_s``)
        ago and never published them, for one tenant or all; returns how many. Puts do this for
        their own tenant; call it from a cron job to sweep tenants that stopped publishing."""
        age = self.orphan_age_s if max_age_s is None else float(max_age_s)
        names = [check_tenant(tenant)] if tenant else [text(n) for n in self._r.sscan_iter(self._k("tenants"))]
        return sum(
            int(self._scripts["collect_orphans"](keys=[self._k("pend", t)], args=[self.prefix, t, repr(age)]))
            for t in names
        )

    def _served(self, tenant: str, prefix_id: str) -> VersionInfo:
        """The pin, else the pointer: one round trip, no MULTI (Redis refuses queued commands under
        maxmemory, and serving must go on). The pin is read first, so a pin, unpin or put in between
        gives the served version of just before it (a pin read first was served then; without a pin,
        the pointer read later was served before any later pin, and a put clears pins)."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self._k("pin", tenant), prefix_id)
        pipe.hget(self._k("a", tenant), prefix_id)
        pinned, raw = pipe.execute()
        if raw is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        return VersionInfo.from_json(pinned or raw)

    @guard
    def head(self, tenant: str, prefix_id: str, version: int | None = None) -> VersionInfo:
        check_tenant(tenant), check_id(prefix_id)
        if version is None:
            return self._served(tenant, prefix_id)
        v = str(check_version(version))
        pipe = self._r.pipeline(transaction=False)  # no MULTI: see _served
        pipe.hexists(self._k("a", tenant), prefix_id)  # a deleted adapter has no versions
        pipe.hget(self._k("vs", tenant, prefix_id), v)
        pipe.zscore(self._k("gr", tenant, prefix_id), v)  # dropped by retention: in its grace window only
        exists, raw, gone = pipe.execute()
        if not exists or raw is None or gone is not None:
            raise NotFoundError(_NO_VERSION.format(v, prefix_id))
        return VersionInfo.from_json(raw)

    @guard
    def get(self, tenant: str, prefix_id: str, version: int | None = None) -> tuple[VersionInfo, bytes]:
        """Record, then the immutable blob it names (plain GET: a Lua round trip would copy ~4 MB twice).

        No ``version``: the served one (the pin, else the newest). ``version`` may be a kept version or
        one in its grace window. The blob's sha256 is checked
        against the record: a mismatch is logged and answered ``NotFoundError``, so the returned
        ``VersionInfo`` always describes the returned bytes. If the current blob was collected
        between the two reads (newer puts in between), the pointer is read again. With ``version``
        (a serving replica's cold load) the record and the blob come in one round trip: a blob key
        never changes once its record exists, and the sha256 check catches any race anyway.
        """
        check_tenant(tenant), check_id(prefix_id)
        v = None if version is None else check_version(version)
        missing = _MISSING.format(prefix_id) if v is None else _NO_VERSION.format(v, prefix_id)
        for _ in range(8):
            if v is None:
                info = self._served(tenant, prefix_id)
                data = self._r.get(self._blob_prefix(tenant, prefix_id) + str(info.version))
            else:
                pipe = self._r.pipeline(transaction=False)
                pipe.hexists(self._k("a", tenant), prefix_id)  # a deleted adapter has no versions
                pipe.hget(self._k("vs", tenant, prefix_id), str(v))
                pipe.get(self._blob_prefix(tenant, prefix_id) + str(v))
                exists, raw, data = pipe.execute()
                if not exists or raw is None:
                    raise NotFoundError(missing)
                info = VersionInfo.from_json(raw)
            # cast: decode_responses is off, so a blob comes back as bytes (redis-py types it bytes | str)
            data = cast("bytes | None", data)
            if data is not None and info.matches(data):
                return info, data
            if data is not None:
                _log.error("redis store: blob of %s/%s v%d does not match its record", tenant, prefix_id, info.version)
            if v is not None:
                raise NotFoundError(missing)
        raise NotFoundError(missing)

    @guard
    def list(self, tenant: str) -> list[VersionInfo]:
        check_tenant(tenant)
        pipe = self._r.pipeline(transaction=True)
        pipe.exists(self._k("t", tenant))
        pipe.hgetall(self._k("a", tenant))
        pipe.hgetall(self._k("pin", tenant))
        exists, pointers, pins = pipe.execute()
        if not exists:
            raise NotFoundError(f"tenant {tenant!r} not found")
        served = {**pointers, **pins}  # a pin is always of a current id (every script keeps it so)
        return sorted((VersionInfo.from_json(v) for v in served.values()), key=lambda i: i.prefix_id)

    @guard
    # builtins.list: in this class body ``list`` names the method above
    def versions(self, tenant: str, prefix_id: str) -> builtins.list[VersionInfo]:
        """The kept versions (not those in their grace window), oldest first."""
        return builtins.list(self.history(tenant, prefix_id).versions)

    @guard
    def history(self, tenant: str, prefix_id: str) -> VersionHistory:
        check_tenant(tenant), check_id(prefix_id)
        pipe = self._r.pipeline(transaction=True)
        pipe.hget(self._k("a", tenant), prefix_id)
        pipe.hget(self._k("pin", tenant), prefix_id)
        pipe.hgetall(self._k("vs", tenant, prefix_id))
        pipe.zrange(self._k("gr", tenant, prefix_id), 0, -1)
        raw, pinned, records, superseded = pipe.execute()
        if raw is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        gone = {text(x) for x in superseded}
        infos = sorted(
            (VersionInfo.from_json(r) for n, r in records.items() if text(n) not in gone), key=lambda i: i.version
        )
        return VersionHistory(
            VersionInfo.from_json(raw), VersionInfo.from_json(pinned) if pinned else None, tuple(infos)
        )

    @guard
    def pin(self, tenant: str, prefix_id: str, version: int) -> VersionInfo:
        """Serve kept ``version`` instead of the newest until ``unpin`` or the next put."""
        check_tenant(tenant), check_id(prefix_id)
        v = check_version(version)
        rec = self._scripts["pin"](
            keys=[
                self._k("a", tenant),
                self._k("vs", tenant, prefix_id),
                self._k("gr", tenant, prefix_id),
                self._k("pin", tenant),
            ],
            args=[prefix_id, v, self.channel, json.dumps({"t": tenant, "p": prefix_id, "v": v})],
        )
        if rec is None:
            raise NotFoundError(_NO_VERSION.format(v, prefix_id))
        return VersionInfo.from_json(rec)

    @guard
    def unpin(self, tenant: str, prefix_id: str) -> VersionInfo:
        """Serve the newest version again (no pin: nothing changes); returns it."""
        check_tenant(tenant), check_id(prefix_id)
        rec = self._scripts["unpin"](
            keys=[self._k("a", tenant), self._k("pin", tenant)], args=[prefix_id, self.channel, tenant]
        )
        if rec is None:
            raise NotFoundError(_MISSING.format(prefix_id))
        return VersionInfo.from_json(rec)

    @guard
    def delete(self, tenant: str, prefix_id: str) -> None:
        check_tenant(tenant), check_id(prefix_id)
        event = json.dumps({"t": tenant, "p": prefix_id, "v": None})
        done = self._scripts["delete"](
            keys=[
                self._k("t", tenant),
                self._k("a", tenant),
                self._k("vs", tenant, prefix_id),
                self._k("gr", tenant, prefix_id),
                self._k("pin", tenant),
            ],
            args=[prefix_id, self._blob_prefix(tenant, prefix_id), self.channel, event],
        )
        if not done:
            raise NotFoundError(_MISSING.format(prefix_id))

    # health
    @guard
    def ping(self) -> None:
        self._r.ping()

    @guard
    def check_writable(self) -> None:
        """SET a probe key (1 s expiry) and delete it: a 503 when Redis takes no writes (OOM, READONLY...)."""
        self._r.set(self._k("probe"), secrets.token_hex(4), px=1000)
        self._r.delete(self._k("probe"))

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

"""The store contract: ``AdapterReader`` / ``AdapterStore`` (no Ray, no HTTP), their records, and
``StoreBase``, the code the backends share.

Decisions shared by every backend:

* Versions are immutable and numbered 1, 2, 3... per (tenant, prefix id); numbers keep increasing
  after a delete, and after a delete *of the tenant* too: a deleted tenant raises the store-wide
  "version floor" to the highest number it used and a tenant (re)created later numbers from above
  it. So (tenant name, prefix id, version) names one blob for all time, and a cache can never
  confuse an old adapter with a new one of the same name. ``get`` also checks the blob's sha256
  against the version record and answers ``NotFoundError`` when they differ, so the returned
  ``VersionInfo.sha256`` always describes the returned bytes.
* ``put`` validates first (the injected validator, default ``format.inspect_packed``), then writes
  the blob under its new version, then moves the "current" pointer atomically. A reader sees the
  old or the new version, never a mix; a rejected or failed put changes nothing.
* A missing adapter and another tenant's adapter both raise ``NotFoundError`` (no existence leak).
* Quotas count the *current* versions (what a tenant serves): ``max_adapters`` ids and
  ``max_bytes`` in total; 0 means unlimited. The last ``keep_versions`` (default 3) versions of each
  id are kept for rollback/pull; they do not count towards the quota.
* A version dropped by retention stays fetchable with ``get(version=N)`` for ``retain_grace_s``
  (default 60 s) more: the Ingress resolves a version with ``head`` and a serving replica fetches it
  a moment later, and a burst of puts in between must not turn that fetch into a false 404. Such
  versions are collected lazily by later puts of the same id (no background thread); ``versions``
  lists only the kept ones. ``delete`` drops every version at once (the answer is 404 anyway).
* A store that cannot be written (read-only or full disk, Redis OOM / READONLY / MISCONF) answers
  ``StoreUnavailableError`` (503) with ``retry_after``, never a 500, and leaves nothing half-written:
  the previous version keeps serving. ``check_writable`` probes this cheaply for ``/readyz``.
* Pinning (rollback): ``pin`` makes a *kept* version the one ``head`` returns (served) instead of the
  newest; ``unpin`` serves the newest again. A ``put`` publishes its version as current and clears the
  pin in the same atomic step (an upload means "serve this"), and that put's retention keeps the
  version that was pinned until then (so one can roll back to it again). Only puts run retention, so
  a pinned version is never dropped. ``head(version=N)`` is a kept version's record (404 otherwise:
  missing, dropped by retention, or of a deleted id). Quotas count the newest versions, pinned or not.
* The change feed (``subscribe``) is a hint: Redis pub/sub can lose messages (a reconnect emits a
  ``resync`` event). Nothing relies on it for correctness: the Ingress ``head``s the store on every
  request and the serving replicas key their device caches by (tenant, prefix, version, sha256), so a lost
  event can only keep a superseded version in memory a little longer, never serve it.
* Two protocols, one per side. ``AdapterReader`` is what a serving (model) replica needs: fetch
  a named version, look up the current one, follow the change feed, close. ``AdapterStore`` extends
  it with the admin side (publish, delete, tenants, keys, quotas, authentication, health) that only
  the Ingress and the operator CLI use. A replica that depends on the reader alone cannot mutate
  tenants' adapters by accident, and a read-only or caching backend for replicas need only
  implement four methods.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import BadRequestError, InvalidAdapterError, QuotaExceededError, StoreUnavailableError
from .jobs import TrainingLimits

if TYPE_CHECKING:  # ratelimit imports this package: a runtime import here would be circular
    from ..ratelimit import RateLimits

_log = logging.getLogger(__name__)
DEFAULT_KEEP_VERSIONS = 3
DEFAULT_RETAIN_GRACE_S = 60.0  # a superseded version stays fetchable this long (see the module docstring)
RETRY_AFTER_S = 5.0  # the Retry-After a 503 from an unwritable or unreachable store carries


def unavailable(message: str) -> StoreUnavailableError:
    """The 503 for a store that cannot be written or reached right now (clients retry after a pause)."""
    return StoreUnavailableError(message, retry_after=RETRY_AFTER_S)


@dataclass(frozen=True)
class Quota:
    """Per-tenant limits on current versions; 0 = unlimited."""

    max_adapters: int = 100
    max_bytes: int = 2**30

    def __post_init__(self):
        for name in ("max_adapters", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"quota {name} must be an int >= 0 (0 = unlimited), got {value!r}")

    def check(self, tenant: str, adapters: int, nbytes: int) -> None:
        """Raise ``QuotaExceededError`` if usage *after* a put would exceed this quota."""
        if self.max_adapters and adapters > self.max_adapters:
            raise QuotaExceededError(
                f"tenant {tenant!r} may own at most {self.max_adapters} adapters", code="quota_adapters"
            )
        if self.max_bytes and nbytes > self.max_bytes:
            raise QuotaExceededError(
                f"tenant {tenant!r} would use {nbytes} bytes; its quota is {self.max_bytes}", code="quota_bytes"
            )


@dataclass(frozen=True)
class VersionInfo:
    """One published version: what ``head`` returns and what the pointer holds."""

    tenant: str
    prefix_id: str
    version: int
    sha256: str
    size: int
    meta: dict = field(default_factory=dict)  # kind, num_virtual_tokens, labels, fingerprint, ...
    created: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> VersionInfo:
        d = json.loads(text)
        return cls(
            d["tenant"],
            d["prefix_id"],
            int(d["version"]),
            d["sha256"],
            int(d["size"]),
            d.get("meta") or {},
            float(d.get("created", 0.0)),
        )

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` is the blob this record describes (size and sha256)."""
        return len(data) == self.size and hashlib.sha256(data).hexdigest() == self.sha256


@dataclass(frozen=True)
class VersionHistory:
    """One id's versions as ``history`` reads them in one step: ``current`` is the newest published
    version, ``pinned`` the rolled-back-to one (None: not pinned), ``versions`` the kept ones, oldest first."""

    current: VersionInfo
    pinned: VersionInfo | None
    versions: tuple[VersionInfo, ...]

    @property
    def served(self) -> VersionInfo:
        """What ``head`` returns: the pin, else the newest."""
        return self.pinned or self.current


@dataclass(frozen=True)
class TenantInfo:
    """A tenant's record. ``limits`` / ``training_limits`` None: the server's default rate / training limits
    apply (``AppSettings.default_limits`` / ``AppSettings.training.limits``)."""

    name: str
    quota: Quota
    adapters: int = 0
    bytes: int = 0
    key_ids: tuple[str, ...] = ()
    created: float = 0.0
    limits: RateLimits | None = None
    training_limits: TrainingLimits | None = None

    def to_dict(self) -> dict:
        d = asdict(self)  # limits, training_limits -> their field dicts (or None)
        d["key_ids"] = list(self.key_ids)
        return d


def check_limits(limits: object) -> RateLimits | None:
    """``limits`` if it is a ``RateLimits`` or None (= the server's default), else ``BadRequestError``."""
    from ..ratelimit import RateLimits

    if limits is not None and not isinstance(limits, RateLimits):
        raise BadRequestError(f"limits must be RateLimits or None, got {type(limits).__name__}", code="bad_limits")
    return limits


def limits_from_dict(data: dict | None) -> RateLimits | None:
    """A stored limits record back as ``RateLimits`` (None / empty: the server's default)."""
    from ..ratelimit import RateLimits

    return RateLimits.from_dict(data) if data else None


def check_training_limits(limits: object) -> TrainingLimits | None:
    """``limits`` if it is a ``TrainingLimits`` or None (= the server's default), else ``BadRequestError``."""
    if limits is not None and not isinstance(limits, TrainingLimits):
        raise BadRequestError(
            f"training limits must be TrainingLimits or None, got {type(limits).__name__}", code="bad_limits"
        )
    return limits


def training_limits_from_dict(data: dict | None) -> TrainingLimits | None:
    """A stored training limits record back as ``TrainingLimits`` (None / empty: the server's default)."""
    return TrainingLimits.from_dict(data) if data else None


@dataclass(frozen=True)
class ChangeEvent:
    """(tenant, prefix id) now has ``version`` (None: deleted). ``resync``: events may have been lost
    (the feed reconnected); drop or revalidate everything."""

    tenant: str
    prefix_id: str
    version: int | None
    resync: bool = False


Validator = Callable[[bytes], Any]


def default_validator(data: bytes):
    """``prefixserve.adapters.format.inspect_packed``, imported lazily (it pulls in torch)."""
    from ..format import inspect_packed

    return inspect_packed(data)


def meta_to_dict(meta) -> dict:
    """Normalise a validator's result (AdapterMeta, dataclass or dict) into a JSON-safe dict."""
    if hasattr(meta, "to_dict"):
        meta = meta.to_dict()
    elif is_dataclass(meta) and not isinstance(meta, type):
        meta = asdict(meta)
    if not isinstance(meta, dict):
        raise InvalidAdapterError(
            f"validator returned {type(meta).__name__}, expected adapter metadata", code="bad_metadata"
        )
    return json.loads(json.dumps(meta))  # tuples -> lists; fails loudly on non-JSON values


ChangeCallback = Callable[[ChangeEvent], None]


class Subscription:
    """A change-feed subscriber; ``close`` stops its callbacks."""

    def __init__(self, store: StoreBase, callback: ChangeCallback):
        self._store, self.callback = store, callback

    def close(self) -> None:
        self._store._unsubscribe(self)


@runtime_checkable
class AdapterReader(Protocol):
    """The read side: all a serving replica needs (it is told which version to serve).

    ``head(t, i)`` is the served version (the pin, else the newest); ``head(t, i, version=N)`` that
    kept version's record, so the Ingress resolves an explicit version without reading its blob.

    ``get`` returns only bytes whose size and sha256 match the ``VersionInfo`` it returns (else
    ``NotFoundError``): the Worker relies on it and does not hash them a second time.
    """

    def head(self, tenant: str, prefix_id: str, version: int | None = None) -> VersionInfo: ...
    def get(self, tenant: str, prefix_id: str, version: int | None = None) -> tuple[VersionInfo, bytes]: ...
    def subscribe(self, callback: ChangeCallback) -> Subscription: ...
    def close(self) -> None: ...


@runtime_checkable
class AdapterStore(AdapterReader, Protocol):
    """The full store: the reader plus the admin side (adapters, tenants, API keys, quotas, health)."""

    url: str

    def put(self, tenant: str, prefix_id: str, data: bytes) -> VersionInfo: ...
    # builtins.list: inside this class body ``list`` is the method below
    def list(self, tenant: str) -> builtins.list[VersionInfo]: ...
    def versions(self, tenant: str, prefix_id: str) -> builtins.list[VersionInfo]: ...
    def delete(self, tenant: str, prefix_id: str) -> None: ...
    def history(self, tenant: str, prefix_id: str) -> VersionHistory: ...
    def pin(self, tenant: str, prefix_id: str, version: int) -> VersionInfo: ...
    def unpin(self, tenant: str, prefix_id: str) -> VersionInfo: ...
    def create_tenant(self, name: str, quota: Quota | None = None) -> str: ...
    def tenant_info(self, name: str) -> TenantInfo: ...
    def list_tenants(self) -> builtins.list[TenantInfo]: ...
    def set_quota(self, name: str, quota: Quota) -> None: ...
    def set_limits(self, name: str, limits: RateLimits | None) -> None: ...
    def set_training_limits(self, name: str, limits: TrainingLimits | None) -> None: ...
    def rotate_key(self, name: str, *, revoke_old: bool = True) -> str: ...
    def revoke_key(self, name: str, key_id: str | None = None) -> int: ...
    def delete_tenant(self, name: str) -> None: ...
    def authenticate(self, api_key: str) -> str | None: ...
    def ping(self) -> None: ...
    def check_writable(self) -> None: ...


class StoreBase:
    """Validation and the subscriber list, shared by the backends (which start their own feed thread)."""

    url = ""

    def __init__(
        self,
        *,
        validator: Validator | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        retain_grace_s: float = DEFAULT_RETAIN_GRACE_S,
    ):
        if int(keep_versions) < 1:
            raise ValueError("keep_versions must be >= 1")
        if not float(retain_grace_s) >= 0:
            raise ValueError("retain_grace_s must be >= 0")
        self.validator = validator or default_validator
        self.keep_versions = int(keep_versions)
        self.retain_grace_s = float(retain_grace_s)
        self._subs: list[Subscription] = []
        self._subs_lock = threading.Lock()
        self._closed = threading.Event()

    def _validate(self, data) -> dict:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidAdapterError("adapter data must be bytes", code="bad_data")
        return meta_to_dict(self.validator(bytes(data)))

    # change feed
    def subscribe(self, callback: ChangeCallback) -> Subscription:
        sub = Subscription(self, callback)
        with self._subs_lock:
            self._subs.append(sub)
        self._start_feed()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with self._subs_lock:
            if sub in self._subs:
                self._subs.remove(sub)

    def _emit(self, event: ChangeEvent) -> None:
        with self._subs_lock:
            subs = list(self._subs)
        for sub in subs:
            try:
                sub.callback(event)
            except Exception:  # one bad subscriber must not stop the feed
                _log.exception("change-feed subscriber failed on %s", event)

    def _start_feed(self) -> None:  # pragma: no cover - backends override
        raise NotImplementedError

    def close(self) -> None:
        self._closed.set()

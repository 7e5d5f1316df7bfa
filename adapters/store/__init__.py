"""Adapter store: tenants, API keys and immutable, versioned adapter blobs behind one small protocol.

``open_store(url)`` picks the backend:

* ``file:///var/lib/prefixserve`` -- embedded default, one machine (:mod:`.file`)
* ``redis://[:password@]host:6379/0?prefix=ps:`` or ``rediss://`` -- shared by all replicas
  (:mod:`.redis_store`); the password may come from ``PREFIXSERVE_REDIS_PASSWORD`` instead, or from
  the file ``PREFIXSERVE_REDIS_PASSWORD_FILE`` names (a mounted Secret)
* ``memory://`` -- a throwaway temporary file store, for tests and demos

See :mod:`.base` for the semantics every backend keeps, and why serving replicas need only the
``AdapterReader`` side of the ``AdapterStore`` that ``open_store`` returns. Both backends also
implement ``TrainingStore`` (training datasets and job records, :mod:`.jobs`): ``open_store`` returns a
``Store``, both protocols in one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Protocol
from urllib.parse import unquote, urlsplit

from ..errors import BadRequestError
from .base import (
    DEFAULT_KEEP_VERSIONS,
    DEFAULT_RETAIN_GRACE_S,
    AdapterReader,
    AdapterStore,
    ChangeEvent,
    Quota,
    StoreBase,
    Subscription,
    TenantInfo,
    Validator,
    VersionHistory,
    VersionInfo,
    default_validator,
)
from .ids import ID_PATTERN, check_id, check_tenant
from .jobs import (
    ACTIVE,
    DATASET_FORMATS,
    JOB_STATES,
    DatasetInfo,
    EpochRecord,
    JobError,
    JobRecord,
    TrainingLimits,
    TrainingStore,
    check_dataset_id,
    check_job_id,
)

ENV_URL = "PREFIXSERVE_STORE"


class Store(AdapterStore, TrainingStore, Protocol):
    """Every backend: the adapter side (:class:`AdapterStore`) and the training side (:class:`TrainingStore`)."""


__all__ = [
    "open_store",
    "Store",
    "AdapterReader",
    "AdapterStore",
    "VersionInfo",
    "VersionHistory",
    "TenantInfo",
    "Quota",
    "ChangeEvent",
    "Subscription",
    "Validator",
    "default_validator",
    "check_id",
    "check_tenant",
    "ID_PATTERN",
    "DEFAULT_KEEP_VERSIONS",
    "DEFAULT_RETAIN_GRACE_S",
    "ENV_URL",
    "StoreBase",
    "TrainingStore",
    "TrainingLimits",
    "DatasetInfo",
    "EpochRecord",
    "JobError",
    "JobRecord",
    "JOB_STATES",
    "ACTIVE",
    "DATASET_FORMATS",
    "check_dataset_id",
    "check_job_id",
]


def open_store(url: str | None = None, *, validator: Validator | None = None, **opts) -> Store:
    """Open the store at ``url`` (default: env ``PREFIXSERVE_STORE``).

    ``validator(data) -> AdapterMeta`` runs before every put (default ``format.inspect_packed``; the
    server passes one bound to its backbone). Options: ``keep_versions`` (3), ``retain_grace_s`` (60:
    how long a version dropped by retention stays fetchable by number), ``pepper``; file:
    ``poll_interval`` (0.2 s); redis: ``prefix``, ``password``, ``retries``, ``health_check_interval``,
    ``orphan_age_s`` (60: when an unpublished blob counts as left by a crashed put).
    """
    url = url or os.environ.get(ENV_URL)
    if not url:
        raise BadRequestError(f"no store URL: pass --store or set {ENV_URL}", code="no_store")
    scheme = urlsplit(url).scheme
    if scheme == "file":
        from .file import FileStore

        parts = urlsplit(url)
        path = unquote(parts.netloc + parts.path) if parts.netloc not in ("", "localhost") else unquote(parts.path)
        if not path:
            raise BadRequestError(f"file store URL {url!r} has no path (use file:///abs/path)", code="bad_store_url")
        return FileStore(path, validator=validator, **opts)
    if scheme in ("redis", "rediss"):
        from .redis_store import RedisStore

        return RedisStore(url, validator=validator, **opts)
    if scheme == "memory":
        from .file import FileStore

        return FileStore(tempfile.mkdtemp(prefix="prefixserve-store-"), validator=validator, url="memory://", **opts)
    raise BadRequestError(
        f"unknown store URL scheme {scheme!r}: use file://, redis://, rediss:// or memory://", code="bad_store_url"
    )

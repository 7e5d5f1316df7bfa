"""The Redis store's training side: datasets and job records (:mod:`.jobs` has the records and rules).

Keys (``P`` = the key prefix, as in :mod:`.redis_store`; tenant names and ids never contain ``:``)::

    P ds:<T>              HASH   dataset id -> DatasetInfo JSON (the tenant's datasets; the limits sum them)
    P dsb:<T>:<D>         STRING the dataset's bytes (immutable)
    P job:<T>:<J>         STRING JobRecord JSON, replaced whole on every change
    P jobs:<T>            ZSET   job ids scored by ``created`` (listing, newest first)
    P jact:<T>            HASH   active (queued / running) job id -> its dataset id

How each write stays atomic while every Ingress replica and runner actor shares the store:

* ``put_dataset``: WATCH ``t:<T>`` and ``ds:<T>``, check the tenant and the limits, then MULTI: blob and
  record, EXEC. Both land or neither (a refused EXEC -- OOM, READONLY, MISCONF -- writes nothing); a
  concurrent upload, adapter publish (it touches ``t:<T>``) or ``delete_tenant`` in between aborts the
  EXEC and the upload checks again (a few times, then ``ConflictError``, 409: retry).
* ``create_job`` and ``delete_dataset``: one Lua script each (:mod:`.redis_job_scripts`).
* ``update_job`` / ``request_cancel``: WATCH the job's key, read it, apply the change in Python
  (:func:`.jobs.apply_update`), then MULTI: the record, and the ``jact`` entry dropped when the job
  became terminal, EXEC; a concurrent write of the same job makes it read again.
* ``delete_tenant`` purges all of the above in its own script, atomically with the tenant.

Reads: one round trip where possible; ``get_dataset`` checks the blob's size and sha256 against the
record it read with it (a blob never changes once its record exists).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..errors import ConflictError, NotFoundError
from .ids import check_id, check_tenant
from .jobs import (
    DatasetInfo,
    JobRecord,
    TrainingLimits,
    apply_cancel,
    apply_update,
    check_changes,
    check_dataset_args,
    check_dataset_id,
    check_job_args,
    check_job_id,
    check_limits_arg,
    check_list_limit,
    dataset_in_use,
    dataset_not_found,
    job_not_found,
    new_dataset_id,
    new_job,
    new_job_id,
    newest_first,
)
from .redis_common import RedisBase, guard, text
from .redis_job_scripts import JOB_SCRIPTS

_log = logging.getLogger(__name__)
_R = TypeVar("_R")
WATCH_TRIES = 20  # optimistic transactions retried this often (with jittered backoff) before a 409


def _tenant_missing(tenant: str) -> NotFoundError:
    return NotFoundError(f"tenant {tenant!r} not found")


class RedisJobs(RedisBase):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # "delete_tenant" is replaced by the version that purges training data too (see redis_job_scripts)
        self._scripts.update({name: self._r.register_script(source) for name, source in JOB_SCRIPTS.items()})

    def _transaction(self, watch: list[str], body: Callable[[Any], _R]) -> _R:
        """Run ``body(pipe)`` with ``watch`` WATCHed: it reads, calls ``pipe.multi()``, queues writes and
        ``pipe.execute()``s; a watched key changed meanwhile runs it again."""
        import redis

        for attempt in range(WATCH_TRIES):
            with self._r.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(*watch)
                    return body(pipe)
                except redis.WatchError:
                    time.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
        raise ConflictError("the store was changed concurrently too often; retry", code="conflict")

    # datasets
    @guard
    def put_dataset(self, tenant: str, data: bytes, *, fmt: str, name: str = "", limits: TrainingLimits) -> DatasetInfo:
        check_tenant(tenant)
        data = check_dataset_args(data, fmt, name)
        limits = check_limits_arg(limits)
        digest = hashlib.sha256(data).hexdigest()
        tenant_key, index = self._k("t", tenant), self._k("ds", tenant)

        def upload(pipe) -> DatasetInfo:
            if not pipe.exists(tenant_key):
                raise _tenant_missing(tenant)
            infos = [DatasetInfo.from_json(raw) for raw in pipe.hvals(index)]
            limits.check_datasets(tenant, len(infos) + 1, sum(i.size for i in infos) + len(data))
            info = DatasetInfo(tenant, new_dataset_id(), fmt, len(data), digest, name, time.time())
            pipe.multi()
            pipe.set(self._k("dsb", tenant, info.dataset_id), data)
            pipe.hset(index, info.dataset_id, info.to_json())
            pipe.execute()
            return info

        return self._transaction([tenant_key, index], upload)

    @guard
    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo:
        check_tenant(tenant), check_dataset_id(dataset_id)
        raw = self._r.hget(self._k("ds", tenant), dataset_id)
        if raw is None:
            raise dataset_not_found(dataset_id)
        return DatasetInfo.from_json(raw)

    @guard
    def get_dataset(self, tenant: str, dataset_id: str) -> tuple[DatasetInfo, bytes]:
        """The record and its bytes in one round trip (size and sha256 checked; a mismatch is a 404)."""
        check_tenant(tenant), check_dataset_id(dataset_id)
        pipe = self._r.pipeline(transaction=False)
        pipe.hget(self._k("ds", tenant), dataset_id)
        pipe.get(self._k("dsb", tenant, dataset_id))
        raw, data = pipe.execute()
        if raw is None or data is None:
            raise dataset_not_found(dataset_id)
        info = DatasetInfo.from_json(raw)
        data = cast("bytes", data)  # decode_responses is off
        if not info.matches(data):
            _log.error("redis store: dataset %s/%s does not match its record", tenant, dataset_id)
            raise dataset_not_found(dataset_id)
        return info, data

    @guard
    def list_datasets(self, tenant: str) -> list[DatasetInfo]:
        check_tenant(tenant)
        pipe = self._r.pipeline(transaction=True)
        pipe.exists(self._k("t", tenant))
        pipe.hvals(self._k("ds", tenant))
        exists, records = pipe.execute()
        if not exists:
            raise _tenant_missing(tenant)
        return newest_first([DatasetInfo.from_json(raw) for raw in records])

    @guard
    def delete_dataset(self, tenant: str, dataset_id: str) -> None:
        check_tenant(tenant), check_dataset_id(dataset_id)
        status, *rest = [
            text(x)
            for x in self._scripts["delete_dataset"](
                keys=[self._k("ds", tenant), self._k("dsb", tenant, dataset_id), self._k("jact", tenant)],
                args=[dataset_id],
            )
        ]
        if status == "missing":
            raise dataset_not_found(dataset_id)
        if status == "in_use":
            raise dataset_in_use(dataset_id, rest[0])

    # jobs
    @guard
    def create_job(
        self, tenant: str, *, prefix_id: str, dataset_id: str, options: dict, epochs: int, limits: TrainingLimits
    ) -> JobRecord:
        check_tenant(tenant), check_id(prefix_id), check_dataset_id(dataset_id)
        options = check_job_args(options, epochs)
        limits = check_limits_arg(limits)
        job = new_job(tenant, new_job_id(), prefix_id, dataset_id, options, epochs, time.time())
        status, *rest = [
            text(x)
            for x in self._scripts["create_job"](
                keys=[
                    self._k("t", tenant),
                    self._k("ds", tenant),
                    self._k("jact", tenant),
                    self._k("jobs", tenant),
                    self._k("job", tenant, job.job_id),
                ],
                args=[dataset_id, limits.max_active_jobs, job.job_id, job.to_json(), repr(job.created)],
            )
        ]
        if status == "no_tenant":
            raise _tenant_missing(tenant)
        if status == "no_dataset":
            raise dataset_not_found(dataset_id)
        if status == "too_many":
            limits.check_jobs(tenant, int(rest[0]))  # raises the 429
        return job

    @guard
    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        check_tenant(tenant), check_job_id(job_id)
        raw = self._r.get(self._k("job", tenant, job_id))
        if raw is None:
            raise job_not_found(job_id)
        return JobRecord.from_json(raw)

    @guard
    def list_jobs(self, tenant: str, *, limit: int = 100) -> list[JobRecord]:
        check_tenant(tenant)
        limit = check_list_limit(limit)
        pipe = self._r.pipeline(transaction=True)
        pipe.exists(self._k("t", tenant))
        pipe.zrevrange(self._k("jobs", tenant), 0, limit - 1)
        exists, ids = pipe.execute()
        if not exists:
            raise _tenant_missing(tenant)
        return newest_first(self._jobs(tenant, [text(i) for i in ids]))

    def _jobs(self, tenant: str, job_ids: list[str]) -> list[JobRecord]:
        """The records of ``job_ids`` (one MGET; those deleted meanwhile, with their tenant, are skipped)."""
        if not job_ids:
            return []
        raws = self._r.mget([self._k("job", tenant, j) for j in job_ids])
        return [JobRecord.from_json(raw) for raw in raws if raw is not None]

    def _change_job(
        self, tenant: str, job_id: str, change: Callable[[JobRecord, float], JobRecord | None]
    ) -> JobRecord:
        """``change(record, now)`` -> the new record (written) or None (kept), as one optimistic transaction."""
        check_tenant(tenant), check_job_id(job_id)
        key = self._k("job", tenant, job_id)

        def write(pipe) -> JobRecord:
            raw = pipe.get(key)
            if raw is None:
                raise job_not_found(job_id)
            job = JobRecord.from_json(raw)
            new = change(job, time.time())
            if new is None:
                return job
            pipe.multi()
            pipe.set(key, new.to_json(), xx=True)
            if not new.active:
                pipe.hdel(self._k("jact", tenant), job_id)  # the tenant's slot is free again
            pipe.execute()
            return new

        return self._transaction([key], write)

    @guard
    def update_job(self, tenant: str, job_id: str, **changes: Any) -> JobRecord:
        checked = check_changes(changes)
        return self._change_job(tenant, job_id, lambda job, now: apply_update(job, checked, now))

    @guard
    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        return self._change_job(tenant, job_id, apply_cancel)

    @guard
    def active_jobs(self) -> list[JobRecord]:
        """Every tenant's queued and running jobs, oldest first."""
        tenants = sorted(text(n) for n in self._r.sscan_iter(self._k("tenants"), count=500))
        pipe = self._r.pipeline(transaction=False)
        for tenant in tenants:
            pipe.hkeys(self._k("jact", tenant))
        jobs: list[JobRecord] = []
        for tenant, ids in zip(tenants, pipe.execute(), strict=True):
            jobs += [job for job in self._jobs(tenant, [text(i) for i in ids]) if job.active]
        return newest_first(jobs)[::-1]

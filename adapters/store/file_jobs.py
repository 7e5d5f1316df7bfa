"""The file store's training side: datasets and job records (:mod:`.jobs` has the records and rules).

Layout inside the tenant's directory (ids are made by the store and shape-checked on every call)::

    tenants/<T>/datasets/<ds id>.bin     the uploaded bytes (immutable)
    tenants/<T>/datasets/<ds id>.json    its DatasetInfo
    tenants/<T>/jobs/<job id>.json       a JobRecord, replaced whole on every change

Every write runs under the tenant's ``flock`` (the adapter side's lock), so a limit check and the
write it guards are one step, and ``update_job`` is a true read-modify-write. Each file is written
with ``write_atomic`` (temp file, fsync, ``os.replace``). An upload writes the blob first, then the
record that makes it exist; a failed write removes both (an OSError becomes a 503), and a blob that
could not be removed (a disk that just turned read-only) has no record, so nothing lists or counts
it and the tenant's next upload deletes it. Deletes go the other way: record first, then blob.
Uploads hold the tenant lock while they write (tens of MB at most): the tenant's other writes wait.
Datasets and jobs live inside the tenant directory, so ``delete_tenant``'s one rename removes them
with the tenant; readers take no lock (every file they read is replaced whole, never rewritten).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InvalidIdError
from .file_base import FileBase, remove_quietly, write_atomic, writes
from .ids import check_id, check_tenant, safe_join
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

_log = logging.getLogger(__name__)


class FileJobs(FileBase):
    # paths (the tenant name and the id are checked before any path is built)
    def _datasets_dir(self, tenant: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant), "datasets")

    def _dataset_paths(self, tenant: str, dataset_id: str) -> tuple[Path, Path]:
        """(record, blob) of one dataset."""
        ddir = self._datasets_dir(tenant)
        check_dataset_id(dataset_id)
        return ddir / f"{dataset_id}.json", ddir / f"{dataset_id}.bin"

    def _jobs_dir(self, tenant: str) -> Path:
        return safe_join(self.root, "tenants", check_tenant(tenant), "jobs")

    def _job_path(self, tenant: str, job_id: str) -> Path:
        return self._jobs_dir(tenant) / f"{check_job_id(job_id)}.json"

    @staticmethod
    def _records(folder: Path) -> list[tuple[str, bytes]]:
        """(id, JSON) of every ``<id>.json`` in ``folder`` (none if it is missing; files that vanish are skipped)."""
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                with contextlib.suppress(FileNotFoundError):
                    out.append((name[: -len(".json")], (folder / name).read_bytes()))
        return out

    def _dataset_infos(self, tenant: str) -> list[DatasetInfo]:
        return [DatasetInfo.from_json(raw) for _, raw in self._records(self._datasets_dir(tenant))]

    def _job_records(self, tenant: str) -> list[JobRecord]:
        return [JobRecord.from_json(raw) for _, raw in self._records(self._jobs_dir(tenant))]

    # datasets
    @writes
    def put_dataset(self, tenant: str, data: bytes, *, fmt: str, name: str = "", limits: TrainingLimits) -> DatasetInfo:
        check_tenant(tenant)
        data = check_dataset_args(data, fmt, name)
        limits = check_limits_arg(limits)
        digest = hashlib.sha256(data).hexdigest()
        ddir = self._datasets_dir(tenant)
        with self._lock(tenant):
            self._tenant_record(tenant)
            infos = self._dataset_infos(tenant)
            limits.check_datasets(tenant, len(infos) + 1, sum(i.size for i in infos) + len(data))
            ddir.mkdir(exist_ok=True)
            self._collect_leftovers(ddir)
            info = DatasetInfo(tenant, new_dataset_id(), fmt, len(data), digest, name, time.time())
            record, blob = self._dataset_paths(tenant, info.dataset_id)
            try:
                write_atomic(blob, data)
                write_atomic(record, info.to_json().encode())  # the dataset exists from here
            except BaseException:
                remove_quietly(record, blob)  # the caller never learns the id: nothing may stay
                raise
        return info

    @staticmethod
    def _collect_leftovers(ddir: Path) -> None:
        """Under the tenant lock: delete blobs without a record and temp files (failed or crashed uploads)."""
        names = set(os.listdir(ddir))
        for name in names:
            stem, _, ext = name.rpartition(".")
            if name.startswith(".") or (ext == "bin" and f"{stem}.json" not in names):
                remove_quietly(ddir / name)

    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo:
        record, _ = self._dataset_paths(tenant, dataset_id)
        try:
            return DatasetInfo.from_json(record.read_bytes())
        except FileNotFoundError:
            raise dataset_not_found(dataset_id) from None

    def get_dataset(self, tenant: str, dataset_id: str) -> tuple[DatasetInfo, bytes]:
        """The record and the bytes it describes (size and sha256 checked; a mismatch is a 404)."""
        info = self.dataset_info(tenant, dataset_id)
        _, blob = self._dataset_paths(tenant, dataset_id)
        try:
            data = blob.read_bytes()
        except FileNotFoundError:  # deleted since the record was read
            raise dataset_not_found(dataset_id) from None
        if not info.matches(data):
            _log.error("file store: dataset %s/%s does not match its record", tenant, dataset_id)
            raise dataset_not_found(dataset_id)
        return info, data

    def list_datasets(self, tenant: str) -> list[DatasetInfo]:
        self._tenant_record(tenant)
        return newest_first(self._dataset_infos(tenant))

    @writes
    def delete_dataset(self, tenant: str, dataset_id: str) -> None:
        record, blob = self._dataset_paths(tenant, dataset_id)
        with self._lock(tenant):
            if not record.exists():
                raise dataset_not_found(dataset_id)
            for job in self._job_records(tenant):
                if job.active and job.dataset_id == dataset_id:
                    raise dataset_in_use(dataset_id, job.job_id)
            os.remove(record)  # first: from here the dataset does not exist
            remove_quietly(blob)  # if this fails, the next upload collects the blob

    # jobs
    @writes
    def create_job(
        self, tenant: str, *, prefix_id: str, dataset_id: str, options: dict, epochs: int, limits: TrainingLimits
    ) -> JobRecord:
        check_tenant(tenant), check_id(prefix_id), check_dataset_id(dataset_id)
        options = check_job_args(options, epochs)
        limits = check_limits_arg(limits)
        record, _ = self._dataset_paths(tenant, dataset_id)
        with self._lock(tenant):
            self._tenant_record(tenant)
            if not record.exists():
                raise dataset_not_found(dataset_id)
            limits.check_jobs(tenant, sum(job.active for job in self._job_records(tenant)))
            job = new_job(tenant, new_job_id(), prefix_id, dataset_id, options, epochs, time.time())
            self._jobs_dir(tenant).mkdir(exist_ok=True)
            write_atomic(self._job_path(tenant, job.job_id), job.to_json().encode())
        return job

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        path = self._job_path(tenant, job_id)
        try:
            return JobRecord.from_json(path.read_bytes())
        except FileNotFoundError:
            raise job_not_found(job_id) from None

    def list_jobs(self, tenant: str, *, limit: int = 100) -> list[JobRecord]:
        limit = check_list_limit(limit)
        self._tenant_record(tenant)
        return newest_first(self._job_records(tenant))[:limit]

    def _change_job(
        self, tenant: str, job_id: str, change: Callable[[JobRecord, float], JobRecord | None]
    ) -> JobRecord:
        """Under the tenant lock: ``change(record, now)`` -> the new record (written) or None (kept)."""
        path = self._job_path(tenant, job_id)
        with self._lock(tenant):
            job = self.get_job(tenant, job_id)
            new = change(job, time.time())
            if new is None:
                return job
            write_atomic(path, new.to_json().encode())
        return new

    @writes
    def update_job(self, tenant: str, job_id: str, **changes: Any) -> JobRecord:
        checked = check_changes(changes)
        return self._change_job(tenant, job_id, lambda job, now: apply_update(job, checked, now))

    @writes
    def request_cancel(self, tenant: str, job_id: str) -> JobRecord:
        return self._change_job(tenant, job_id, apply_cancel)

    def active_jobs(self) -> list[JobRecord]:
        """Every tenant's queued and running jobs, oldest first."""
        jobs = []
        for tenant in os.listdir(self.root / "tenants"):
            with contextlib.suppress(InvalidIdError):  # not a tenant's directory
                jobs += [job for job in self._job_records(tenant) if job.active]
        return newest_first(jobs)[::-1]

"""Training jobs and their datasets in the store (issue #16): the records, the per-tenant limits, and
``TrainingStore``, the methods both backends add (:mod:`.file_jobs`, :mod:`.redis_jobs`). The training
service (Ray actor, HTTP routes) builds on this; nothing here knows about Ray or HTTP.

Decisions shared by every backend:

* Ids are made by the store: ``ds_<24 hex>`` and ``job_<24 hex>`` (96 random bits, so never reused,
  not even by a tenant re-created under the same name). Every method checks an id's shape before it
  touches a path or a key: anything else is ``InvalidIdError`` (400), so an id from a URL is safe.
* Datasets and jobs live under their tenant: a missing id and another tenant's id both raise
  ``NotFoundError`` (404, no existence leak), and ``delete_tenant`` removes them with the tenant in the
  same atomic step, so a namesake created later sees none of them and no job of a deleted tenant is
  "active" for anybody.
* Limits (``TrainingLimits``, passed per call: the server's defaults or a tenant's own; 0 = unlimited)
  are checked in the same atomic step as the write they guard. A refused write stores nothing:
  ``QuotaExceededError`` (429) ``quota_dataset_bytes`` / ``quota_datasets`` for datasets, and
  ``RateLimitedError`` (429, ``retry_after``) ``too_many_jobs`` for a tenant already running
  ``max_active_jobs`` jobs -- a concurrency limit like the serving one (:mod:`..ratelimit`): retry
  when a job has finished. ``max_job_s`` is not the store's to enforce (the service's runner does).
* A job is active while ``queued`` or ``running``. ``update_job`` is one atomic read-modify-write
  (:func:`apply_update`, the same code for both backends); a job in a terminal state
  (``succeeded`` / ``failed`` / ``cancelled``) never changes again -- the call returns the stored record
  unchanged, so a late progress write cannot resurrect a cancelled job. Moving to a terminal state
  sets ``finished`` (unless given) and frees the tenant's slot; moving to ``running`` sets ``started``
  (unless given or already set). ``request_cancel`` cancels a queued job at once and only flags a
  running one (its runner stops it and writes the terminal state).
* A dataset that an active job uses cannot be deleted (``ConflictError`` ``dataset_in_use``, 409):
  the job would otherwise fail when its runner loads it. ``create_job`` checks that its dataset exists.
* ``get_dataset`` checks the blob's size and sha256 against its record, like adapter blobs: a
  mismatch is logged and answered ``NotFoundError``, never returned.
* Times are the writing process's wall clock (``time.time()``); records are ordered by ``created``
  (newest first in the listings, the id breaking ties). Finished job records are kept until the
  tenant is deleted (they are small; a retention rule can come later).
* A store that cannot be written answers ``StoreUnavailableError`` (503) and keeps nothing
  half-written, as on the adapter side.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol, runtime_checkable

from ..errors import BadRequestError, ConflictError, InvalidIdError, NotFoundError, QuotaExceededError, RateLimitedError

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE = frozenset({"queued", "running"})
TERMINAL = frozenset(JOB_STATES) - ACTIVE
DATASET_FORMATS = ("tsv", "csv", "jsonl")
# the fields update_job may change (created, cancel_requested and the ids belong to the store)
UPDATABLE = frozenset({"state", "started", "finished", "epoch", "epochs", "history", "runner", "error", "result"})
JOB_SLOT_RETRY_AFTER_S = 30.0  # the Retry-After of too_many_jobs: jobs run for minutes, not milliseconds
MAX_DATASET_NAME = 255

_DATASET_ID_RE = re.compile(r"ds_[0-9a-f]{24}")
_JOB_ID_RE = re.compile(r"job_[0-9a-f]{24}")


def new_dataset_id() -> str:
    return f"ds_{secrets.token_hex(12)}"


def new_job_id() -> str:
    return f"job_{secrets.token_hex(12)}"


def _check_shape(value: object, pattern: re.Pattern[str], what: str, example: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidIdError(f"{what} {repr(value)[:60]} is invalid: expected {example}", code="invalid_id")
    return value


def check_dataset_id(value: object) -> str:
    """``value`` if it is shaped like an id the store makes (``ds_`` + 24 hex), else ``InvalidIdError``."""
    return _check_shape(value, _DATASET_ID_RE, "dataset id", "ds_ followed by 24 hex digits")


def check_job_id(value: object) -> str:
    """``value`` if it is shaped like an id the store makes (``job_`` + 24 hex), else ``InvalidIdError``."""
    return _check_shape(value, _JOB_ID_RE, "job id", "job_ followed by 24 hex digits")


def _dumps(d: dict) -> str:
    return json.dumps(d, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class TrainingLimits:
    """Per-tenant training limits (the server-wide defaults live in the server's settings); 0 = unlimited."""

    max_active_jobs: int = 1  # queued + running jobs of one tenant
    max_dataset_bytes: int = 64 * 2**20  # total bytes of a tenant's stored datasets
    max_job_s: float = 3600.0  # wall time of one job; then its runner fails it with job_timeout
    max_datasets: int = 20

    def __post_init__(self) -> None:
        for name in ("max_active_jobs", "max_dataset_bytes", "max_datasets"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"training limit {name} must be an int >= 0 (0 = unlimited), got {value!r}")
        value = self.max_job_s
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"training limit max_job_s must be a number >= 0 (0 = unlimited), got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingLimits:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def check_datasets(self, tenant: str, count: int, nbytes: int) -> None:
        """Raise ``QuotaExceededError`` if the tenant's datasets *after* an upload would exceed these limits."""
        if self.max_datasets and count > self.max_datasets:
            raise QuotaExceededError(
                f"tenant {tenant!r} may store at most {self.max_datasets} datasets; delete one first",
                code="quota_datasets",
            )
        if self.max_dataset_bytes and nbytes > self.max_dataset_bytes:
            raise QuotaExceededError(
                f"tenant {tenant!r} would store {nbytes} dataset bytes; its limit is {self.max_dataset_bytes}",
                code="quota_dataset_bytes",
            )

    def check_jobs(self, tenant: str, active: int) -> None:
        """Raise ``RateLimitedError`` if the tenant already has ``max_active_jobs`` active jobs."""
        if self.max_active_jobs and active >= self.max_active_jobs:
            raise RateLimitedError(
                f"tenant {tenant!r} already has {active} queued or running training jobs (limit "
                f"{self.max_active_jobs}); retry when one has finished",
                code="too_many_jobs",
                retry_after=JOB_SLOT_RETRY_AFTER_S,
            )


@dataclass(frozen=True)
class DatasetInfo:
    """A stored dataset's record; ``name`` is the client's file name (or "")."""

    tenant: str
    dataset_id: str
    format: str
    size: int
    sha256: str
    name: str
    created: float

    def to_json(self) -> str:
        return _dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> DatasetInfo:
        d = json.loads(text)
        return cls(
            d["tenant"],
            d["dataset_id"],
            d["format"],
            int(d["size"]),
            d["sha256"],
            d.get("name", ""),
            float(d.get("created", 0.0)),
        )

    def matches(self, data: bytes) -> bool:
        """Whether ``data`` is the blob this record describes (size and sha256)."""
        return len(data) == self.size and hashlib.sha256(data).hexdigest() == self.sha256


@dataclass(frozen=True)
class EpochRecord:
    epoch: int
    train_loss: float
    epoch_time_s: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_macro_f1: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochRecord:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable ``code`` and a human ``message`` (never internal text or a traceback)."""

    code: str
    message: str


@dataclass(frozen=True)
class JobRecord:
    tenant: str
    job_id: str
    state: str
    prefix_id: str  # the prefix id the result is published to
    dataset_id: str
    options: dict  # the validated training options (a JSON object; the service owns its schema)
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    epoch: int = 0  # epochs done
    epochs: int = 0  # epochs planned
    history: tuple[EpochRecord, ...] = ()
    cancel_requested: bool = False
    runner: str | None = None  # the name of the Ray actor running it (for liveness checks)
    error: JobError | None = None
    result: dict | None = None  # the service's outcome (published version, baseline, decision...)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def to_json(self) -> str:
        return _dumps(asdict(self))  # history -> list of dicts, error -> dict

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        d = json.loads(text)
        error = d.get("error")
        return cls(
            tenant=d["tenant"],
            job_id=d["job_id"],
            state=d["state"],
            prefix_id=d["prefix_id"],
            dataset_id=d["dataset_id"],
            options=d.get("options") or {},
            created=float(d["created"]),
            updated=float(d.get("updated", d["created"])),
            started=d.get("started"),
            finished=d.get("finished"),
            epoch=int(d.get("epoch", 0)),
            epochs=int(d.get("epochs", 0)),
            history=tuple(EpochRecord.from_dict(e) for e in d.get("history") or ()),
            cancel_requested=bool(d.get("cancel_requested", False)),
            runner=d.get("runner"),
            error=JobError(error["code"], error["message"]) if error else None,
            result=d.get("result"),
        )


# helpers both backends call, so that their checks, messages and transitions are the same code


def dataset_not_found(dataset_id: str) -> NotFoundError:
    return NotFoundError(f"dataset {dataset_id!r} not found")


def job_not_found(job_id: str) -> NotFoundError:
    return NotFoundError(f"training job {job_id!r} not found")


def dataset_in_use(dataset_id: str, job_id: str) -> ConflictError:
    return ConflictError(
        f"dataset {dataset_id!r} is used by training job {job_id!r}; delete it once the job has finished",
        code="dataset_in_use",
    )


def check_dataset_args(data: object, fmt: object, name: object) -> bytes:
    """The upload's bytes, after checking its format and name (400 ``BadRequestError`` otherwise)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BadRequestError("dataset data must be bytes", code="bad_dataset")
    if not data:
        raise BadRequestError("the dataset is empty", code="bad_dataset")
    if fmt not in DATASET_FORMATS:
        raise BadRequestError(
            f"dataset format {str(fmt)[:20]!r} is unknown: use one of {', '.join(DATASET_FORMATS)}",
            code="bad_dataset_format",
        )
    if not isinstance(name, str) or len(name) > MAX_DATASET_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise BadRequestError(
            f"dataset name must be at most {MAX_DATASET_NAME} printable characters", code="bad_dataset_name"
        )
    return bytes(data)


def check_job_args(options: object, epochs: object) -> dict:
    """``options`` as a plain JSON object (tuples become lists), after checking it and ``epochs``."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise BadRequestError(f"epochs must be an int >= 0, got {epochs!r}", code="bad_options")
    try:
        plain = json.loads(json.dumps(options))
    except (TypeError, ValueError):
        plain = None
    if not isinstance(plain, dict):
        raise BadRequestError("training options must be a JSON object", code="bad_options")
    return plain


def check_list_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise BadRequestError(f"limit must be an int >= 1, got {limit!r}", code="bad_limit")
    return limit


def check_limits_arg(limits: object) -> TrainingLimits:
    if not isinstance(limits, TrainingLimits):
        raise BadRequestError(f"limits must be TrainingLimits, got {type(limits).__name__}", code="bad_limits")
    return limits


def new_job(
    tenant: str, job_id: str, prefix_id: str, dataset_id: str, options: dict, epochs: int, now: float
) -> JobRecord:
    return JobRecord(tenant, job_id, "queued", prefix_id, dataset_id, options, now, now, epochs=epochs)


def _optional_time(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"job field {name} must be a time (float) or None, got {value!r}")
    return float(value)


def _normalise(name: str, value: Any) -> Any:
    """One ``update_job`` change, checked and in its record type (dicts are accepted for the nested ones)."""
    if name == "state":
        if value not in JOB_STATES:
            raise ValueError(f"job state must be one of {JOB_STATES}, got {value!r}")
        return value
    if name in ("started", "finished"):
        return _optional_time(name, value)
    if name in ("epoch", "epochs"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"job field {name} must be an int >= 0, got {value!r}")
        return value
    if name == "history":
        return tuple(e if isinstance(e, EpochRecord) else EpochRecord.from_dict(e) for e in value)
    if name == "runner":
        if value is not None and not isinstance(value, str):
            raise ValueError(f"job runner must be a str or None, got {value!r}")
        return value
    if name == "error":
        if isinstance(value, dict):
            value = JobError(str(value["code"]), str(value["message"]))
        if value is not None and not isinstance(value, JobError):
            raise ValueError(f"job error must be a JobError or None, got {value!r}")
        return value
    # result: None or a JSON object (normalised as the stored record will read back)
    if value is not None:
        value = json.loads(json.dumps(value))
        if not isinstance(value, dict):
            raise ValueError("job result must be a JSON object or None")
    return value


def check_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """``update_job``'s changes checked before the store is touched (``ValueError``: a caller's bug)."""
    unknown = set(changes) - UPDATABLE
    if unknown:
        raise ValueError(f"update_job cannot change {sorted(unknown)}; it may change {sorted(UPDATABLE)}")
    return {name: _normalise(name, value) for name, value in changes.items()}


def apply_update(rec: JobRecord, changes: dict[str, Any], now: float) -> JobRecord | None:
    """The record after ``changes`` (from :func:`check_changes`), or None: a terminal record never changes."""
    if rec.state in TERMINAL:
        return None
    new = replace(rec, **changes, updated=now)
    if new.state in TERMINAL and "finished" not in changes:
        new = replace(new, finished=now)
    if new.state == "running" and new.started is None:
        new = replace(new, started=now)
    return new


def apply_cancel(rec: JobRecord, now: float) -> JobRecord | None:
    """``request_cancel``: a queued job is cancelled at once, a running one flagged; None for a terminal one."""
    if rec.state in TERMINAL:
        return None
    if rec.state == "queued":
        return replace(rec, state="cancelled", cancel_requested=True, updated=now, finished=now)
    return replace(rec, cancel_requested=True, updated=now)


def newest_first(records: list[Any]) -> list[Any]:
    """Datasets or jobs by ``created``, newest first (the id breaks ties, so the order is stable)."""
    key_of = "job_id" if records and isinstance(records[0], JobRecord) else "dataset_id"
    return sorted(records, key=lambda r: (r.created, getattr(r, key_of)), reverse=True)


@runtime_checkable
class TrainingStore(Protocol):
    """What the training service needs from the store; ``FileStore`` and ``RedisStore`` implement it.

    Every method takes the tenant first. ``limits`` are the tenant's (the server's defaults or its own).
    ``active_jobs`` lists every tenant's queued and running jobs, oldest first: a service that
    restarted finds the jobs it must resume or fail.
    """

    def put_dataset(
        self, tenant: str, data: bytes, *, fmt: str, name: str = "", limits: TrainingLimits
    ) -> DatasetInfo: ...
    def dataset_info(self, tenant: str, dataset_id: str) -> DatasetInfo: ...
    def get_dataset(self, tenant: str, dataset_id: str) -> tuple[DatasetInfo, bytes]: ...
    def list_datasets(self, tenant: str) -> list[DatasetInfo]: ...
    def delete_dataset(self, tenant: str, dataset_id: str) -> None: ...
    def create_job(
        self, tenant: str, *, prefix_id: str, dataset_id: str, options: dict, epochs: int, limits: TrainingLimits
    ) -> JobRecord: ...
    def get_job(self, tenant: str, job_id: str) -> JobRecord: ...
    def list_jobs(self, tenant: str, *, limit: int = 100) -> list[JobRecord]: ...
    def update_job(self, tenant: str, job_id: str, **changes: Any) -> JobRecord: ...
    def request_cancel(self, tenant: str, job_id: str) -> JobRecord: ...
    def active_jobs(self) -> list[JobRecord]: ...

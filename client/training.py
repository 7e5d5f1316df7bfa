"""The client's side of training as a service: datasets, training jobs, and their event stream.

:class:`TrainingMethods` (sync) and :class:`AsyncTrainingMethods` are mixed into :class:`~.http.Client` and
:class:`~.http.AsyncClient`; the operations are written once (:class:`TrainingOps`, generators of
:class:`~.core.Call` like :mod:`.ops`), and so is the server-sent-event parsing (:class:`EventParser`).

Decisions:
* A job's data is a stored dataset (``dataset_id``) or a local file / text sent inline (``data``); a file's
  format comes from its extension unless ``format`` is given (``.tsv``/``.txt`` TSV, ``.csv``, ``.jsonl``/``.json``).
* Uploads and submissions are not idempotent: never retried after a 4xx or once the request may have
  reached the server (``too_many_jobs`` is a 429 the caller sees at once).
* ``watch_training`` follows ``GET /v1/training-jobs/{id}/events`` and yields every new record until a
  terminal one (:class:`Watch`). A dropped stream is reopened, waiting as the retry policy says and giving up
  after ``max_retries`` reopenings without a new record: the server sends the current record first, so a
  reopening loses no state (the history holds every epoch).
"""

from __future__ import annotations

import builtins
import json
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import httpx

from prefixserve.adapters.errors import BadRequestError, PrefixServeError

from .core import Call, json_body, outcome
from .models import _build, _known, bad_response

if TYPE_CHECKING:
    from .core import RetryPolicy

T = TypeVar("T")
Op = Generator[Call, httpx.Response, T]
TERMINAL = ("succeeded", "failed", "cancelled")
_FORMATS = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


def _seg(value: str) -> str:
    return quote(value, safe="")


# ---- results ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """A stored dataset; ``rows``, ``bad_rows`` and ``labels`` only in the answer to an upload."""

    dataset_id: str
    format: str
    name: str
    bytes: int
    sha256: str
    created: float = 0.0
    rows: int | None = None
    bad_rows: dict[str, int] | None = None
    labels: tuple[str, ...] | None = None

    @classmethod
    def from_json(cls, data: Any) -> Dataset:
        values = _known(cls, data)
        if values.get("labels") is not None:
            values["labels"] = tuple(values["labels"])
        return _build(cls, values)


@dataclass(frozen=True)
class EpochProgress:
    epoch: int
    train_loss: float
    epoch_time_s: float
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_macro_f1: float | None = None

    @classmethod
    def from_json(cls, data: Any) -> EpochProgress:
        return _build(cls, _known(cls, data))


@dataclass(frozen=True)
class TrainingJob:
    """A training job's record: state, progress per epoch, and (when finished) its error or result."""

    job_id: str
    state: str
    prefix_id: str
    dataset_id: str
    options: dict[str, Any]
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    epoch: int = 0
    epochs: int = 0
    history: tuple[EpochProgress, ...] = ()
    cancel_requested: bool = False
    error: dict[str, str] | None = None  # {"code", "message"}
    result: dict[str, Any] | None = None  # published, version, decision, reason, new, baseline, ...

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    @property
    def published_version(self) -> int | None:
        """The adapter version the job published, if it did."""
        return self.result.get("version") if self.result and self.result.get("published") else None

    @classmethod
    def from_json(cls, data: Any) -> TrainingJob:
        values = _known(cls, data)
        values["history"] = tuple(EpochProgress.from_json(e) for e in values.get("history") or ())
        return _build(cls, values)


class EventParser:
    """Server-sent events line by line: ``feed`` returns ``(event, data)`` at each blank line that ends one."""

    def __init__(self) -> None:
        self.event: str = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            event, data = self.event, "\n".join(self.data)
            self.event, self.data = "message", []
            return (event, data) if data else None
        if line.startswith(":"):  # a comment: the server's keep-alive
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


def job_of_event(event: str, data: str) -> TrainingJob | None:
    """The record an ``event: job`` carries; an ``event: error`` raises the server's error."""
    try:
        payload = json.loads(data)
    except ValueError:
        raise bad_response(f"training job event is not JSON: {data[:80]!r}") from None
    if event == "error":
        raise PrefixServeError.from_dict(payload)
    return TrainingJob.from_json(payload) if event == "job" else None


# ---- operations ---------------------------------------------------------------------------------------
def _read(source: str | Path | bytes, fmt: str | None) -> tuple[bytes, str, str]:
    """(bytes, format, name) of a dataset given as a path or as bytes."""
    if isinstance(source, bytes | bytearray):
        return bytes(source), fmt or "tsv", ""
    path = Path(source)
    return path.read_bytes(), fmt or _FORMATS.get(path.suffix.lower(), "tsv"), path.name


class TrainingOps:
    """The training calls, each written once (see :mod:`.ops`)."""

    @staticmethod
    def upload_dataset(
        source: str | Path | bytes,
        fmt: str | None,
        name: str | None,
        text_column: str | None,
        label_column: str | None,
    ) -> Op[Dataset]:
        data, fmt, shown = _read(source, fmt)
        params = {"format": fmt, "name": shown if name is None else name}
        params.update({k: v for k, v in (("text_column", text_column), ("label_column", label_column)) if v})
        r = yield Call("POST", "/v1/datasets", content=data, params=params, idempotent=False)
        return Dataset.from_json(json_body(r))

    @staticmethod
    def list_datasets() -> Op[builtins.list[Dataset]]:
        body = json_body((yield Call("GET", "/v1/datasets")))
        return [Dataset.from_json(d) for d in (body.get("datasets", []) if isinstance(body, dict) else [])]

    @staticmethod
    def delete_dataset(dataset_id: str) -> Op[None]:
        yield Call("DELETE", f"/v1/datasets/{_seg(dataset_id)}")

    @staticmethod
    def submit(
        prefix_id: str, dataset_id: str | None, data: str | Path | bytes | None, fmt: str | None, options: dict
    ) -> Op[TrainingJob]:
        if (dataset_id is None) == (data is None):
            raise BadRequestError("give exactly one of dataset_id and data", code="bad_args")
        body: dict[str, Any] = {"prefix_id": prefix_id, **{k: v for k, v in options.items() if v is not None}}
        if data is not None:
            raw, fmt, name = _read(data, fmt)
            try:
                content = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(f"{name or 'the data'} is not UTF-8 text", code="bad_dataset") from None
            body["dataset"] = {"format": fmt, "content": content, "name": name}
        else:
            body["dataset_id"] = dataset_id
        r = yield Call("POST", "/v1/training-jobs", json=body, idempotent=False)
        return TrainingJob.from_json(json_body(r))

    @staticmethod
    def job(job_id: str) -> Op[TrainingJob]:
        return TrainingJob.from_json(json_body((yield Call("GET", f"/v1/training-jobs/{_seg(job_id)}"))))

    @staticmethod
    def list_jobs() -> Op[builtins.list[TrainingJob]]:
        body = json_body((yield Call("GET", "/v1/training-jobs")))
        return [TrainingJob.from_json(j) for j in (body.get("jobs", []) if isinstance(body, dict) else [])]

    @staticmethod
    def cancel(job_id: str) -> Op[TrainingJob]:
        # asking twice leaves the same state: safe to retry
        return TrainingJob.from_json(json_body((yield Call("DELETE", f"/v1/training-jobs/{_seg(job_id)}"))))


class Watch:
    """One ``watch_training``: which records to yield, and how long to wait before reopening the stream."""

    def __init__(self, job_id: str, policy: RetryPolicy, base_url: str):
        self.call = Call("GET", f"/v1/training-jobs/{_seg(job_id)}/events")
        self.policy, self.base_url = policy, base_url
        self.attempt = 0  # reopenings since the last new record
        self.last: tuple[Any, ...] | None = None

    def new(self, line: str, parser: EventParser) -> TrainingJob | None:
        """The record a line completes, unless it repeats the last one (a reopened stream starts with it)."""
        event = parser.feed(line)
        job = job_of_event(*event) if event else None
        if job is None or (job.updated, job.state, job.epoch) == self.last:
            return None
        self.last, self.attempt = (job.updated, job.state, job.epoch), 0
        return job

    def refused(self, response: httpx.Response) -> float:
        """An error status: raise it, or the wait before trying again (503, 429)."""
        return self._next(response, None)

    def dropped(self, exc: Exception | None = None) -> float:
        """The stream broke, or ended before a terminal record: the wait before reopening (or raise)."""
        return self._next(None, exc or httpx.ReadError("the event stream ended before the job finished"))

    def _next(self, response: httpx.Response | None, exc: Exception | None) -> float:
        wait = outcome(self.policy, self.call, self.attempt, self.base_url, response, exc) or 0.0
        self.attempt += 1
        return wait


# ---- the mixins ---------------------------------------------------------------------------------------
class TrainingMethods:
    """``Client``'s training methods (a tenant key)."""

    if TYPE_CHECKING:
        base_url: str
        retry: RetryPolicy
        _http: httpx.Client

        def _run(self, op: Op[T]) -> T: ...

    def upload_dataset(
        self,
        source: str | Path | bytes,
        *,
        format: str | None = None,
        name: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> Dataset:
        """Store a dataset (a file, or bytes) for training jobs; the answer counts usable and bad rows."""
        return self._run(TrainingOps.upload_dataset(source, format, name, text_column, label_column))

    def list_datasets(self) -> builtins.list[Dataset]:
        return self._run(TrainingOps.list_datasets())

    def delete_dataset(self, dataset_id: str) -> None:
        return self._run(TrainingOps.delete_dataset(dataset_id))

    def submit_training(
        self,
        prefix_id: str,
        *,
        dataset_id: str | None = None,
        data: str | Path | bytes | None = None,
        format: str | None = None,
        **options: Any,
    ) -> TrainingJob:
        """Start a job training an adapter for ``prefix_id`` on a stored dataset or on ``data`` (a file or
        bytes, sent inline). ``options``: kind, num_virtual_tokens, lora_r, epochs, lr, head_lr, batch_size,
        max_length, eval_split, seed, patience, label_names, text_column, label_column, force."""
        return self._run(TrainingOps.submit(prefix_id, dataset_id, data, format, options))

    def training_job(self, job_id: str) -> TrainingJob:
        return self._run(TrainingOps.job(job_id))

    def list_training_jobs(self) -> builtins.list[TrainingJob]:
        return self._run(TrainingOps.list_jobs())

    def cancel_training(self, job_id: str) -> TrainingJob:
        """Cancel a job (a queued one at once, a running one within about a second)."""
        return self._run(TrainingOps.cancel(job_id))

    def watch_training(self, job_id: str) -> Iterator[TrainingJob]:
        """The job's record now and after every change, until it is finished (the last one yielded)."""
        import time

        watch = Watch(job_id, self.retry, self.base_url)
        while True:
            try:
                with self._http.stream("GET", watch.call.path, headers={"Accept": "text/event-stream"}) as r:
                    if r.status_code >= 400:
                        r.read()
                        wait = watch.refused(r)
                    else:
                        parser = EventParser()
                        for line in r.iter_lines():
                            if (job := watch.new(line, parser)) is not None:
                                yield job
                                if job.done:
                                    return
                        wait = watch.dropped()
            except httpx.TransportError as exc:
                wait = watch.dropped(exc)
            time.sleep(wait)


class AsyncTrainingMethods:
    """``AsyncClient``'s training methods: :class:`TrainingMethods`, awaitable."""

    if TYPE_CHECKING:
        base_url: str
        retry: RetryPolicy
        _http: httpx.AsyncClient

        async def _run(self, op: Op[T]) -> T: ...

    async def upload_dataset(
        self,
        source: str | Path | bytes,
        *,
        format: str | None = None,
        name: str | None = None,
        text_column: str | None = None,
        label_column: str | None = None,
    ) -> Dataset:
        return await self._run(TrainingOps.upload_dataset(source, format, name, text_column, label_column))

    async def list_datasets(self) -> builtins.list[Dataset]:
        return await self._run(TrainingOps.list_datasets())

    async def delete_dataset(self, dataset_id: str) -> None:
        return await self._run(TrainingOps.delete_dataset(dataset_id))

    async def submit_training(
        self,
        prefix_id: str,
        *,
        dataset_id: str | None = None,
        data: str | Path | bytes | None = None,
        format: str | None = None,
        **options: Any,
    ) -> TrainingJob:
        return await self._run(TrainingOps.submit(prefix_id, dataset_id, data, format, options))

    async def training_job(self, job_id: str) -> TrainingJob:
        return await self._run(TrainingOps.job(job_id))

    async def list_training_jobs(self) -> builtins.list[TrainingJob]:
        return await self._run(TrainingOps.list_jobs())

    async def cancel_training(self, job_id: str) -> TrainingJob:
        return await self._run(TrainingOps.cancel(job_id))

    async def watch_training(self, job_id: str) -> AsyncIterator[TrainingJob]:
        import asyncio

        watch = Watch(job_id, self.retry, self.base_url)
        while True:
            try:
                async with self._http.stream("GET", watch.call.path, headers={"Accept": "text/event-stream"}) as r:
                    if r.status_code >= 400:
                        await r.aread()
                        wait = watch.refused(r)
                    else:
                        parser = EventParser()
                        async for line in r.aiter_lines():
                            if (job := watch.new(line, parser)) is not None:
                                yield job
                                if job.done:
                                    return
                        wait = watch.dropped()
            except httpx.TransportError as exc:
                wait = watch.dropped(exc)
            await asyncio.sleep(wait)

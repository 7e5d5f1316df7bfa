"""Training as a service: the HTTP routes for datasets and training jobs (:class:`TrainingRoutes`, an Ingress mixin).

Routes (a tenant key; an admin key gets 403 as on every tenant route; another tenant's ids are 404):

* ``POST /v1/datasets?format=tsv|csv|jsonl&name=...`` (raw body): parsed with the trainer's readers before it
  is stored; no usable row is a 400 ``empty_dataset`` naming the bad rows by reason. 201 with the counts.
* ``GET /v1/datasets``, ``DELETE /v1/datasets/{id}`` (409 ``dataset_in_use`` while an active job uses it).
* ``POST /v1/training-jobs`` (:class:`~.training_schemas.JobCreate`): the data is parsed with the job's own
  options first (same split, same labels: a bad dataset fails here, 400, and nothing is stored); inline data
  is then stored as a dataset of the tenant (listed, counted by the dataset limits, deleted by the tenant);
  the record is created ``queued`` (429 ``too_many_jobs`` over ``max_active_jobs``) and its runner launched
  (:mod:`.training_runner`). 202 with the record.
* ``GET /v1/training-jobs``, ``GET /v1/training-jobs/{id}``; ``GET /v1/training-jobs/{id}/events``: server-sent
  events, one ``event: job`` with the record's JSON at the start and on every change, a ``: keep-alive``
  comment every :data:`KEEPALIVE_S` seconds, closed after a terminal state; ``DELETE /v1/training-jobs/{id}``
  cancels (202 with the record: a queued job is ``cancelled`` at once, a running one within a second or so).
* ``GET/PUT /v1/tenants/{tenant}/training-limits`` (the admin key; 404 for an unknown tenant): a tenant's own
  :class:`~prefixserve.adapters.store.TrainingLimits` (:class:`~.schemas.TrainingLimitsIn`; ``{"default": true}``
  clears them), stored in its tenant record. They answer whether training is on or off (configure first).

Decisions:
* ``ingress.py`` keeps no training code: the Ingress app includes :data:`router`, and the ``Ingress`` class
  inherits :class:`TrainingRoutes` (its state and helpers). The routes are module functions that get the
  replica's Ingress object as a dependency (:data:`Replica`), not methods: Serve's class-based view rewrites
  a method route's signature on the function object, and that rewrite does not travel with a function of an
  importable module (pickled by reference) into the replica.
* ``training.enabled = false``: every route answers 404 ``training_disabled`` (retrying cannot help: not 503).
* Liveness: a read of an active job whose runner actor no longer exists marks it failed (``runner_lost``).
  To never race a job being launched, a record counts as orphaned only :data:`RUNNER_GRACE_S` after its
  last write (a record without a runner name: after its creation). The launching replica also notices
  its runner's exit at once, and counts every job's final state in ``prefixserve_training_jobs_total``.
* Jobs and datasets live in the store, runners on the cluster: a restarted or redeployed app sees them all.
* Limits: a tenant's own training limits, else the server's ``training.limits``, for the dataset limits, the
  active-job limit and the runner's ``max_job_s`` (taken when the job is launched). A replica re-reads them every
  :data:`LIMITS_TTL_S` (a PUT on this replica applies at once, on the others within that time).
"""
# (no `from __future__ import annotations`: Serve re-binds the route methods and FastAPI must see real
# annotation objects, as in ingress.py)

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prefixserve.adapters.errors import PrefixServeError, as_error
from prefixserve.adapters.store import JobError, JobRecord, Store, TrainingLimits, TrainingStore

from . import state
from .schemas import AppSettings, TrainingLimitsIn, TrainingLimitsOut
from .training_data import check_job_data, check_upload
from .training_runner import RunnerSpec, launch, runner_alive, runner_name, thread_count
from .training_schemas import (
    AUTO_GPU_FRACTION,
    DatasetFormat,
    DatasetList,
    DatasetOut,
    DatasetUploaded,
    JobCreate,
    JobList,
    JobOut,
)

if TYPE_CHECKING:
    from .protocol import WorkerInfo

log = logging.getLogger("prefixserve.training")
router = APIRouter(tags=["training"])
RUNNER_GRACE_S = 10.0  # a record untouched this long whose runner actor is gone is failed as runner_lost
EVENTS_POLL_S = 0.5  # how often the event stream reads the record
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream
LIMITS_TTL_S = 2.0  # how long a replica uses a tenant's training limits before re-reading them
RUNNER_LOST = JobError("runner_lost", "the job's runner stopped unexpectedly (its process or node died); submit again")
DATASET_BODY = {
    "requestBody": {
        "required": True,
        "description": "The file as it is: NSMC TSV (id, document, label), CSV or JSONL with a header / keys.\n\n"
        '    curl -X POST -H "Authorization: Bearer $KEY" --data-binary @train.tsv \\\n'
        '         "http://127.0.0.1:8000/v1/datasets?format=tsv&name=train.tsv"',
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("application/octet-stream", "text/tab-separated-values", "text/csv", "application/x-ndjson")
        },
    }
}


def disabled() -> PrefixServeError:
    return PrefixServeError(
        "training jobs are turned off on this server (setting training.enabled)", code="training_disabled", status=404
    )


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def stop_runner(name: str) -> None:
    """Kill a cancelled queued job's runner (it may wait for cluster resources; it would only exit anyway)."""
    import ray

    from .training_runner import NAMESPACE

    with contextlib.suppress(ValueError):  # gone already
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)


def sse(event: str, data: str) -> str:
    """One server-sent event (``data`` is one line of JSON)."""
    return f"event: {event}\ndata: {data}\n\n"


class TrainingRoutes:
    """The training routes; ``Ingress`` inherits them (and calls :meth:`_init_training`)."""

    settings: "AppSettings"
    store: Store  # the Ingress's (both protocols: adapters and training)

    if TYPE_CHECKING:  # the Ingress's own

        async def _tenant(self, request: Request) -> str: ...
        def _admin(self, request: Request) -> None: ...
        async def worker_info(self) -> WorkerInfo: ...
        def _upload_slot(self, tenant: str) -> contextlib.AbstractContextManager[None]: ...

    def _init_training(self) -> None:
        self._runs: set[asyncio.Future[None]] = set()  # runs this replica launched (to count their final state)
        self._training_limits: dict[str, tuple[float, TrainingLimits]] = {}  # tenant -> (read at, limits)

    # ---- helpers ----------------------------------------------------------------------------------
    @property
    def jobs(self) -> TrainingStore:
        return self.store

    async def training_tenant(self, request: Request) -> str:
        tenant = await self._tenant(request)  # 401/403 first: strangers do not learn whether training is on
        if not self.settings.training.enabled:
            raise disabled()
        return tenant

    async def training_limits(self, tenant: str) -> TrainingLimits:
        """The tenant's own training limits or the server's ``training.limits``; re-read every LIMITS_TTL_S."""
        now = time.monotonic()
        cached = self._training_limits.get(tenant)
        if cached is None or now - cached[0] > LIMITS_TTL_S:
            info = await asyncio.to_thread(self.store.tenant_info, tenant)
            cached = (now, info.training_limits or self.settings.training.limits)
            self._training_limits[tenant] = cached
        return cached[1]

    async def checked(self, record: JobRecord) -> JobRecord:
        """``record``, or the same job failed as ``runner_lost`` when it is active and its runner is gone."""
        if not record.active:
            return record
        quiet = time.time() - (record.updated if record.runner else record.created)
        if quiet <= RUNNER_GRACE_S or (record.runner and await asyncio.to_thread(runner_alive, record.runner)):
            return record
        log.warning("job %s of %s: runner %s is gone; failing it", record.job_id, record.tenant, record.runner)
        return await asyncio.to_thread(
            self.jobs.update_job, record.tenant, record.job_id, state="failed", error=RUNNER_LOST
        )

    async def job(self, tenant: str, job_id: str) -> JobRecord:
        return await self.checked(await asyncio.to_thread(self.jobs.get_job, tenant, job_id))

    async def launch_job(self, record: JobRecord, fingerprint: str) -> JobRecord:
        """Start the job's runner actor; a cluster that cannot take it fails the job (``runner_unavailable``)."""
        t = self.settings.training
        try:
            gpus = (
                t.num_gpus if t.num_gpus is not None else AUTO_GPU_FRACTION * await asyncio.to_thread(cluster_has_gpus)
            )
            spec = RunnerSpec(
                store=self.settings.store,
                tenant=record.tenant,
                job_id=record.job_id,
                backbone=self.settings.backbone,
                fingerprint=fingerprint,
                device="cuda" if gpus > 0 else "cpu",
                torch_threads=thread_count(t.num_cpus, t.torch_threads),
                max_job_s=(await self.training_limits(record.tenant)).max_job_s,
            )
            ref = await asyncio.to_thread(launch, spec, num_cpus=t.num_cpus, num_gpus=gpus)
        except Exception as exc:
            as_error(exc, log)  # logged with an incident id
            error = JobError("runner_unavailable", "the cluster could not start this job's runner; submit it again")
            failed = await asyncio.to_thread(
                self.jobs.update_job, record.tenant, record.job_id, state="failed", error=error
            )
            state.metrics().training_jobs.labels(failed.state).inc()
            return failed
        run = asyncio.ensure_future(self._when_done(record, ref))
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)
        name = runner_name(record.job_id)
        return await asyncio.to_thread(self.jobs.update_job, record.tenant, record.job_id, runner=name)

    async def _when_done(self, record: JobRecord, ref: Any) -> None:
        """After the runner exits: a job it left active is ``runner_lost``; count the final state."""
        with contextlib.suppress(Exception):
            await ref  # the actor exits at the end of run(): its caller sees that exit, never a value
        try:
            done = await asyncio.to_thread(self.jobs.get_job, record.tenant, record.job_id)
            if done.active and not await asyncio.to_thread(runner_alive, runner_name(record.job_id)):
                done = await asyncio.to_thread(
                    self.jobs.update_job, record.tenant, record.job_id, state="failed", error=RUNNER_LOST
                )
        except PrefixServeError:  # the tenant was deleted meanwhile, or the store is down: nothing to count
            return
        if not done.active:
            state.metrics().training_jobs.labels(done.state).inc()

    async def events(self, record: JobRecord) -> AsyncIterator[str]:
        last, sent_at = "", time.monotonic()
        while True:
            shown = JobOut.of(record).model_dump_json()
            if shown != last:
                last, sent_at = shown, time.monotonic()
                yield sse("job", shown)
            elif time.monotonic() - sent_at >= KEEPALIVE_S:
                sent_at = time.monotonic()
                yield ": keep-alive\n\n"
            if not record.active:
                return
            await asyncio.sleep(EVENTS_POLL_S)
            try:
                record = await self.job(record.tenant, record.job_id)
            except Exception as exc:  # the store went away, or the tenant was deleted: say so, then end
                yield sse("error", json.dumps(as_error(exc, log).to_dict()))
                return


def replica() -> TrainingRoutes:
    """The Ingress object serving this request (what Serve's class-based view injects as ``self``)."""
    from ray import serve

    return cast(TrainingRoutes, serve.get_replica_context().servable_object)


Replica = Annotated[TrainingRoutes, Depends(replica)]


# ---- datasets ---------------------------------------------------------------------------------
@router.post("/v1/datasets", status_code=201, response_model=DatasetUploaded, openapi_extra=DATASET_BODY)
async def upload_dataset(
    svc: Replica,
    request: Request,
    format: Annotated[DatasetFormat | None, Query(description="unset: from name's extension, else tsv")] = None,
    name: Annotated[str, Query(max_length=200, description="the file's name, for you")] = "",
    text_column: Annotated[str | None, Query(description="CSV/JSONL; unset: document | text | sentence")] = None,
    label_column: Annotated[str | None, Query(description="CSV/JSONL; unset: label | category")] = None,
) -> DatasetUploaded:
    """Store a labelled dataset (parsed first: bad rows are counted, no usable row is a 400)."""
    from prefixserve.trainer.data import detect_format

    tenant = await svc.training_tenant(request)
    fmt = format or detect_format(name or "dataset.tsv")
    with svc._upload_slot(tenant):
        data = await request.body()  # capped by the Gate at training.max_upload_bytes
    shown = f"dataset {name!r}" if name else "the dataset"
    found = await asyncio.to_thread(check_upload, data, fmt, shown, text_column=text_column, label_column=label_column)
    limits = await svc.training_limits(tenant)
    info = await asyncio.to_thread(svc.jobs.put_dataset, tenant, data, fmt=fmt, name=name, limits=limits)
    return DatasetUploaded(**DatasetOut.of(info).model_dump(), rows=found.rows, bad_rows=found.bad, labels=found.labels)


@router.get("/v1/datasets", response_model=DatasetList)
async def list_datasets(svc: Replica, request: Request) -> DatasetList:
    tenant = await svc.training_tenant(request)
    infos = await asyncio.to_thread(svc.jobs.list_datasets, tenant)
    return DatasetList(datasets=[DatasetOut.of(i) for i in infos])


@router.delete("/v1/datasets/{dataset_id}", status_code=204)
async def delete_dataset(svc: Replica, dataset_id: str, request: Request) -> Response:
    tenant = await svc.training_tenant(request)
    await asyncio.to_thread(svc.jobs.delete_dataset, tenant, dataset_id)
    return Response(status_code=204)


# ---- jobs -------------------------------------------------------------------------------------
@router.post(
    "/v1/training-jobs",
    status_code=202,
    response_model=JobOut,
    responses={202: {"model": JobOut, "description": "queued; its runner is starting"}},
)
async def submit_training(svc: Replica, body: JobCreate, request: Request) -> JSONResponse:
    """Train an adapter on a dataset and publish it to ``prefix_id`` if it beats the served version."""
    from prefixserve.adapters.store import check_id

    tenant = await svc.training_tenant(request)
    check_id(body.prefix_id)
    options = body.options()
    info = await svc.worker_info()
    jobs, limits = svc.jobs, await svc.training_limits(tenant)
    fmt: str
    if body.dataset is not None:
        inline = body.dataset
        data, fmt = inline.content.encode("utf-8"), inline.format
        shown = f"dataset {inline.name!r}" if inline.name else "the inline dataset"
    else:
        assert body.dataset_id is not None
        stored, data = await asyncio.to_thread(jobs.get_dataset, tenant, body.dataset_id)
        fmt, shown = stored.format, f"dataset {stored.dataset_id}"
    await asyncio.to_thread(check_job_data, data, fmt, shown, options, svc.settings.backbone)
    if body.dataset is not None:
        stored = await asyncio.to_thread(jobs.put_dataset, tenant, data, fmt=fmt, name=body.dataset.name, limits=limits)
    try:
        record = await asyncio.to_thread(
            jobs.create_job,
            tenant,
            prefix_id=body.prefix_id,
            dataset_id=stored.dataset_id,
            options=options.model_dump(),
            epochs=options.epochs,
            limits=limits,
        )
    except Exception:
        if body.dataset is not None:  # nothing stored for a refused job
            with contextlib.suppress(PrefixServeError):
                await asyncio.to_thread(jobs.delete_dataset, tenant, stored.dataset_id)
        raise
    record = await svc.launch_job(record, info.fingerprint)
    return JSONResponse(JobOut.of(record).model_dump(mode="json"), status_code=202)


@router.get("/v1/training-jobs", response_model=JobList)
async def list_training_jobs(svc: Replica, request: Request) -> JobList:
    """Your jobs, newest first (the last 100)."""
    tenant = await svc.training_tenant(request)
    records = await asyncio.to_thread(svc.jobs.list_jobs, tenant)
    return JobList(jobs=[JobOut.of(await svc.checked(r)) for r in records])


@router.get("/v1/training-jobs/{job_id}", response_model=JobOut)
async def get_training_job(svc: Replica, job_id: str, request: Request) -> JobOut:
    """State, epochs done, per-epoch loss, eval accuracy and macro-F1, and the outcome."""
    tenant = await svc.training_tenant(request)
    return JobOut.of(await svc.job(tenant, job_id))


@router.get(
    "/v1/training-jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "event: job, data: the record"}},
)
async def training_job_events(svc: Replica, job_id: str, request: Request) -> StreamingResponse:
    """Server-sent events: the record at once and on every change; the stream ends after a terminal state."""
    tenant = await svc.training_tenant(request)
    first = await svc.job(tenant, job_id)  # 404 before the stream starts
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(svc.events(first), media_type="text/event-stream", headers=headers)


@router.delete("/v1/training-jobs/{job_id}", status_code=202, response_model=JobOut)
async def cancel_training(svc: Replica, job_id: str, request: Request) -> JSONResponse:
    """Cancel: a queued job at once, a running one within about a second (nothing is published)."""
    tenant = await svc.training_tenant(request)
    record = await asyncio.to_thread(svc.jobs.request_cancel, tenant, job_id)
    if record.state == "cancelled" and record.started is None and record.runner:  # was queued: free its slot
        await asyncio.to_thread(stop_runner, record.runner)
    return JSONResponse(JobOut.of(record).model_dump(mode="json"), status_code=202)


# ---- a tenant's training limits (admin) -------------------------------------------------------
@router.get("/v1/tenants/{tenant}/training-limits", response_model=TrainingLimitsOut, tags=["tenants"])
async def get_training_limits(svc: Replica, tenant: str, request: Request) -> TrainingLimitsOut:
    """The tenant's training limits and whether they are the server's default (``training.limits``)."""
    svc._admin(request)
    info = await asyncio.to_thread(svc.store.tenant_info, tenant)
    return TrainingLimitsOut.of(info.training_limits, svc.settings.training.limits)


@router.put("/v1/tenants/{tenant}/training-limits", response_model=TrainingLimitsOut, tags=["tenants"])
async def set_training_limits(svc: Replica, tenant: str, body: TrainingLimitsIn, request: Request) -> TrainingLimitsOut:
    """Set the tenant's own training limits (``{"default": true}`` goes back to the server's default)."""
    svc._admin(request)
    limits = body.to_limits()
    await asyncio.to_thread(svc.store.set_training_limits, tenant, limits)
    svc._training_limits.pop(tenant, None)  # this replica at once; the others within LIMITS_TTL_S
    return TrainingLimitsOut.of(limits, svc.settings.training.limits)

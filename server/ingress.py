"""The ``Ingress`` deployment: FastAPI routes for auth, validation, limits and routing. No model code.

Flow of ``POST /v1/classify``: body cap (:mod:`.middleware`) -> pydantic -> bearer key -> configured
limits -> ``store.head`` (the served version: the pin, else the newest; or the request's ``version`` if
kept; 404 for a missing or foreign prefix) -> one Worker handle
call with a :class:`ClassifyCall` naming that exact :class:`AdapterRef` -> a typed
:class:`ClassifyReply` -> :class:`ClassifyResponse` naming the version used. Errors: :mod:`.http_errors`.

Decisions:
* Coherence: the Ingress ``head``s the store on every classify (one Redis GET / one small file
  read), so once a PUT, DELETE, rollback or unpin has returned, the very next request on any replica uses the new
  state; Worker caches are keyed by version and cannot serve a superseded one.
* Uploads are validated here against the served backbone (``BackboneSpec`` fetched once from a
  Worker and cached; it never changes while the app runs) by the store's validator, so a rejected
  upload writes nothing and the previous version keeps serving.
* Store calls are blocking clients; they run in worker threads (``asyncio.to_thread``).
"""
# (no `from __future__ import annotations`: Serve re-binds the route methods and FastAPI must see real
# annotation objects, else `request: Request` is read as a query parameter)

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from prefixserve.adapters.errors import (
    ForbiddenError,
    NotFoundError,
    PrefixServeError,
    RateLimitedError,
    StoreUnavailableError,
)
from prefixserve.adapters.format import AdapterMeta
from prefixserve.adapters.ratelimit import RateLimits, open_rate_limiter
from prefixserve.adapters.ref import AdapterRef

from . import compat, docs, http_errors, state, training
from .auth import Authenticator, Principal, resolve_admin_key, resolve_metrics_token
from .inputs import check_texts
from .middleware import Gate
from .protocol import ClassifyCall, ClassifyReply, WorkerInfo
from .schemas import (
    AppSettings,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    LimitsIn,
    LimitsOut,
    PredictionOut,
    PrefixList,
    PrefixMeta,
    RollbackRequest,
    TenantCreate,
    TenantCreated,
    VersionList,
    prefix_meta,
    version_list,
)
from .uploads import OPENAPI_BODY, read_upload

REPLICA_HEADER = "x-prefixserve-replica"
LIMITS_TTL_S = 2.0  # how long an Ingress replica uses a tenant's limits before re-reading them
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 415, 422, 429, 503)
}

# /docs and /redoc load their JS/CSS from the package (no CDN); the schema declares bearer auth
app = docs.offline_app(
    title="prefixserve",
    version="0.1.0",
    responses=_ERRORS,
    redirect_slashes=False,
    description="Multi-tenant prefix/prompt adapter server: one frozen encoder, many tenants' "
    "adapters batched into one forward pass.",
)
http_errors.install(app)
app.add_middleware(Gate)
app.include_router(training.router)  # /v1/datasets, /v1/training-jobs: TrainingRoutes, inherited below


# ---- the deployment (helpers it calls must be importable: Serve pickles it at decoration) ----------
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress(training.TrainingRoutes):
    def __init__(self, worker: Any, settings: AppSettings):
        from prefixserve.adapters.store import open_store

        self.settings = settings
        state.settings = settings
        self.worker = worker  # DeploymentHandle to "Worker"
        self.store = open_store(settings.store, validator=self._validate_upload)
        admin_key, _ = resolve_admin_key(settings.admin_key_file)
        self.auth = Authenticator(self.store, admin_key, resolve_metrics_token())
        state.auth = self.auth  # the Gate middleware authenticates every request before its body is read
        self._info: WorkerInfo | None = None
        self._info_lock = asyncio.Lock()
        self._uploads: dict[str, int] = {}  # uploads in flight per tenant (this replica)
        self.limiter = open_rate_limiter(settings.store)  # Redis store: one budget shared by every replica
        self._limits: dict[str, tuple[float, RateLimits]] = {}  # tenant -> (read at, limits), LIMITS_TTL_S
        self._init_training()
        state.metrics()

    # ---- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _principal(request: Request, *roles: str) -> Principal:
        """The caller the Gate authenticated; 403 when its key is for another role."""
        principal: Principal = request.state.principal
        if principal.role not in roles:
            raise ForbiddenError(f"this route needs {' or '.join(roles)} credentials, not a {principal.role} key")
        return principal

    async def _tenant(self, request: Request) -> str:
        return self._principal(request, "tenant").name

    def _admin(self, request: Request) -> None:
        self._principal(request, "admin")

    async def _tenant_limits(self, tenant: str) -> RateLimits:
        """The tenant's own limits or the server's default; re-read from the store every LIMITS_TTL_S."""
        now = time.monotonic()
        cached = self._limits.get(tenant)
        if cached is None or now - cached[0] > LIMITS_TTL_S:
            info = await asyncio.to_thread(self.store.tenant_info, tenant)
            cached = (now, info.limits or self.settings.default_limits)
            self._limits[tenant] = cached
        return cached[1]

    def _admit(self, tenant: str, limits: RateLimits, rows: int) -> str | None:
        """Blocking: take the request's tokens (429 when over the rate), then a concurrency slot."""
        self.limiter.acquire(tenant, limits, rows=rows)
        return self.limiter.enter(tenant, limits)

    @contextlib.contextmanager
    def _upload_slot(self, tenant: str) -> Iterator[None]:
        """At most ``max_uploads_per_tenant`` uploads of one tenant in flight here (each holds up to the cap)."""
        s = self.settings
        if self._uploads.get(tenant, 0) >= s.max_uploads_per_tenant or sum(self._uploads.values()) >= s.max_uploads:
            raise RateLimitedError("too many uploads in flight; retry shortly", code="too_many_uploads", retry_after=1)
        self._uploads[tenant] = self._uploads.get(tenant, 0) + 1
        try:
            yield
        finally:
            self._uploads[tenant] -= 1
            if not self._uploads[tenant]:
                del self._uploads[tenant]

    async def worker_info(self) -> WorkerInfo:
        """The served backbone's name, fingerprint and spec: asked once, then cached (it cannot change)."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    self._info = await self.worker.info.remote()
        assert self._info is not None
        return self._info

    def _validate_upload(self, data: bytes) -> AdapterMeta:
        """Store validator: full structural check AND fit to the served backbone."""
        from prefixserve.adapters.format import inspect_packed

        if self._info is None:  # put() is only called after worker_info() resolved
            raise StoreUnavailableError("backbone spec not known yet; retry", code="not_ready")
        return inspect_packed(data, expect=self._info.spec)

    # ---- health --------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(self, request: Request) -> Any:
        try:
            await asyncio.wait_for(self.worker.ready.remote(), timeout=5.0)
            info = await asyncio.wait_for(self.worker_info(), timeout=5.0)
        except Exception as exc:
            error = StoreUnavailableError(f"backbone not ready: {type(exc).__name__}", code="not_ready", retry_after=5)
            return http_errors.error_response(request, error)
        try:  # a store that reads but cannot write (read-only, full) is not ready: uploads would fail
            await asyncio.wait_for(asyncio.to_thread(self.store.check_writable), timeout=5.0)
        except Exception as exc:
            error = StoreUnavailableError(f"store not writable: {type(exc).__name__}", retry_after=5)
            return http_errors.error_response(request, error)
        return {"ready": True, "backbone": info.backbone, "fingerprint": info.fingerprint}

    @app.get("/metrics", tags=["health"])
    async def prometheus(self, request: Request) -> Response:
        """Prometheus text format. Needs the admin key or the metrics token: series are labelled by tenant."""
        self._principal(request, "admin", "metrics")
        body, content_type = state.metrics().render()
        return Response(body, media_type=content_type)

    # ---- tenants (admin) ------------------------------------------------------------------------
    @app.post("/v1/tenants", status_code=201, response_model=TenantCreated, tags=["tenants"])
    async def create_tenant(self, body: TenantCreate, request: Request) -> TenantCreated:
        self._admin(request)
        api_key = await asyncio.to_thread(self.store.create_tenant, body.tenant)
        return TenantCreated(tenant=body.tenant, api_key=api_key)

    @app.delete("/v1/tenants/{tenant}", status_code=204, tags=["tenants"])
    async def delete_tenant(self, tenant: str, request: Request) -> Response:
        self._admin(request)
        await asyncio.to_thread(self.store.delete_tenant, tenant)
        return Response(status_code=204)

    @app.post("/v1/tenants/{tenant}/keys", response_model=TenantCreated, tags=["tenants"])
    async def rotate_key(self, tenant: str, request: Request) -> TenantCreated:
        """New API key for ``tenant``; the old ones stop working."""
        self._admin(request)
        api_key = await asyncio.to_thread(self.store.rotate_key, tenant)
        return TenantCreated(tenant=tenant, api_key=api_key)

    @app.get("/v1/tenants/{tenant}/limits", response_model=LimitsOut, tags=["tenants"])
    async def get_limits(self, tenant: str, request: Request) -> LimitsOut:
        """The tenant's rate limits and whether they are the server's default."""
        self._admin(request)
        info = await asyncio.to_thread(self.store.tenant_info, tenant)
        return LimitsOut.of(info.limits, self.settings.default_limits)

    @app.put("/v1/tenants/{tenant}/limits", response_model=LimitsOut, tags=["tenants"])
    async def set_limits(self, tenant: str, body: LimitsIn, request: Request) -> LimitsOut:
        """Set the tenant's own rate limits (``{"default": true}`` goes back to the server's default)."""
        self._admin(request)
        limits = body.to_limits()
        await asyncio.to_thread(self.store.set_limits, tenant, limits)
        self._limits.pop(tenant, None)  # this replica at once; the others within LIMITS_TTL_S
        return LimitsOut.of(limits, self.settings.default_limits)

    # ---- prefixes (tenant) -----------------------------------------------------------------------
    @app.put(
        "/v1/prefixes/{prefix_id}",
        response_model=PrefixMeta,
        tags=["prefixes"],
        responses={201: {"model": PrefixMeta, "description": "first version"}},
        openapi_extra=OPENAPI_BODY,
    )
    async def put_prefix(self, prefix_id: str, request: Request) -> JSONResponse:
        """Upload a packed ``.safetensors`` (octet-stream) or a PEFT folder's two files (multipart)."""
        from prefixserve.adapters.store import check_id

        tenant = await self._tenant(request)
        check_id(prefix_id)
        info = await self.worker_info()
        with self._upload_slot(tenant):
            data = await read_upload(request, fingerprint=info.fingerprint, max_bytes=self.settings.max_upload_bytes)
        try:
            await asyncio.to_thread(self.store.head, tenant, prefix_id)
            created = False
        except NotFoundError:
            created = True
        version = await asyncio.to_thread(self.store.put, tenant, prefix_id, data)
        return JSONResponse(prefix_meta(version).model_dump(), status_code=201 if created else 200)

    @app.get("/v1/prefixes", response_model=PrefixList, tags=["prefixes"])
    async def list_prefixes(self, request: Request, kind: str | None = None) -> PrefixList:
        """The caller's adapters (latest versions); ``?kind=lora`` lists one kind (prefix, prompt, lora, ia3,
        bottleneck). ``kind`` is checked after authentication, like everything the caller sends."""
        from prefixserve.adapters.errors import BadRequestError
        from prefixserve.adapters.kinds import KINDS

        tenant = await self._tenant(request)
        if kind is not None and kind not in KINDS:
            raise BadRequestError(f"kind must be one of {', '.join(KINDS)}")
        infos = await asyncio.to_thread(self.store.list, tenant)
        metas = [prefix_meta(i) for i in infos]
        return PrefixList(prefixes=[m for m in metas if kind is None or m.kind == kind])

    @app.get("/v1/prefixes/{prefix_id}", response_model=PrefixMeta, tags=["prefixes"])
    async def get_prefix(self, prefix_id: str, request: Request) -> PrefixMeta:
        tenant = await self._tenant(request)
        return prefix_meta(await asyncio.to_thread(self.store.head, tenant, prefix_id))

    @app.delete("/v1/prefixes/{prefix_id}", status_code=204, tags=["prefixes"])
    async def delete_prefix(self, prefix_id: str, request: Request) -> Response:
        tenant = await self._tenant(request)
        await asyncio.to_thread(self.store.delete, tenant, prefix_id)
        return Response(status_code=204)

    # versions and rollback: a pin is in the store, and every classify heads it (all replicas at once)
    @app.get("/v1/prefixes/{prefix_id}/versions", response_model=VersionList, tags=["prefixes"])
    async def list_versions(self, prefix_id: str, request: Request) -> VersionList:
        """The kept versions (newest first), the newest (``current``) and the pinned one (served if set)."""
        tenant = await self._tenant(request)
        return version_list(await asyncio.to_thread(self.store.history, tenant, prefix_id))

    @app.post("/v1/prefixes/{prefix_id}/rollback", response_model=PrefixMeta, tags=["prefixes"])
    async def rollback(self, prefix_id: str, body: RollbackRequest, request: Request) -> PrefixMeta:
        """Serve kept version ``version`` (pin it) until ``DELETE .../pin`` or the next upload."""
        tenant = await self._tenant(request)
        return prefix_meta(await asyncio.to_thread(self.store.pin, tenant, prefix_id, body.version))

    @app.delete("/v1/prefixes/{prefix_id}/pin", response_model=PrefixMeta, tags=["prefixes"])
    async def unpin(self, prefix_id: str, request: Request) -> PrefixMeta:
        """Serve the newest version again; returns it."""
        tenant = await self._tenant(request)
        return prefix_meta(await asyncio.to_thread(self.store.unpin, tenant, prefix_id))

    # ---- inference ------------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["inference"])
    async def classify(self, body: ClassifyRequest, request: Request, response: Response) -> ClassifyResponse:
        tenant = await self._tenant(request)
        s = self.settings
        if len(body.inputs) > s.max_inputs:
            raise PrefixServeError(
                f"{len(body.inputs)} inputs; at most {s.max_inputs} per request", code="too_many_inputs", status=422
            )
        check_texts(body.inputs, body.text_pairs, max_chars=s.max_text_chars)
        limits = await self._tenant_limits(tenant)
        slot = await asyncio.to_thread(self._admit, tenant, limits, len(body.inputs))
        try:
            return await self._classify(tenant, body, response)
        finally:
            await asyncio.to_thread(self.limiter.leave, tenant, slot)

    async def _classify(self, tenant: str, body: ClassifyRequest, response: Response) -> ClassifyResponse:
        head = await asyncio.to_thread(self.store.head, tenant, body.prefix_id, body.version)  # None: served
        call = ClassifyCall(
            AdapterRef(tenant, body.prefix_id, head.version, head.sha256),
            tuple(body.inputs),
            tuple(body.text_pairs) if body.text_pairs is not None else None,
        )
        reply: ClassifyReply = await self.worker.classify.remote(call)
        state.metrics().worker_snapshot(reply.stats)
        state.metrics().rows.labels(tenant).inc(len(body.inputs))
        error = reply.first_error()
        if error is not None:
            raise error
        response.headers[REPLICA_HEADER] = reply.replica
        predictions = reply.predictions()
        return ClassifyResponse(
            prefix_id=body.prefix_id,
            version=reply.ref.version,
            predictions=[PredictionOut(label=p.label, score=p.score, scores=p.scores) for p in predictions],
            truncated=[p.truncated for p in predictions],
        )

    # ---- compatible shapes (server/compat.py): TEI /predict and /info, vLLM /classify ---------------
    @app.post("/v1/prefixes/{prefix_id}/predict", response_model=compat.TeiPredictResponse, tags=["compatible"])
    async def tei_predict(
        self, prefix_id: str, body: compat.TeiPredictRequest, request: Request, response: Response
    ) -> compat.TeiPredictResponse:
        """Hugging Face TEI ``/predict`` with adapter ``prefix_id`` (a TEI client's base URL: /v1/prefixes/{id})."""
        return body.answer(await self.classify(body.to_classify(prefix_id), request, response))

    @app.post("/predict", response_model=compat.TeiPredictResponse, tags=["compatible"])
    async def tei_predict_header(
        self, body: compat.TeiPredictRequest, request: Request, response: Response
    ) -> compat.TeiPredictResponse:
        """TEI ``/predict``; the ``X-Prefix-Id`` header names the adapter."""
        return await self.tei_predict(compat.required_prefix(request.headers), body, request, response)

    @app.get("/v1/prefixes/{prefix_id}/info", response_model=compat.TeiInfo, tags=["compatible"])
    async def tei_prefix_info(self, prefix_id: str, request: Request) -> compat.TeiInfo:
        """TEI ``/info`` of one adapter (its labels as ``model_type.classifier``)."""
        tenant = await self._tenant(request)
        meta = prefix_meta(await asyncio.to_thread(self.store.head, tenant, prefix_id))
        return compat.tei_info(self.settings, await self.worker_info(), meta)

    @app.get("/info", response_model=compat.TeiInfo, tags=["compatible"])
    async def tei_info(self, request: Request) -> compat.TeiInfo:
        """TEI ``/info``: the adapter ``X-Prefix-Id`` names, else the server (backbone, no labels)."""
        prefix_id = compat.header_prefix(request.headers)
        if prefix_id is not None:
            return await self.tei_prefix_info(prefix_id, request)
        self._principal(request, "tenant", "admin")
        return compat.tei_info(self.settings, await self.worker_info(), None)

    @app.post("/classify", response_model=compat.VllmClassifyResponse, tags=["compatible"])
    async def vllm_classify(
        self, body: compat.VllmClassifyRequest, request: Request, response: Response
    ) -> compat.VllmClassifyResponse:
        """vLLM ``/classify``; ``model`` names the adapter (``id`` or ``id@version``)."""
        return body.answer(await self.classify(body.to_classify(), request, response))

"""The ``Ingress`` deployment: FastAPI routes for auth, validation, limits and routing. No model code.

Flow of ``POST /v1/classify``: body cap (:mod:`.middleware`) -> pydantic -> bearer key -> configured
limits -> ``store.head`` (current version; 404 for a missing or foreign prefix) -> one Worker handle
call with a :class:`ClassifyCall` naming that exact :class:`AdapterRef` -> a typed
:class:`ClassifyReply` -> :class:`ClassifyResponse` naming the version used. Errors: :mod:`.http_errors`.

Decisions:
* Coherence: the Ingress ``head``s the store on every classify (one Redis GET / one small file
  read), so once a PUT or DELETE has returned, the very next request on any replica uses the new
  state; Worker caches are keyed by version and cannot serve a superseded one.
* Uploads are validated here against the served backbone (``BackboneSpec`` fetched once from a
  Worker and cached; it never changes while the app runs) by the store's validator, so a rejected
  upload writes nothing and the previous version keeps serving.
* Store calls are blocking clients; they run in worker threads (``asyncio.to_thread``).
"""
# (no `from __future__ import annotations`: Serve re-binds the route methods and FastAPI must see real
# annotation objects, else `request: Request` is read as a query parameter)

import asyncio
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from prefixserve.adapters.errors import NotFoundError, PrefixServeError, StoreUnavailableError
from prefixserve.adapters.format import AdapterMeta
from prefixserve.adapters.ref import AdapterRef

from . import http_errors, state
from .auth import Authenticator, resolve_admin_key
from .middleware import BodyLimit
from .protocol import ClassifyCall, ClassifyReply, WorkerInfo
from .schemas import (
    AppSettings,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    PredictionOut,
    PrefixList,
    PrefixMeta,
    TenantCreate,
    TenantCreated,
    prefix_meta,
)
from .uploads import OPENAPI_BODY, read_upload

REPLICA_HEADER = "x-prefixserve-replica"
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429)}

app = FastAPI(
    title="prefixserve",
    version="0.1.0",
    responses=_ERRORS,
    redirect_slashes=False,
    description="Multi-tenant prefix/prompt adapter server: one frozen encoder, many tenants' "
    "adapters batched into one forward pass.",
)
http_errors.install(app)
app.add_middleware(BodyLimit)


# ---- the deployment (helpers it calls must be importable: Serve pickles it at decoration) ----------
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, worker: Any, settings: AppSettings):
        from prefixserve.adapters.store import open_store

        self.settings = settings
        state.settings = settings
        self.worker = worker  # DeploymentHandle to "Worker"
        self.store = open_store(settings.store, validator=self._validate_upload)
        admin_key, _ = resolve_admin_key(settings.admin_key_file)
        self.auth = Authenticator(self.store, admin_key)
        self._info: WorkerInfo | None = None
        self._info_lock = asyncio.Lock()
        state.metrics()

    # ---- helpers ----------------------------------------------------------------------------------
    async def _tenant(self, request: Request) -> str:
        tenant = await asyncio.to_thread(self.auth.tenant, request.headers.get("authorization"))
        request.state.tenant = tenant
        return tenant

    def _admin(self, request: Request) -> None:
        self.auth.admin(request.headers.get("authorization"))
        request.state.tenant = "admin"

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
            await asyncio.to_thread(self.store.ping)
        except Exception as exc:
            error = PrefixServeError(f"backbone or store not ready: {type(exc).__name__}", code="not_ready", status=503)
            return http_errors.error_response(request, error)
        return {"ready": True, "backbone": info.backbone, "fingerprint": info.fingerprint}

    @app.get("/metrics", tags=["health"])
    async def prometheus(self) -> Response:
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
        data = await read_upload(request, fingerprint=info.fingerprint, max_bytes=self.settings.max_upload_bytes)
        try:
            await asyncio.to_thread(self.store.head, tenant, prefix_id)
            created = False
        except NotFoundError:
            created = True
        version = await asyncio.to_thread(self.store.put, tenant, prefix_id, data)
        return JSONResponse(prefix_meta(version).model_dump(), status_code=201 if created else 200)

    @app.get("/v1/prefixes", response_model=PrefixList, tags=["prefixes"])
    async def list_prefixes(self, request: Request) -> PrefixList:
        tenant = await self._tenant(request)
        infos = await asyncio.to_thread(self.store.list, tenant)
        return PrefixList(prefixes=[prefix_meta(i) for i in infos])

    @app.get("/v1/prefixes/{prefix_id}", response_model=PrefixMeta, tags=["prefixes"])
    async def get_prefix(self, prefix_id: str, request: Request) -> PrefixMeta:
        tenant = await self._tenant(request)
        return prefix_meta(await asyncio.to_thread(self.store.head, tenant, prefix_id))

    @app.delete("/v1/prefixes/{prefix_id}", status_code=204, tags=["prefixes"])
    async def delete_prefix(self, prefix_id: str, request: Request) -> Response:
        tenant = await self._tenant(request)
        await asyncio.to_thread(self.store.delete, tenant, prefix_id)
        return Response(status_code=204)

    # ---- inference ------------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["inference"])
    async def classify(self, body: ClassifyRequest, request: Request, response: Response) -> ClassifyResponse:
        tenant = await self._tenant(request)
        s = self.settings
        if len(body.inputs) > s.max_inputs:
            raise PrefixServeError(
                f"{len(body.inputs)} inputs; at most {s.max_inputs} per request", code="too_many_inputs", status=422
            )
        for text in body.inputs + [p for p in (body.text_pairs or []) if p]:
            if len(text) > s.max_text_chars:
                raise PrefixServeError(
                    f"an input has {len(text)} characters; at most {s.max_text_chars}", code="text_too_long", status=422
                )
        head = await asyncio.to_thread(self.store.head, tenant, body.prefix_id)
        call = ClassifyCall(
            AdapterRef(tenant, body.prefix_id, head.version),
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

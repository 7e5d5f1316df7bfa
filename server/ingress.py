"""The ``Ingress`` deployment: FastAPI routes for auth, validation, limits and routing. No model code.

Flow of ``POST /v1/classify``: body cap (middleware) -> pydantic -> bearer key -> configured limits ->
``store.head`` (current version; 404 for a missing or foreign prefix) -> one Backbone handle call
carrying ``(tenant, prefix_id, version, inputs, text_pairs)`` -> per-row results -> JSON naming the
version used.

Decisions:
* Coherence: the Ingress ``head``s the store on every classify (one Redis GET / one small file
  read), so once a PUT or DELETE has returned, the very next request on any replica uses the new
  state; Backbone caches are keyed by version and cannot serve a superseded one.
* Uploads are validated here against the served backbone (``BackboneSpec`` fetched once from the
  Backbone deployment and cached; it never changes while the app runs) by the store's validator, so
  a rejected upload writes nothing and the previous version keeps serving.
* Store calls are blocking clients; they run in worker threads (``asyncio.to_thread``).
* Body caps are enforced by :class:`BodyLimit` before routing: ``Content-Length`` first, then the
  streamed byte count (chunked uploads), both -> 413.
"""
# (no `from __future__ import annotations`: Serve re-binds the route methods and FastAPI must see real
# annotation objects, else `request: Request` is read as a query parameter)

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixserve.adapters.errors import (
    BadRequestError,
    InvalidAdapterError,
    NotFoundError,
    PrefixServeError,
    StoreUnavailableError,
)

from . import state
from .auth import Authenticator, resolve_admin_key
from .schemas import (
    AppSettings,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    PrefixList,
    PrefixMeta,
    TenantCreate,
    TenantCreated,
    prefix_meta,
)

REPLICA_HEADER = "x-prefixserve-replica"
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429)}

app = FastAPI(
    title="prefixserve",
    version="0.1.0",
    responses=_ERRORS,
    redirect_slashes=False,
    description="Multi-tenant prefix/prompt adapter server: one frozen encoder, many tenants' "
    "adapters batched into one forward pass.",
)


# ---- errors: always {"error": {"code", "message"}} ------------------------------------------------
def _error(request: Request, status: int, code: str, message: str) -> JSONResponse:
    request.state.error_code = code
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


@app.exception_handler(PrefixServeError)
async def _on_prefixserve_error(request: Request, exc: PrefixServeError):
    return _error(request, exc.status, exc.code, exc.message)


@app.exception_handler(RequestValidationError)
async def _on_validation_error(request: Request, exc: RequestValidationError):
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return _error(request, 422, "invalid_request", "; ".join(parts) or "invalid request")


@app.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception):
    import logging

    logging.getLogger("prefixserve.ingress").exception("unhandled error", exc_info=exc)
    return _error(request, 500, "internal", f"internal error ({type(exc).__name__})")


@app.exception_handler(StarletteHTTPException)
async def _on_http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
    return _error(request, exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


# ---- body cap + request metrics (pure ASGI: sees the raw stream) ----------------------------------
class BodyLimit:
    """413 when Content-Length or the streamed body exceeds the cap; records request metrics."""

    def __init__(self, asgi):
        self.asgi = asgi

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.asgi(scope, receive, send)
        t0, status = time.perf_counter(), [500]
        s = state.settings
        upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/prefixes/")
        cap = s.max_upload_bytes if upload else s.max_request_bytes

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            too_big = length is not None and length.isdigit() and int(length) > cap
            if not too_big and scope["method"] in ("POST", "PUT", "PATCH"):
                body, too_big = await _read_capped(receive, cap)
                receive = _replay(body, receive)
            if too_big:
                scope.setdefault("state", {})["error_code"] = "body_too_large"
                return await _send_json(
                    send_wrapper,
                    413,
                    {"error": {"code": "body_too_large", "message": f"request body exceeds {cap} bytes"}},
                )
            await self.asgi(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            rstate = scope.get("state") or {}
            state.metrics().observe(
                getattr(route, "path", "unmatched"),
                rstate.get("tenant", "-"),
                status[0],
                time.perf_counter() - t0,
                rstate.get("error_code"),
            )


async def _read_capped(receive, cap: int) -> tuple[bytes, bool]:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes, receive):
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


app.add_middleware(BodyLimit)


def _parse_labels(raw: bytes | None) -> list[str] | None:
    if not raw:
        return None
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidAdapterError(f"labels is not a JSON list: {exc}", code="bad_labels") from None
        if not isinstance(labels, list):
            raise InvalidAdapterError("labels must be a JSON list of strings", code="bad_labels")
        return labels
    return [x.strip() for x in text.split(",") if x.strip()]


# ---- the deployment (helpers it calls must be defined above it: Serve pickles it at decoration) -----
@serve.deployment(name="Ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, backbone, settings: dict):
        from prefixserve.adapters.store import open_store

        self.settings = AppSettings(**settings)
        state.settings = self.settings
        self.backbone = backbone  # DeploymentHandle to "Backbone"
        self.store = open_store(self.settings.store, validator=self._validate_upload)
        admin_key, _ = resolve_admin_key(self.settings.admin_key_file)
        self.auth = Authenticator(self.store, admin_key)
        self._info: dict | None = None
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

    async def backbone_info(self) -> dict:
        """Backbone name, fingerprint and spec: asked once, then cached (it cannot change under us)."""
        if self._info is None:
            async with self._info_lock:
                if self._info is None:
                    from prefixserve.adapters.format import BackboneSpec

                    info = await self.backbone.info.remote()
                    info["spec_obj"] = BackboneSpec(**info["spec"])
                    self._info = info
        return self._info

    def _validate_upload(self, data: bytes):
        """Store validator: full structural check AND fit to the served backbone."""
        from prefixserve.adapters.format import inspect_packed

        if self._info is None:  # put() is only called after backbone_info() resolved
            raise StoreUnavailableError("backbone spec not known yet; retry", code="not_ready")
        return inspect_packed(data, expect=self._info["spec_obj"])

    # ---- health --------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(self, request: Request):
        try:
            await asyncio.wait_for(self.backbone.ready.remote(), timeout=5.0)
            info = await asyncio.wait_for(self.backbone_info(), timeout=5.0)
            await asyncio.to_thread(self.store.ping)
        except Exception as exc:
            return _error(request, 503, "not_ready", f"backbone or store not ready: {type(exc).__name__}")
        return {"ready": True, "backbone": info["backbone"], "fingerprint": info["fingerprint"]}

    @app.get("/metrics", tags=["health"])
    async def prometheus(self):
        body, content_type = state.metrics().render()
        return Response(body, media_type=content_type)

    # ---- tenants (admin) ------------------------------------------------------------------------
    @app.post("/v1/tenants", status_code=201, response_model=TenantCreated, tags=["tenants"])
    async def create_tenant(self, body: TenantCreate, request: Request):
        self._admin(request)
        api_key = await asyncio.to_thread(self.store.create_tenant, body.tenant)
        return JSONResponse({"tenant": body.tenant, "api_key": api_key}, status_code=201)

    @app.delete("/v1/tenants/{tenant}", status_code=204, tags=["tenants"])
    async def delete_tenant(self, tenant: str, request: Request):
        self._admin(request)
        await asyncio.to_thread(self.store.delete_tenant, tenant)
        return Response(status_code=204)

    @app.post("/v1/tenants/{tenant}/keys", response_model=TenantCreated, tags=["tenants"])
    async def rotate_key(self, tenant: str, request: Request):
        """New API key for ``tenant``; the old ones stop working."""
        self._admin(request)
        api_key = await asyncio.to_thread(self.store.rotate_key, tenant)
        return {"tenant": tenant, "api_key": api_key}

    # ---- prefixes (tenant) -----------------------------------------------------------------------
    @app.put(
        "/v1/prefixes/{prefix_id}",
        response_model=PrefixMeta,
        tags=["prefixes"],
        responses={201: {"model": PrefixMeta, "description": "first version"}},
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "adapter_config": {"type": "string", "format": "binary"},
                                "adapter_model": {"type": "string", "format": "binary"},
                                "labels": {"type": "string", "description": "JSON list or comma-separated"},
                                "fingerprint": {"type": "string"},
                            },
                            "required": ["adapter_config", "adapter_model"],
                        }
                    },
                }
            }
        },
    )
    async def put_prefix(self, prefix_id: str, request: Request):
        """Upload a packed ``.safetensors`` (octet-stream) or a PEFT folder's two files (multipart)."""
        from prefixserve.adapters.store import check_id

        tenant = await self._tenant(request)
        check_id(prefix_id)
        info = await self.backbone_info()
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            data = await self._pack_multipart(request, info["fingerprint"])
        else:
            data = await request.body()
        if not data:
            raise BadRequestError(
                "empty body: send a packed adapter or multipart adapter_config + adapter_model", code="empty_body"
            )
        try:
            await asyncio.to_thread(self.store.head, tenant, prefix_id)
            created = False
        except NotFoundError:
            created = True
        version = await asyncio.to_thread(self.store.put, tenant, prefix_id, data)
        return JSONResponse(prefix_meta(version), status_code=201 if created else 200)

    async def _pack_multipart(self, request: Request, fingerprint: str) -> bytes:
        from prefixserve.adapters.peft_io import pack_parts

        cap = self.settings.max_upload_bytes
        try:
            form = await request.form(max_files=4, max_fields=8, max_part_size=cap)
        except Exception as exc:
            raise BadRequestError(f"unreadable multipart body: {exc}", code="bad_multipart") from None
        parts = {}
        for name in ("adapter_config", "adapter_model", "labels", "fingerprint"):
            value = form.get(name)
            if value is None:
                continue
            parts[name] = await value.read() if hasattr(value, "read") else value.encode()
        missing = [n for n in ("adapter_config", "adapter_model") if n not in parts]
        if missing:
            raise InvalidAdapterError(
                f"multipart upload is missing {missing} (adapter_config.json and "
                "adapter_model.safetensors from PeftModel.save_pretrained)",
                code="bad_multipart",
            )
        labels = _parse_labels(parts.get("labels"))
        fp = parts.get("fingerprint", b"").decode().strip() or fingerprint
        return await asyncio.to_thread(
            pack_parts, parts["adapter_config"], parts["adapter_model"], labels=labels, fingerprint=fp
        )

    @app.get("/v1/prefixes", response_model=PrefixList, tags=["prefixes"])
    async def list_prefixes(self, request: Request):
        tenant = await self._tenant(request)
        infos = await asyncio.to_thread(self.store.list, tenant)
        return {"prefixes": [prefix_meta(i) for i in infos]}

    @app.get("/v1/prefixes/{prefix_id}", response_model=PrefixMeta, tags=["prefixes"])
    async def get_prefix(self, prefix_id: str, request: Request):
        tenant = await self._tenant(request)
        return prefix_meta(await asyncio.to_thread(self.store.head, tenant, prefix_id))

    @app.delete("/v1/prefixes/{prefix_id}", status_code=204, tags=["prefixes"])
    async def delete_prefix(self, prefix_id: str, request: Request):
        tenant = await self._tenant(request)
        await asyncio.to_thread(self.store.delete, tenant, prefix_id)
        return Response(status_code=204)

    # ---- inference ------------------------------------------------------------------------------
    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["inference"])
    async def classify(self, body: ClassifyRequest, request: Request):
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
        reply = await self.backbone.classify.remote(
            {
                "tenant": tenant,
                "prefix_id": body.prefix_id,
                "version": head.version,
                "inputs": body.inputs,
                "text_pairs": body.text_pairs,
            }
        )
        state.metrics().backbone_snapshot(reply.get("stats"))
        state.metrics().rows.labels(tenant).inc(len(body.inputs))
        error = reply.get("error") or next((r["error"] for r in reply.get("results", []) if "error" in r), None)
        if error:
            raise PrefixServeError(error["message"], code=error["code"], status=error.get("status", 500))
        results = reply["results"]
        payload = {
            "prefix_id": body.prefix_id,
            "version": reply["version"],
            "predictions": [{k: r[k] for k in ("label", "score", "scores")} for r in results],
            "truncated": [bool(r["truncated"]) for r in results],
        }
        return JSONResponse(payload, headers={REPLICA_HEADER: reply.get("replica", "")})

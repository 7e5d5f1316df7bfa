"""The Ingress's ASGI gate: authenticate from the headers, cap bodies as they stream, record metrics.

Order for every request (pure ASGI: nothing has read the body yet):

1. Public paths (health, docs and their assets) pass. Every other request must carry a valid bearer key, resolved
   to a :class:`~.auth.Principal` from its headers alone; a missing or bad key gets 401 before a single
   byte of its body is read, so unauthenticated uploads cost the server nothing.
2. ``Content-Length`` over the cap (the upload cap for ``PUT /v1/prefixes/...``, the request cap for
   everything else) gets 413 at once; a streamed body is counted as it is read and stops at the cap
   (413) without being buffered here.
3. A body type the route does not read gets 415 (:func:`check_media_type`).
4. The route runs with ``request.state.principal`` set; the metrics record route, tenant, status,
   latency and error code.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixserve.adapters.errors import PrefixServeError, StoreUnavailableError, as_error

from . import state
from .http_errors import retry_after

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
DOCS_ASSETS = "/docs/assets"  # Swagger UI / ReDoc JS and CSS from the package (server/docs.py): public too


TRAINING_UPLOADS = frozenset({"/v1/datasets", "/v1/training-jobs"})  # POST: a dataset, raw or inline


def body_cap(method: str, path: str) -> int:
    s = state.settings
    if method == "POST" and path in TRAINING_UPLOADS:
        return s.training.max_upload_bytes
    return s.max_upload_bytes if method == "PUT" and path.startswith("/v1/prefixes/") else s.max_request_bytes


class Gate:
    """Auth before body, streamed body caps, request metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]
        rstate = scope.setdefault("state", {})

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            try:
                await self._admit(scope, rstate)
            except Exception as exc:
                error = as_error(exc)
                rstate["error_code"] = error.code
                await send_error(send_wrapper, error)
                return
            await self.app(scope, _capped(receive, body_cap(scope["method"], scope["path"])), send_wrapper)
        finally:
            principal = rstate.get("principal")
            state.metrics().observe(
                getattr(scope.get("route"), "path", "unmatched"),
                principal.name if principal is not None and principal.role == "tenant" else "-",
                status[0],
                time.perf_counter() - t0,
                rstate.get("error_code"),
            )

    @staticmethod
    async def _admit(scope: Scope, rstate: dict[str, Any]) -> None:
        """Raise the error that refuses this request (401, 413, 415, 503), reading no body."""
        path, root = scope["path"], scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root) else path
        if path in PUBLIC_PATHS or path.startswith(DOCS_ASSETS + "/"):
            return
        auth = state.auth
        if auth is None:
            raise StoreUnavailableError("the server is starting; retry", code="not_ready", retry_after=1)
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        rstate["principal"] = await asyncio.to_thread(auth.principal, authorization)
        length = headers.get(b"content-length")
        cap = body_cap(scope["method"], scope["path"])
        if length is not None and length.isdigit() and int(length) > cap:
            raise PrefixServeError(f"request body exceeds {cap} bytes", code="body_too_large", status=413)
        check_media_type(scope["method"], path, headers.get(b"content-type", b"").decode("latin-1"))


def check_media_type(method: str, path: str, content_type: str) -> None:
    """415 for a body type a route does not read: uploads take octet-stream or multipart, classify JSON.

    After authentication (strangers get 401 first), before the body is read. No header at all passes
    (HTTP lets a server assume the type; FastAPI reads such a classify body as JSON).
    """
    media = content_type.split(";", 1)[0].strip().lower()
    if not media:
        return
    wanted: tuple[str, ...]
    if method == "PUT" and path.startswith("/v1/prefixes/"):
        wanted = ("application/octet-stream", "multipart/form-data")
    elif method == "POST" and path == "/v1/classify":
        wanted = ("application/json",)
    else:
        return
    if media not in wanted:
        raise PrefixServeError(
            f"{method} {path} takes {' or '.join(wanted)}, not {media}", code="unsupported_media_type", status=415
        )


def _capped(receive: Receive, cap: int) -> Receive:
    """``receive`` that counts body bytes and stops at ``cap`` (FastAPI passes HTTPException through)."""
    seen = [0]

    async def capped() -> Message:
        message = await receive()
        if message["type"] == "http.request":
            seen[0] += len(message.get("body", b""))
            if seen[0] > cap:
                raise HTTPException(status_code=413, detail=f"request body exceeds {cap} bytes")
        return message

    return capped


async def send_error(send: Send, error: PrefixServeError) -> None:
    body = json.dumps(error.to_dict()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if error.retry_after is not None:
        headers.append((b"retry-after", retry_after(error.retry_after).encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

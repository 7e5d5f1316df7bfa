"""The Ingress's ASGI middleware: body caps and request metrics (pure ASGI: it sees the raw stream).

:class:`BodyLimit` answers 413 when ``Content-Length`` or the streamed body exceeds the cap (the
upload cap for ``PUT /v1/prefixes/...``, the request cap for everything else), and records every
request's route, tenant, status, latency and error code in the process's metrics.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefixserve.adapters.errors import PrefixServeError

from . import state


class BodyLimit:
    """413 when Content-Length or the streamed body exceeds the cap; records request metrics."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]
        s = state.settings
        upload = scope["method"] == "PUT" and scope["path"].startswith("/v1/prefixes/")
        cap = s.max_upload_bytes if upload else s.max_request_bytes

        async def send_wrapper(message: Message) -> None:
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
                error = PrefixServeError(f"request body exceeds {cap} bytes", code="body_too_large", status=413)
                scope.setdefault("state", {})["error_code"] = error.code
                await _send_json(send_wrapper, error.status, error.to_dict())
                return
            await self.app(scope, receive, send_wrapper)
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


async def _read_capped(receive: Receive, cap: int) -> tuple[bytes, bool]:
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


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

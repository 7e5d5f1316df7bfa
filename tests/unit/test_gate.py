"""The Ingress's Gate: authenticate from headers before reading any body; streamed caps; 401/403/413 envelopes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest
from fastapi import FastAPI, Request

from prefixserve.server import http_errors, state
from prefixserve.server.auth import Authenticator
from prefixserve.server.middleware import Gate
from prefixserve.server.schemas import AppSettings

MiB = 2**20


class Store:
    def authenticate(self, key: str) -> str | None:
        return "acme" if key == "tenant-key" else None


def make_app() -> FastAPI:
    app = FastAPI()
    http_errors.install(app)
    app.add_middleware(Gate)

    @app.put("/v1/prefixes/{prefix_id}")
    async def put(prefix_id: str, request: Request) -> dict[str, Any]:
        if request.state.principal.role != "tenant":
            from prefixserve.adapters.errors import ForbiddenError

            raise ForbiddenError("tenant route")
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return {"bytes": size}

    @app.post("/v1/classify")
    async def classify(body: dict[str, int]) -> dict[str, int]:
        return body

    return app


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    monkeypatch.setattr(state, "settings", AppSettings(max_upload_bytes=8 * MiB, max_request_bytes=MiB))
    monkeypatch.setattr(state, "auth", Authenticator(Store(), "admin-key"))  # type: ignore[arg-type]
    return make_app()


def call(app: FastAPI, method: str, path: str, *, key: str | None, size: int, length: bool = True):
    """Drive the ASGI app by hand; returns (status, json body, body bytes the app pulled)."""
    headers = [(b"content-type", b"application/octet-stream")]
    if key:
        headers.append((b"authorization", f"Bearer {key}".encode()))
    if length:
        headers.append((b"content-length", str(size).encode()))
    scope: dict[str, Any] = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    scope |= {"asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80)}
    left, pulled, sent = [size], [0], []

    async def receive() -> dict[str, Any]:
        chunk = b"x" * min(MiB, left[0])
        left[0] -= len(chunk)
        pulled[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": left[0] > 0}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled[0]


def test_unauthenticated_uploads_are_refused_before_their_body_is_read(app):
    for key in (None, "wrong"):
        status, body, pulled = call(app, "PUT", "/v1/prefixes/m", key=key, size=60 * MiB)
        assert (status, body["error"]["code"], pulled) == (401, "unauthorized", 0)


def test_caps_hold_on_content_length_and_on_the_stream(app):
    status, body, pulled = call(app, "PUT", "/v1/prefixes/m", key="tenant-key", size=60 * MiB)
    assert (status, body["error"]["code"], pulled) == (413, "body_too_large", 0)  # Content-Length says it all
    status, body, pulled = call(app, "PUT", "/v1/prefixes/m", key="tenant-key", size=60 * MiB, length=False)
    assert (status, body["error"]["code"]) == (413, "body_too_large") and pulled <= 9 * MiB  # stopped at the cap
    status, body, pulled = call(app, "PUT", "/v1/prefixes/m", key="tenant-key", size=3 * MiB, length=False)
    assert status == 200 and body == {"bytes": 3 * MiB}


def test_auth_comes_before_schema_validation_and_roles_get_403(app):
    status, body, _ = call(app, "POST", "/v1/classify", key=None, size=10)  # not JSON, and no key
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    status, body, _ = call(app, "PUT", "/v1/prefixes/m", key="admin-key", size=10)
    assert (status, body["error"]["code"]) == (403, "forbidden")

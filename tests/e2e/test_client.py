"""``prefixserve.client`` (sync and async) against a live Ray Serve app, once with the Redis store and once
with the file store (one app at a time, one Worker replica), plus the client's retry and request-shape
rules against ``httpx.MockTransport`` (no server: they run in milliseconds)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from prefixserve.adapters.errors import ConflictError, NotFoundError, PrefixServeError
from prefixserve.client import AsyncClient, Client, RetryPolicy
from tests.fixtures.backbones import make_peft_adapter
from tests.fixtures.served_app import GENEROUS_LIMITS, served_app

MAX_INPUTS = 4
TEXTS = [f"text number {i} says {'good' if i % 2 else 'bad'} things" for i in range(10)]
FAST_RETRY = RetryPolicy(max_retries=3, backoff_s=0.001, max_backoff_s=0.01)


class Recording(httpx.BaseTransport):
    """A real HTTP transport that records (method, path, status) of every exchange."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen: list[tuple[str, str, int]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        self.seen.append((request.method, request.url.path, response.status_code))
        return response

    def statuses(self, path: str) -> list[int]:
        return [status for _, p, status in self.seen if p == path]


class AsyncRecording(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str, int]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        self.seen.append((request.method, request.url.path, response.status_code))
        return response


@pytest.fixture(scope="module", params=[pytest.param("redis", marks=pytest.mark.redis), "file"])
def app(request, ray_serve, tiny_backbones, tmp_path_factory) -> Any:
    tmp = tmp_path_factory.mktemp(f"client-{request.param}")
    if request.param == "redis":
        store = request.getfixturevalue("redis_server").url + "?prefix=clienttest:"
    else:
        store = f"file://{tmp / 'store'}"
    extra = dict(max_inputs=MAX_INPUTS, default_limits=GENEROUS_LIMITS)
    with served_app(ray_serve, "prefixserve-client-test", tiny_backbones["roberta"], store, tmp, **extra) as a:
        admin = Client(a.url, api_key=a.admin_key, retry=FAST_RETRY)
        yield {
            "url": a.url,
            "admin": admin,
            "admin_key": a.admin_key,
            "fingerprint": a.fingerprint,
            "backbone": tiny_backbones["roberta"],
            "tmp": tmp,
        }
        admin.close()


def _scores_close(a, b) -> None:
    assert [p.label for p in a.predictions] == [p.label for p in b.predictions]
    for x, y in zip(a.predictions, b.predictions, strict=True):
        assert x.scores.keys() == y.scores.keys()
        assert all(abs(x.scores[k] - y.scores[k]) <= 1e-5 for k in x.scores)


# ---- live app (Redis store, then file store) ------------------------------------------------------
@pytest.mark.ray
def test_sync_client_round_trip(app) -> None:
    from prefixserve.adapters.peft_io import pack_folder

    admin, tmp = app["admin"], app["tmp"]
    key = admin.create_tenant("acme").api_key
    assert key not in repr(admin.rotate_key("acme"))  # a key never shows in a repr
    with pytest.raises(PrefixServeError) as old_key:
        Client(app["url"], api_key=key).list()
    assert old_key.value.status == 401 and old_key.value.code == "unauthorized"
    key = admin.rotate_key("acme").api_key

    folder = Path(make_peft_adapter(app["backbone"], tmp / "peft", "prefix", 3, 2, seed=1))
    packed = pack_folder(folder, labels=["neg", "pos"], fingerprint=app["fingerprint"])
    recording = Recording()
    with Client(app["url"], api_key=key, transport=recording) as c:
        first = c.upload("packed", packed)
        assert (first.prefix_id, first.version, first.kind, first.labels) == ("packed", 1, "prefix", ("neg", "pos"))
        assert c.upload("packed", packed).version == 2  # a new version of the same id
        lora = Path(make_peft_adapter(app["backbone"], tmp / "lora", "lora", 0, 3, seed=2))
        meta = c.upload("lora", lora, labels=["a", "b", "c"])  # a PEFT folder: multipart
        assert (meta.kind, meta.labels) == ("lora", ("a", "b", "c"))
        assert {m.prefix_id for m in c.list()} == {"packed", "lora"}
        assert [m.prefix_id for m in c.list(kind="lora")] == ["lora"]
        assert c.get("packed").version == 2
        kept = c.versions("packed")
        assert (kept.current, kept.pinned, {m.version for m in kept.versions}) == (2, None, {1, 2})
        assert c.rollback("packed", 1).version == 1
        assert c.versions("packed").pinned == 1 and c.classify("packed", TEXTS[:1]).version == 1
        assert c.unpin("packed").version == 2 and c.versions("packed").pinned is None
        assert c.classify("packed", TEXTS[:6], version=1).version == 1  # two chunks, both asking for v1

        assert c.info().max_inputs == MAX_INPUTS  # read from GET /info
        recording.seen.clear()
        whole = c.classify("packed", TEXTS)  # 10 inputs -> requests of 4, 4, 2
        assert recording.statuses("/v1/classify") == [200, 200, 200]
        assert len(whole.predictions) == len(TEXTS) == len(whole.truncated) and whole.version == 2
        backwards = c.classify("packed", TEXTS[::-1])  # other chunk boundaries, same rows
        _scores_close(whole, type(whole)(whole.prefix_id, whole.version, backwards.predictions[::-1], ()))
        single = c.classify("packed", TEXTS[5:6])
        _scores_close(single, type(single)("packed", 2, whole.predictions[5:6], ()))

        with pytest.raises(NotFoundError) as missing:
            c.get("nope")
        assert (missing.value.status, missing.value.code) == (404, "not_found")
        c.delete("lora")
        with pytest.raises(NotFoundError):
            c.classify("lora", TEXTS[:1])

    other = admin.create_tenant("other").api_key
    with Client(app["url"], api_key=other) as c, pytest.raises(NotFoundError):
        c.get("packed")  # another tenant's adapter is "not found", never "forbidden"
    admin.delete_tenant("other")


@pytest.mark.ray
def test_sync_client_waits_out_429(app) -> None:
    admin = app["admin"]
    key = admin.create_tenant("slow").api_key
    packed = Path(make_peft_adapter(app["backbone"], app["tmp"] / "slow", "prompt", 2, 2, seed=3))
    with Client(app["url"], api_key=key) as c:
        c.upload("p", packed)
        admin.set_limits("slow", requests_per_s=1.0, burst_s=1.0)  # a bucket of one request
        recording = Recording()
        with Client(app["url"], api_key=key, transport=recording) as limited:
            limited.classify("p", TEXTS[:1])
            start = time.monotonic()
            assert len(limited.classify("p", TEXTS[:2]).predictions) == 2
            waited = time.monotonic() - start
        assert recording.statuses("/v1/classify") == [200, 429, 200]
        assert waited >= 0.9, waited  # Retry-After: 1 honoured, not the 1 ms backoff
        with Client(app["url"], api_key=key, max_retries=0) as impatient, pytest.raises(PrefixServeError) as exc:
            impatient.classify("p", TEXTS[:1])
            impatient.classify("p", TEXTS[:1])
        assert (exc.value.status, exc.value.code, exc.value.retry_after) == (429, "rate_limited", 1.0)
    assert admin.set_limits("slow", default=True).default


@pytest.mark.ray
def test_async_client(app) -> None:
    async def run() -> None:
        async with AsyncClient(app["url"], api_key=app["admin_key"]) as admin:
            key = (await admin.create_tenant("async")).api_key
            recording = AsyncRecording()
            async with AsyncClient(app["url"], api_key=key, transport=recording) as c:
                folder = make_peft_adapter(app["backbone"], app["tmp"] / "async", "prefix", 3, 2, seed=4)
                assert (await c.upload("a", folder, labels=["x", "y"])).version == 1
                assert [m.prefix_id for m in await c.list()] == ["a"]
                result = await c.classify("a", TEXTS)
                assert len(result.predictions) == len(TEXTS) and set(result.labels) <= {"x", "y"}
                with pytest.raises(NotFoundError):
                    await c.get("missing")
                await admin.set_limits("async", requests_per_s=1.0, burst_s=1.0)
                await c.classify("a", TEXTS[:1])
                await c.classify("a", TEXTS[:1])  # 429, Retry-After: 1, then 200
                classify = [s for _, p, s in recording.seen if p == "/v1/classify"]
                assert classify[-3:] == [200, 429, 200]
                await c.delete("a")
            await admin.delete_tenant("async")

    asyncio.run(run())


# ---- request shapes and retry rules (httpx.MockTransport, no server) ------------------------------
def _mock(handler, **kwargs) -> Client:
    return Client("http://mock", api_key="k", transport=httpx.MockTransport(handler), retry=FAST_RETRY, **kwargs)


def _meta(prefix_id: str, version: int) -> dict[str, Any]:
    return {"prefix_id": prefix_id, "version": version, "sha256": "s", "kind": "lora", "labels": ["a"], "bytes": 1}


def test_versions_rollback_unpin_shapes() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.raw_path.decode(), body))
        assert request.headers["Authorization"] == "Bearer k"
        if request.url.path.endswith("/versions"):
            return httpx.Response(
                200, json={"prefix_id": "a/b", "current": 3, "pinned": 2, "versions": [_meta("a/b", 3)]}
            )
        if request.url.path.endswith("/rollback"):
            return httpx.Response(200, json=_meta("a/b", 2))
        return httpx.Response(200, json=_meta("a/b", 3))

    with _mock(handler) as c:
        v = c.versions("a/b")
        assert (v.current, v.pinned, [m.version for m in v.versions]) == (3, 2, [3])
        assert c.rollback("a/b", 2).version == 2
        assert c.unpin("a/b").version == 3
    assert seen == [
        ("GET", "/v1/prefixes/a%2Fb/versions", None),  # an id never adds a path segment
        ("POST", "/v1/prefixes/a%2Fb/rollback", {"version": 2}),
        ("DELETE", "/v1/prefixes/a%2Fb/pin", None),
    ]


def test_chunks_pin_the_first_version() -> None:
    bodies: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":  # prefixserve's /info is TEI's: max_client_batch_size
            return httpx.Response(200, json={"max_client_batch_size": 2})
        body = json.loads(request.content)
        bodies.append(body)
        version = body.get("version", 7) if body["inputs"] != ["t4"] else 8
        preds = [{"label": t, "score": 1.0, "scores": {t: 1.0}} for t in body["inputs"]]
        return httpx.Response(200, json={"prefix_id": "p", "version": version, "predictions": preds, "truncated": []})

    with _mock(handler) as c:
        result = c.classify("p", ["t0", "t1", "t2", "t3"])
        assert result.labels == ["t0", "t1", "t2", "t3"] and result.version == 7
        assert [b.get("version") for b in bodies] == [None, 7]  # later chunks name the first chunk's version
        with pytest.raises(ConflictError):  # a server answering another version is an error, not a mix
            c.classify("p", ["t0", "t1", "t4"], version=7)


def test_retries_503_but_never_an_upload_after_4xx() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "PUT":
            return httpx.Response(
                429, json={"error": {"code": "too_many_uploads", "message": "m"}}, headers={"Retry-After": "0"}
            )
        if len(calls) < 3:
            return httpx.Response(
                503, json={"error": {"code": "not_ready", "message": "m"}}, headers={"Retry-After": "0"}
            )
        return httpx.Response(200, json=_meta("x", 1))

    with _mock(handler) as c:
        assert c.get("x").version == 1 and calls == ["GET"] * 3
        calls.clear()
        with pytest.raises(PrefixServeError) as exc:
            c.upload("x", b"bytes")
        assert calls == ["PUT"] and (exc.value.status, exc.value.code) == (429, "too_many_uploads")


def test_transport_errors_and_foreign_errors() -> None:
    calls: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadTimeout("slow", request=request)

    with _mock(refuse) as c:
        with pytest.raises(PrefixServeError) as exc:
            c.upload("x", b"bytes")  # may have reached the server: not sent again
        assert calls == ["PUT"] and exc.value.code == "unreachable"
        calls.clear()
        with pytest.raises(PrefixServeError):
            c.list()  # idempotent: 1 + max_retries tries
        assert calls == ["GET"] * 4
    with (
        _mock(lambda r: httpx.Response(502, text="<html>bad gateway</html>")) as c,
        pytest.raises(PrefixServeError) as e,
    ):
        c.get("x")
    assert (e.value.status, e.value.code) == (502, "http_error")
    long_wait = httpx.Response(
        429, json={"error": {"code": "rate_limited", "message": "m"}}, headers={"Retry-After": "3600"}
    )
    with _mock(lambda r: long_wait) as c, pytest.raises(PrefixServeError) as e:
        c.classify("p", ["t"])  # an hour's Retry-After is not waited out
    assert e.value.retry_after == 3600


def test_url_and_key_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("PREFIXSERVE_URL", "http://from-env:9000/")
    monkeypatch.setenv("PREFIXSERVE_API_KEY", "envkey")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"prefixes": []})

    with Client(transport=httpx.MockTransport(handler)) as c:
        assert c.list() == []
    assert (
        str(seen[0].url) == "http://from-env:9000/v1/prefixes" and seen[0].headers["Authorization"] == "Bearer envkey"
    )
    monkeypatch.delenv("PREFIXSERVE_URL")
    assert Client(api_key="arg").base_url == "http://127.0.0.1:8000"


@pytest.mark.ray
def test_tenant_cli_over_http(app, monkeypatch, capsys) -> None:
    from prefixserve.server.main import main

    monkeypatch.delenv("PREFIXSERVE_ADMIN_KEY", raising=False)
    monkeypatch.setenv("PREFIXSERVE_API_KEY", app["admin_key"])  # the admin key never on the command line
    assert main(["tenant", "create", "clico", "--server", app["url"], "--json"]) == 0
    key = json.loads(capsys.readouterr().out)["api_key"]
    assert main(["tenant", "rotate-key", "clico", "--server", app["url"]]) == 0
    new_key = capsys.readouterr().out.strip()
    with Client(app["url"], api_key=new_key) as c:
        assert c.list() == []
    with Client(app["url"], api_key=key) as c, pytest.raises(PrefixServeError):
        c.list()  # rotated away
    assert main(["tenant", "delete", "clico", "--yes", "--server", app["url"]]) == 0
    assert main(["tenant", "delete", "clico", "--yes", "--server", app["url"]]) == 2  # gone: 404 on stderr
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]["code"] == "not_found"

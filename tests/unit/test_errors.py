"""The one error envelope: round trips (dict and pickle), subclass by code, and no internal text in a 500."""

from __future__ import annotations

import logging
import pickle

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from prefixserve.adapters.errors import (
    FingerprintMismatchError,
    InternalError,
    NotFoundError,
    PrefixServeError,
    QuotaExceededError,
    as_error,
)


@pytest.mark.parametrize(
    "exc",
    [
        NotFoundError("adapter 'x' not found"),
        FingerprintMismatchError("a != b"),
        QuotaExceededError("too many", code="quota_adapters"),
        PrefixServeError("slow down", code="rate_limited", status=429),
    ],
)
def test_round_trips_keep_class_code_and_status(exc):
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is type(exc) and (again.code, again.status, again.message) == (exc.code, exc.status, exc.message)
    back = PrefixServeError.from_dict(exc.to_dict(), status=exc.status)
    assert (back.code, back.status, back.message) == (exc.code, exc.status, exc.message)
    if exc.code == type(exc).code:  # a class's own code brings the class back; per-instance codes the base
        assert back == exc and type(back) is type(exc)
    assert exc.to_dict() == {"error": {"code": exc.code, "message": exc.message}}


def test_from_dict_picks_the_subclass_by_code():
    assert type(PrefixServeError.from_dict({"error": {"code": "not_found", "message": "m"}})) is NotFoundError
    unknown = PrefixServeError.from_dict({"code": "brand_new", "message": "m"}, status=418)
    assert type(unknown) is PrefixServeError and (unknown.code, unknown.status) == ("brand_new", 418)
    assert PrefixServeError.from_dict({}).code == "internal"


def test_unexpected_errors_hide_their_text(caplog):
    with caplog.at_level(logging.ERROR):
        err = as_error(RuntimeError("/etc/secret at 0xdeadbeef"), logging.getLogger("t"))
    assert isinstance(err, InternalError) and err.status == 500 and "secret" not in err.message
    incident = err.message.split("incident ")[1].split(")")[0]
    assert incident in caplog.text and "/etc/secret" in caplog.text  # the operator's log has it all
    mine = NotFoundError("x")
    assert as_error(mine) is mine


def test_http_handlers_use_the_envelope():
    from prefixserve.server import http_errors

    app = FastAPI()
    http_errors.install(app)

    @app.get("/ours")
    async def ours():
        raise QuotaExceededError("over", code="quota_bytes")

    @app.get("/boom")
    async def boom():
        raise KeyError("internal detail /var/lib/x")

    @app.get("/typed/{n}")
    async def typed(n: int):
        return {"n": n}

    client = TestClient(app, raise_server_exceptions=False)
    r = client.get("/ours")
    assert r.status_code == 429 and r.json() == {"error": {"code": "quota_bytes", "message": "over"}}
    r = client.get("/boom")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal" and "/var/lib" not in r.text
    r = client.get("/typed/x")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

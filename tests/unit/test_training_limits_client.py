"""The client's admin calls for a tenant's training limits against a scripted transport (no server): request
shapes (only the named fields, or ``{"default": true}``), the typed answer, and a reply of the wrong shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from prefixserve.adapters.errors import NotFoundError, PrefixServeError
from prefixserve.client import AsyncClient, Client, RetryPolicy, TrainingLimits
from tests.unit.test_training_client import Script, error

NO_WAIT = RetryPolicy(max_retries=2, backoff_s=0.0, max_backoff_s=0.0)
OWN: dict[str, Any] = {
    "default": False,
    "max_active_jobs": 2,
    "max_dataset_bytes": 0,
    "max_job_s": 90.5,
    "max_datasets": 7,
}
SERVER: dict[str, Any] = {
    "default": True,
    "max_active_jobs": 1,
    "max_dataset_bytes": 1024,
    "max_job_s": 600.0,
    "max_datasets": 3,
}


def answer(body: dict[str, Any]) -> tuple[int, bytes]:
    return 200, json.dumps({**body, "added_later": "ignored"}).encode()


def test_get_and_set_training_limits():
    script = Script(answer(SERVER), answer(OWN), answer(SERVER), error("not_found", 404), (200, b'{"default": true}'))
    with Client("http://t", api_key="admin", transport=httpx.MockTransport(script), retry=NO_WAIT) as c:
        shown = c.get_training_limits("acme")
        own = c.set_training_limits("acme", max_active_jobs=2, max_job_s=90.5)
        cleared = c.set_training_limits("acme", default=True, max_datasets=5)  # default wins: nothing else sent
        with pytest.raises(NotFoundError):
            c.get_training_limits("no/body")
        with pytest.raises(PrefixServeError) as err:  # a reply without the fields is not half-filled
            c.get_training_limits("acme")
    assert err.value.code == "bad_response"
    assert shown == TrainingLimits(**SERVER) and shown.default
    assert own == TrainingLimits(**OWN) and not own.default and own.max_job_s == 90.5
    assert cleared.default
    get, put, clear, missing, _ = script.requests
    assert (get.method, get.url.path) == ("GET", "/v1/tenants/acme/training-limits")
    assert (put.method, put.url.path) == ("PUT", "/v1/tenants/acme/training-limits")
    assert json.loads(put.content) == {"max_active_jobs": 2, "max_job_s": 90.5}  # unnamed fields are not sent
    assert json.loads(clear.content) == {"default": True}
    assert missing.url.raw_path == b"/v1/tenants/no%2Fbody/training-limits"  # an id never adds a path segment


def test_async_training_limits():
    script = Script(answer(OWN), answer(SERVER))

    async def main() -> tuple[TrainingLimits, TrainingLimits]:
        async with AsyncClient("http://t", api_key="admin", transport=httpx.MockTransport(script)) as c:
            return await c.set_training_limits("acme", max_dataset_bytes=0), await c.get_training_limits("acme")

    own, shown = asyncio.run(main())
    assert own == TrainingLimits(**OWN) and shown == TrainingLimits(**SERVER)
    assert json.loads(script.requests[0].content) == {"max_dataset_bytes": 0}  # 0 (unlimited) is sent
    assert [r.method for r in script.requests] == ["PUT", "GET"]

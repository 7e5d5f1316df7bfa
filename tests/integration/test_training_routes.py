"""The training routes on the real Ingress app without Ray (a stand-in Ingress object and a file store): the
switch, roles, fail-fast parsing that stores nothing, and the runner liveness rule."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import Request
from starlette.testclient import TestClient

from prefixserve.adapters.errors import ForbiddenError
from prefixserve.adapters.store import TrainingLimits, open_store
from prefixserve.server import state, training
from prefixserve.server.auth import Authenticator
from prefixserve.server.schemas import AppSettings
from prefixserve.server.training_schemas import TrainingOptions

ROUTES = [
    ("POST", "/v1/datasets"),
    ("GET", "/v1/datasets"),
    ("DELETE", "/v1/datasets/ds_" + "0" * 24),
    ("POST", "/v1/training-jobs"),
    ("GET", "/v1/training-jobs"),
    ("GET", "/v1/training-jobs/job_" + "0" * 24),
    ("GET", "/v1/training-jobs/job_" + "0" * 24 + "/events"),
    ("DELETE", "/v1/training-jobs/job_" + "0" * 24),
]
TSV = "id\tdocument\tlabel\n" + "".join(f"{i}\tgood movie {i}\t{i % 2}\n" for i in range(20))
JOB: dict[str, Any] = {"prefix_id": "sentiment", "kind": "prefix", "epochs": 1}


class StandIn(training.TrainingRoutes):
    """What the routes need of the Ingress: settings, store, the tenant check, the upload slot, worker info."""

    def __init__(self, store: Any, enabled: bool = True):
        self.settings = AppSettings.without_env(store="memory://", backbone="tiny", training={"enabled": enabled})
        self.store = store
        self._init_training()
        self.launched: list[str] = []

    async def _tenant(self, request: Request) -> str:
        principal = request.state.principal
        if principal.role != "tenant":
            raise ForbiddenError("tenant route")
        return principal.name

    def _upload_slot(self, tenant: str) -> Any:
        import contextlib

        return contextlib.nullcontext()

    async def worker_info(self) -> Any:
        return type("Info", (), {"fingerprint": "sha256:" + "1" * 64})()

    async def launch_job(self, record: Any, fingerprint: str) -> Any:  # no cluster here
        self.launched.append(record.job_id)
        return record


@pytest.fixture
def store(tmp_path) -> Iterator[Any]:
    s = open_store(f"file://{tmp_path / 'store'}")
    s.create_tenant("acme")
    yield s
    s.close()


@pytest.fixture
def serve(store) -> Iterator[Any]:
    """A function: (enabled) -> (TestClient, the stand-in Ingress)."""
    from prefixserve.server import ingress

    tenant_key = store.rotate_key("acme")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "settings", AppSettings.without_env(store="memory://"))
        mp.setattr(state, "auth", Authenticator(store, "admin-key"))

        def make(enabled: bool = True) -> tuple[TestClient, StandIn]:
            standin = StandIn(store, enabled)
            ingress.app.dependency_overrides[training.replica] = lambda: standin
            client = TestClient(ingress.app, headers={"Authorization": f"Bearer {tenant_key}"})
            return client, standin

        try:
            yield make
        finally:
            ingress.app.dependency_overrides.clear()


def test_switch_and_roles(serve):
    client, _ = serve(enabled=False)
    for method, path in ROUTES:
        body = {**JOB, "dataset_id": "ds_" + "0" * 24} if path == "/v1/training-jobs" else None  # a valid one
        r = client.request(method, path, json=body)
        assert r.status_code == 404 and r.json()["error"]["code"] == "training_disabled", (method, path, r.text)
        admin = client.request(method, path, json=body, headers={"Authorization": "Bearer admin-key"})
        assert admin.status_code == 403
        assert client.request(method, path, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    client, _ = serve(enabled=True)
    assert client.get("/v1/training-jobs").json() == {"jobs": []}


def test_bad_data_fails_fast_and_stores_nothing(serve, store):
    client, standin = serve()
    one_label = "id\tdocument\tlabel\n" + "".join(f"{i}\tgood movie {i}\t1\n" for i in range(20))
    for data, code in [(one_label, "bad_labels"), ("id\tdocument\tlabel\n1\t\t1\n", "empty_dataset")]:
        r = client.post("/v1/training-jobs", json={**JOB, "dataset": {"format": "tsv", "content": data}})
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
        assert "/tmp" not in r.json()["error"]["message"]
    r = client.post(
        "/v1/training-jobs", json={**JOB, "text_column": "nope", "dataset": {"format": "csv", "content": "a,b\n1,2\n"}}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_column" and "the inline dataset" in r.text
    r = client.post("/v1/datasets", params={"format": "jsonl"}, content=b"\xff\xfe not utf-8\n")
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_dataset"
    assert store.list_datasets("acme") == [] and store.list_jobs("acme") == [] and not standin.launched

    r = client.post("/v1/training-jobs", json={**JOB, "dataset": {"format": "tsv", "content": TSV, "name": "t.tsv"}})
    assert r.status_code == 202, r.text
    body = r.json()
    assert (
        body["state"] == "queued"
        and body["options"] == TrainingOptions(**{k: v for k, v in JOB.items() if k != "prefix_id"}).model_dump()
    )
    assert standin.launched == [body["job_id"]] and [d.name for d in store.list_datasets("acme")] == ["t.tsv"]
    r = client.post("/v1/training-jobs", json={**JOB, "dataset_id": body["dataset_id"]})  # one active job
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs" and r.headers["Retry-After"]
    assert len(store.list_datasets("acme")) == 1
    r = client.delete(f"/v1/datasets/{body['dataset_id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "dataset_in_use"
    r = client.delete(f"/v1/training-jobs/{body['job_id']}")
    assert r.status_code == 202 and r.json()["state"] == "cancelled" and r.json()["cancel_requested"]


def test_a_job_whose_runner_is_gone_fails_only_after_the_grace(store, monkeypatch):
    standin = StandIn(store)
    ds = store.put_dataset("acme", TSV.encode(), fmt="tsv", limits=TrainingLimits())
    job = store.create_job(
        "acme", prefix_id="s", dataset_id=ds.dataset_id, options=TrainingOptions().model_dump(), epochs=1,
        limits=TrainingLimits(),
    )  # fmt: skip
    job = store.update_job("acme", job.job_id, runner="train-x")
    asked: list[str] = []

    def alive(name: str) -> bool:
        asked.append(name)
        return name == "train-alive"

    monkeypatch.setattr(training, "runner_alive", alive)
    assert asyncio.run(standin.checked(job)) == job and asked == []  # just written: not even asked
    old = time.time() - training.RUNNER_GRACE_S - 1
    assert asyncio.run(standin.checked(dataclasses.replace(job, runner="train-alive", updated=old))).active
    unnamed = dataclasses.replace(job, runner=None, created=time.time())  # being launched: not asked
    assert asyncio.run(standin.checked(unnamed)).active and asked == ["train-alive"]
    lost = asyncio.run(standin.checked(dataclasses.replace(job, updated=old)))
    assert lost.state == "failed" and lost.error is not None and lost.error.code == "runner_lost"
    assert store.get_job("acme", job.job_id) == lost

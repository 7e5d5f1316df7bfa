"""Per-tenant training limits (an admin override of the server's ``training.limits``): stored with the tenant
(file:// and a real redis-server), the admin routes and their use by the training routes (the real app without
Ray, as in test_training_routes), and ``prefixserve tenant training-limits``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
from starlette.testclient import TestClient

from prefixserve.adapters.errors import BadRequestError, NotFoundError
from prefixserve.adapters.ratelimit import RateLimits
from prefixserve.adapters.store import TrainingLimits, open_store
from prefixserve.server import state, training
from prefixserve.server.auth import Authenticator
from prefixserve.server.schemas import AppSettings, TrainingLimitsIn
from tests.integration import test_store_behaviour as behaviour
from tests.integration.test_store_cli import run, store_url  # noqa: F401 (store_url: a fixture)
from tests.integration.test_training_routes import JOB, TSV, StandIn

backend = behaviour.backend  # file:// and a real redis-server
OWN = TrainingLimits(max_active_jobs=2, max_dataset_bytes=0, max_job_s=90.5, max_datasets=7)
SERVER = TrainingLimits(max_active_jobs=1, max_dataset_bytes=2**20, max_job_s=600.0, max_datasets=3)


# ---- the store ---------------------------------------------------------------------------------------
def test_training_limits_are_stored_with_the_tenant(backend):
    store, other = backend(), backend()
    store.create_tenant("acme")
    store.create_tenant("globex")
    assert store.tenant_info("acme").training_limits is None  # the server's default
    store.set_training_limits("acme", OWN)
    assert other.tenant_info("acme").training_limits == OWN  # persisted, not cached
    assert {t.name: t.training_limits for t in other.list_tenants()} == {"acme": OWN, "globex": None}
    assert other.tenant_info("acme").to_dict()["training_limits"] == OWN.to_dict()
    assert other.tenant_info("acme").limits is None  # the rate limits are another set
    zero = TrainingLimits(max_active_jobs=0, max_dataset_bytes=0, max_job_s=0, max_datasets=0)
    store.set_training_limits("acme", zero)  # all unlimited is a set of its own, not "the default"
    assert other.tenant_info("acme").training_limits == zero
    store.set_limits("acme", RateLimits(requests_per_s=1.0))
    store.set_training_limits("acme", None)
    info = other.tenant_info("acme")
    assert info.training_limits is None and info.to_dict()["training_limits"] is None
    assert info.limits == RateLimits(requests_per_s=1.0)  # clearing one set leaves the other
    with pytest.raises(NotFoundError):
        store.set_training_limits("nobody", OWN)
    for wrong in ({"max_active_jobs": 2}, RateLimits()):
        with pytest.raises(BadRequestError):
            store.set_training_limits("acme", wrong)
    store.set_training_limits("globex", OWN)
    store.delete_tenant("globex")
    with pytest.raises(NotFoundError):
        other.tenant_info("globex")
    store.create_tenant("globex")
    assert other.tenant_info("globex").training_limits is None  # a recreated tenant starts from the default


def test_redis_writes_or_clears_all_four_fields(redis_server, redis_prefix):
    store = open_store(f"{redis_server.url}?prefix={redis_prefix}")
    try:
        store.create_tenant("acme")
        raw = redis_server.client()  # the record's hash, as the script left it

        def fields() -> dict[str, str]:
            rec = raw.hgetall(f"{redis_prefix}t:acme")
            return {k.decode(): v.decode() for k, v in rec.items() if k.decode().startswith("tl_")}

        assert fields() == {}
        store.set_training_limits("acme", OWN)
        assert fields() == {
            "tl_max_active_jobs": "2",
            "tl_max_dataset_bytes": "0",
            "tl_max_job_s": "90.5",
            "tl_max_datasets": "7",
        }
        store.set_training_limits("acme", None)
        assert fields() == {} and raw.exists(f"{redis_prefix}t:acme")
    finally:
        store.close()


# ---- the routes ----------------------------------------------------------------------------------------
def real_ingress() -> Any:
    from prefixserve.server import ingress  # imported late, as in test_training_routes

    return cast(Any, ingress.Ingress).func_or_class  # the class under @serve.deployment


class Replica(StandIn):
    """The routes' stand-in Ingress with the real Ingress's admin check and the server's limits set to SERVER."""

    @staticmethod
    def _principal(request: Any, *roles: str) -> Any:
        return real_ingress()._principal(request, *roles)

    def _admin(self, request: Any) -> None:
        real_ingress()._admin(self, request)

    def __init__(self, store: Any):
        super().__init__(store)
        self.settings = AppSettings.without_env(
            store="memory://", backbone="tiny", training={"limits": SERVER.to_dict(), "num_gpus": 0}
        )


@pytest.fixture
def store(tmp_path) -> Iterator[Any]:
    s = open_store(f"file://{tmp_path / 'store'}")
    s.create_tenant("acme")
    yield s
    s.close()


@pytest.fixture
def serve(store) -> Iterator[tuple[TestClient, Replica, dict[str, str]]]:
    """(a TestClient with acme's key, the stand-in Ingress, the admin's headers)."""
    from prefixserve.server import ingress

    tenant_key = store.rotate_key("acme")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(state, "settings", AppSettings.without_env(store="memory://"))
        mp.setattr(state, "auth", Authenticator(store, "admin-key"))
        replica = Replica(store)
        ingress.app.dependency_overrides[training.replica] = lambda: replica
        try:
            client = TestClient(ingress.app, headers={"Authorization": f"Bearer {tenant_key}"})
            yield client, replica, {"Authorization": "Bearer admin-key"}
        finally:
            ingress.app.dependency_overrides.clear()


def submit(client: TestClient) -> Any:
    return client.post("/v1/training-jobs", json={**JOB, "dataset": {"format": "tsv", "content": TSV}})


def test_admin_routes_roles_and_unknown_tenants(serve, store):
    client, _, admin = serve
    path = "/v1/tenants/acme/training-limits"
    for method, body in (("GET", None), ("PUT", {"default": True})):
        r = client.request(method, path, json=body)  # acme's own key
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert client.request(method, path, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        r = client.request(method, "/v1/tenants/nobody/training-limits", json=body, headers=admin)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    assert store.tenant_info("acme").training_limits is None  # the refused PUTs changed nothing

    r = client.get(path, headers=admin)
    assert r.status_code == 200 and r.json() == {"default": True, **SERVER.to_dict()}
    r = client.put(path, json={"max_active_jobs": 2, "max_job_s": 90.5}, headers=admin)
    own = TrainingLimits(max_active_jobs=2, max_job_s=90.5)  # fields left out: TrainingLimits' defaults
    assert r.status_code == 200 and r.json() == {"default": False, **own.to_dict()}
    assert store.tenant_info("acme").training_limits == own
    assert client.get(path, headers=admin).json() == r.json()
    for bad in ({"max_active_jobs": -1}, {"max_job_s": "inf"}, {"max_jobs": 2}):
        r = client.put(path, json=bad, headers=admin)
        assert r.status_code == 422, (bad, r.text)
    assert store.tenant_info("acme").training_limits == own
    r = client.put(path, json={"default": True}, headers=admin)
    assert r.status_code == 200 and r.json() == {"default": True, **SERVER.to_dict()}
    assert store.tenant_info("acme").training_limits is None


def test_a_tenant_with_its_own_limit_runs_two_jobs_where_the_default_is_one(serve, store):
    client, _, admin = serve
    first = submit(client)
    assert first.status_code == 202, first.text
    r = submit(client)  # the server's default: one active job
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
    r = client.put("/v1/tenants/acme/training-limits", json={"max_active_jobs": 2}, headers=admin)
    assert r.status_code == 200
    second = submit(client)  # at once on this replica (the PUT dropped its cached limits)
    assert second.status_code == 202, second.text
    r = submit(client)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
    assert len([j for j in store.list_jobs("acme") if j.active]) == 2

    for job in (first, second):
        assert client.delete(f"/v1/training-jobs/{job.json()['job_id']}").status_code == 202
    assert client.put("/v1/tenants/acme/training-limits", json={"default": True}, headers=admin).status_code == 200
    assert submit(client).status_code == 202
    assert submit(client).status_code == 429  # back to the server's one


def test_dataset_limits_come_from_the_tenant_too(serve, store):
    client, _, admin = serve
    for _ in range(SERVER.max_datasets):
        assert client.post("/v1/datasets", params={"format": "tsv"}, content=TSV.encode()).status_code == 201
    r = client.post("/v1/datasets", params={"format": "tsv"}, content=TSV.encode())
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_datasets"
    client.put("/v1/tenants/acme/training-limits", json={"max_datasets": SERVER.max_datasets + 1}, headers=admin)
    assert client.post("/v1/datasets", params={"format": "tsv"}, content=TSV.encode()).status_code == 201
    r = client.put("/v1/tenants/acme/training-limits", json={"max_dataset_bytes": 10}, headers=admin)
    assert r.json()["max_datasets"] == TrainingLimits().max_datasets  # a PUT replaces the whole set
    r = client.post("/v1/datasets", params={"format": "tsv"}, content=TSV.encode())
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_dataset_bytes"
    assert len(store.list_datasets("acme")) == SERVER.max_datasets + 1


def test_other_replicas_reread_the_limits_after_the_ttl(store, monkeypatch):
    this, other = Replica(store), Replica(store)
    assert asyncio.run(other.training_limits("acme")) == SERVER  # read and cached
    store.set_training_limits("acme", OWN)  # what a PUT on another replica does
    assert asyncio.run(other.training_limits("acme")) == SERVER  # within the TTL: the cached limits
    assert asyncio.run(this.training_limits("acme")) == OWN  # nothing cached: read now
    monkeypatch.setattr(training, "LIMITS_TTL_S", 0.0)
    assert asyncio.run(other.training_limits("acme")) == OWN  # past the TTL: read again


def test_the_runner_gets_the_tenants_max_job_s(store, monkeypatch):
    class Launching(Replica):
        launch_job = training.TrainingRoutes.launch_job  # the real one, with launch() stubbed below

    specs: list[Any] = []

    def launch(spec: Any, **resources: float) -> Any:
        specs.append(spec)
        return asyncio.sleep(0)  # the runner "exits" at once

    monkeypatch.setattr(training, "launch", launch)
    monkeypatch.setattr(training, "runner_alive", lambda name: True)
    ds = store.put_dataset("acme", TSV.encode(), fmt="tsv", limits=TrainingLimits(max_active_jobs=0))
    for own, expected in ((None, SERVER.max_job_s), (OWN, OWN.max_job_s)):
        store.set_training_limits("acme", own)
        record = store.create_job(
            "acme",
            prefix_id="s",
            dataset_id=ds.dataset_id,
            options={},
            epochs=1,
            limits=TrainingLimits(max_active_jobs=0),
        )
        launched = asyncio.run(Launching(store).launch_job(record, "sha256:" + "1" * 64))
        assert launched.runner and specs[-1].job_id == record.job_id and specs[-1].max_job_s == expected


def test_the_body_examples_validate():
    examples = TrainingLimitsIn.model_json_schema()["examples"]
    limits = [TrainingLimitsIn.model_validate(e).to_limits() for e in examples]
    assert isinstance(limits[0], TrainingLimits) and limits[0].max_active_jobs == 2 and limits[1] is None


# ---- the CLI -------------------------------------------------------------------------------------------
def test_tenant_training_limits_command(capsys, store_url):  # noqa: F811 (the fixture)
    rc, _, _ = run(capsys, "tenant", "create", "acme", "--store", store_url)
    assert rc == 0
    t = ["--store", store_url]
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t, "--json")
    assert rc == 0 and json.loads(out)["training_limits"] is None  # the server's default
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t)
    assert out.splitlines()[0].split() == [
        "TENANT",
        "MAX_ACTIVE_JOBS",
        "MAX_DATASET_BYTES",
        "MAX_JOB_S",
        "MAX_DATASETS",
    ]
    assert out.splitlines()[1].split() == ["acme", "default", "default", "default", "default"]
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t, "--max-active-jobs", "3", "--json")
    assert rc == 0
    assert json.loads(out)["training_limits"] == TrainingLimits(max_active_jobs=3).to_dict()
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t, "--max-job-s", "120", "--max-dataset-bytes", "0")
    assert rc == 0  # the other fields kept their values; 0 (unlimited) shows as "-"
    assert out.splitlines()[1].split() == ["acme", "3", "-", "120.0", str(TrainingLimits().max_datasets)]
    rc, out, _ = run(capsys, "tenant", "list", *t, "--json")
    assert json.loads(out)[0]["training_limits"]["max_job_s"] == 120.0 and json.loads(out)[0]["limits"] is None
    for bad in (["--max-datasets", "-1"], ["--default", "--max-active-jobs", "1"]):
        rc, _, err = run(capsys, "tenant", "training-limits", "acme", *t, *bad)
        assert rc == 2 and json.loads(err)["error"]["code"] == "bad_limits"
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t, "--json")
    assert json.loads(out)["training_limits"]["max_datasets"] == TrainingLimits().max_datasets  # unchanged
    rc, out, _ = run(capsys, "tenant", "training-limits", "acme", *t, "--default", "--json")
    assert rc == 0 and json.loads(out)["training_limits"] is None
    rc, _, err = run(capsys, "tenant", "training-limits", "nobody", *t, "--max-datasets", "1")
    assert rc == 2 and json.loads(err)["error"]["code"] == "not_found"

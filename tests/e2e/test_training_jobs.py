"""End-to-end: training as a service over HTTP on a live Ray Serve app (file store, a tiny learnable backbone).

A job runs as a Ray actor beside the app: submitted with inline data, followed over server-sent events, its
adapter published and served by classify; the same job again does not beat it and is not published; a
cancel stops a running job; the app is deleted and deployed again while a job runs, and the job still
finishes and is readable; datasets are parsed at upload (bad rows counted); limits (one active job, dataset
bytes, body size) answer 429 / 413; another tenant gets 404 on every route, the admin key 403."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefixserve.adapters.errors import NotFoundError, PrefixServeError
from prefixserve.adapters.store import open_store
from prefixserve.client import Client, TrainingJob
from tests.e2e.test_server import bearer
from tests.fixtures.backbones import learnable_backbone
from tests.fixtures.served_app import GENEROUS_LIMITS, served_app
from tests.integration.test_trainer import write_tsv

pytest.importorskip("httpx")
pytestmark = pytest.mark.ray

APP = "prefixserve-training"
TRAINING = {
    "num_cpus": 0.5,  # the session cluster advertises 4 CPUs: Ingress 0.5 + Worker 0.5 + one runner
    "torch_threads": 1,
    "limits": {"max_active_jobs": 1, "max_dataset_bytes": 120_000, "max_datasets": 10, "max_job_s": 600},
    "max_upload_bytes": 150_000,
}
OPTIONS: dict[str, Any] = dict(
    kind="prefix", num_virtual_tokens=4, epochs=5, batch_size=16, eval_split=0.25, patience=0, seed=3
)
SLOW: dict[str, Any] = dict(OPTIONS, epochs=40, batch_size=4)  # long enough to cancel (~10 s here)
RESTART: dict[str, Any] = dict(SLOW, batch_size=2)  # ~25 s here: outlasts a delete + redeploy of the app with room


@pytest.fixture(scope="module")
def server(ray_serve, tmp_path_factory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("training")
    backbone = learnable_backbone(tmp / "backbone", "roberta", 5)
    data = Path(write_tsv(tmp / "train.tsv", 400, 0))
    store = f"file://{tmp / 'store'}"
    with served_app(ray_serve, APP, backbone, store, tmp, training=TRAINING, default_limits=GENEROUS_LIMITS) as a:
        keys = {}
        with Client(a.url, api_key=a.admin_key) as admin:
            for tenant in ("acme", "globex"):
                keys[tenant] = admin.create_tenant(tenant).api_key
        yield {"app": a, "url": a.url, "keys": keys, "data": data, "ray_serve": ray_serve, "tmp": tmp}


def client(server: dict[str, Any], tenant: str = "acme") -> Client:
    return Client(server["url"], api_key=server["keys"][tenant], timeout=120.0)


def watch_until(c: Client, job_id: str, done: Any) -> TrainingJob:
    """Follow the event stream until ``done(record)``; the record that satisfied it."""
    for job in c.watch_training(job_id):
        if done(job):
            return job
    raise AssertionError(f"the stream of {job_id} ended before the condition held")


def test_datasets_are_parsed_at_upload_and_limited(server):
    c, http = client(server), server["app"].client
    key = server["keys"]["acme"]
    bad = b"id\tdocument\tlabel\n1\tno label\t\n2\t\t1\n3\ttoo\tmany\tcells\n"
    r = http.post("/v1/datasets", params={"format": "tsv"}, content=bad, headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_dataset", r.text
    assert "missing_label 1" in r.json()["error"]["message"] and "unparsable 1" in r.json()["error"]["message"]

    raw = server["data"].read_bytes() + b"x\ty\n\t\t0\n"  # plus one unparsable row and one without text
    ds = c.upload_dataset(raw, format="tsv", name="train.tsv")
    assert ds.rows == 400 and ds.bad_rows == {"missing_text": 1, "unparsable": 1} and ds.labels == ("0", "1")
    assert [d.dataset_id for d in c.list_datasets()] == [ds.dataset_id] and ds.bytes == len(raw)

    big = b"id\tdocument\tlabel\n" + b"".join(f"{i}\t{'w' * 100}\t{i % 2}\n".encode() for i in range(1100))
    with pytest.raises(PrefixServeError) as err:
        c.upload_dataset(big, format="tsv")  # 120 kB more than this tenant may store
    assert err.value.status == 429 and err.value.code == "quota_dataset_bytes"
    r = http.post("/v1/datasets", content=big + big, headers=bearer(key))  # over training.max_upload_bytes
    assert r.status_code == 413
    assert http.get("/v1/datasets", headers=bearer(server["app"].admin_key)).status_code == 403

    with client(server, "globex") as other:
        assert other.list_datasets() == []
        with pytest.raises(NotFoundError):
            other.delete_dataset(ds.dataset_id)
    c.delete_dataset(ds.dataset_id)
    assert c.list_datasets() == []


def test_job_trains_publishes_and_serves_then_a_tie_is_not_published(server):
    with client(server) as c:
        job = c.submit_training("sentiment", data=server["data"], **OPTIONS)
        assert job.state in ("queued", "running") and job.epochs == OPTIONS["epochs"]
        with pytest.raises(PrefixServeError) as err:  # one active job per tenant here: nothing stored
            c.submit_training("other", dataset_id=job.dataset_id, **OPTIONS)
        assert err.value.status == 429 and err.value.code == "too_many_jobs"
        assert [d.dataset_id for d in c.list_datasets()] == [job.dataset_id]  # the inline data, stored

        with client(server, "globex") as other:  # 404 on every route, whatever the state
            for call in (other.training_job, other.cancel_training, lambda j: list(other.watch_training(j))):
                with pytest.raises(NotFoundError):
                    call(job.job_id)
            assert other.list_training_jobs() == []
            with pytest.raises(NotFoundError):
                other.submit_training("x", dataset_id=job.dataset_id, **OPTIONS)

        seen = list(c.watch_training(job.job_id))
        done = seen[-1]
        assert done.state == "succeeded" and [s.state for s in seen[:-1]].count("succeeded") == 0
        assert [e.epoch for e in done.history] == [1, 2, 3, 4, 5]
        assert [s.epoch for s in seen] == sorted(s.epoch for s in seen)  # progress only moves forward
        assert done.result["decision"] == "first_version" and done.published_version == 1
        assert done.result["new"]["accuracy"] > 0.7 and done.result["eval_rows"] == 100
        answer = c.classify("sentiment", ["good great fun", "bad terrible boring"])
        assert answer.version == 1 and set(answer.labels) <= {"0", "1"}
        assert c.list_training_jobs()[0].job_id == job.job_id

        again = c.submit_training("sentiment", dataset_id=job.dataset_id, **OPTIONS)
        tie = watch_until(c, again.job_id, lambda j: j.done)
        assert tie.state == "succeeded" and tie.result["decision"] == "not_better" and tie.published_version is None
        assert c.get("sentiment").version == 1

    metrics = server["app"].client.get("/metrics", headers=bearer(server["app"].admin_key)).text
    deadline = time.monotonic() + 10  # counted once the runner actor has exited
    while 'prefixserve_training_jobs_total{state="succeeded"} 2.0' not in metrics and time.monotonic() < deadline:
        time.sleep(0.5)
        metrics = server["app"].client.get("/metrics", headers=bearer(server["app"].admin_key)).text
    assert 'prefixserve_training_jobs_total{state="succeeded"} 2.0' in metrics


def test_cancel_stops_a_running_job(server):
    with client(server) as c:
        ds = c.upload_dataset(server["data"])  # each test its own: any one of them runs alone too
        job = c.submit_training("cancelled", dataset_id=ds.dataset_id, **SLOW)
        watch_until(c, job.job_id, lambda j: j.epoch >= 1)
        asked = c.cancel_training(job.job_id)
        assert asked.cancel_requested and asked.state in ("running", "cancelled")
        done = watch_until(c, job.job_id, lambda j: j.done)
        assert done.state == "cancelled" and done.result is None and 1 <= done.epoch < SLOW["epochs"]
        with pytest.raises(NotFoundError):
            c.get("cancelled")
        r = server["app"].client.delete(f"/v1/datasets/{ds.dataset_id}", headers=bearer(server["keys"]["globex"]))
        assert r.status_code == 404


def test_a_job_outlives_a_restart_of_the_app(server):
    import ray
    from ray import serve

    from prefixserve.server.app import build_app
    from prefixserve.server.training_runner import NAMESPACE, runner_name

    with client(server) as c:
        ds = c.upload_dataset(server["data"])
        job = c.submit_training("restarted", dataset_id=ds.dataset_id, **RESTART)
        watch_until(c, job.job_id, lambda j: j.epoch >= 1)
    serve.delete(APP)  # the Ingress that launched the job is gone
    deleted = time.time()
    with contextlib.closing(open_store(server["app"].settings["store"])) as store:  # no app to ask now
        assert store.get_job("acme", job.job_id).state == "running", "it ended before the restart: slow SLOW down"
    ray.get_actor(runner_name(job.job_id), namespace=NAMESPACE)  # the runner is not: it is detached
    serve.run(build_app(server["app"].settings), name=APP, route_prefix="/")
    with client(server) as c:
        done = watch_until(c, job.job_id, lambda j: j.done)
        assert done.state == "succeeded" and (done.finished or 0) > deleted and len(done.history) == RESTART["epochs"]
        assert done.result["decision"] == "first_version" and done.published_version == 1
        assert c.training_job(job.job_id) == done
        assert c.classify("restarted", ["good great fun"]).version == 1

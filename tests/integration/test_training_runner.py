"""A training job's runner (``server/training_runner.JobRun``) in-process, without Ray: a file store, a tiny
learnable backbone; training, progress records, the publish decision, cancel, time limit and failures."""

from __future__ import annotations

from typing import Any

import pytest

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.engine import Engine
from prefixserve.adapters.errors import NotFoundError
from prefixserve.adapters.store import JobRecord, TrainingLimits, open_store
from prefixserve.server.training_data import dataset_file
from prefixserve.server.training_runner import JobRun, RunnerSpec, evaluate, run_job
from prefixserve.server.training_schemas import JobResult, TrainingOptions
from prefixserve.trainer.data import load_datasets
from tests.fixtures.backbones import learnable_backbone
from tests.integration.test_trainer import write_tsv

pytestmark = pytest.mark.usefixtures("one_thread")
LIMITS = TrainingLimits(max_datasets=0, max_dataset_bytes=0, max_active_jobs=0)
OPTIONS: dict[str, Any] = dict(
    kind="prefix", num_virtual_tokens=4, epochs=5, batch_size=16, eval_split=0.25, patience=0, seed=3
)


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> str:
    return learnable_backbone(tmp_path_factory.mktemp("learnable"), "roberta", 5)


@pytest.fixture(scope="module")
def fingerprint(backbone_dir) -> str:
    return load_backbone(backbone_dir, device="cpu").fingerprint


@pytest.fixture(scope="module")
def tsv(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("data") / "train.tsv"
    write_tsv(path, 400, 0)
    return path.read_bytes()


@pytest.fixture
def store(tmp_path):
    s = open_store(f"file://{tmp_path / 'store'}")
    s.create_tenant("acme")
    yield s
    s.close()


def spec(backbone_dir: str, fingerprint: str, job: JobRecord, **kw: Any) -> RunnerSpec:
    values: dict[str, Any] = dict(
        store="-", tenant=job.tenant, job_id=job.job_id, backbone=backbone_dir, fingerprint=fingerprint
    )
    values.update(device="cpu", torch_threads=1, max_job_s=600.0)
    values.update(kw)
    return RunnerSpec(**values)


def queue(store, data: bytes, fmt: str = "tsv", **options: Any) -> JobRecord:
    ds = store.put_dataset("acme", data, fmt=fmt, name="train", limits=LIMITS)
    opts = TrainingOptions(**{**OPTIONS, **options})
    return store.create_job(
        "acme", prefix_id="sentiment", dataset_id=ds.dataset_id, options=opts.model_dump(), epochs=opts.epochs,
        limits=LIMITS,
    )  # fmt: skip


def run(store, backbone_dir, fingerprint, data: bytes, **options: Any) -> tuple[JobRecord, JobResult | None]:
    job = queue(store, data, **options)
    state = JobRun(spec(backbone_dir, fingerprint, job), store, poll_s=0.0).run()
    record = store.get_job("acme", job.job_id)
    assert record.state == state
    return record, JobResult.model_validate(record.result) if record.result else None


def test_publishes_first_then_only_what_beats_the_served_version(store, backbone_dir, fingerprint, tsv):
    record, result = run(store, backbone_dir, fingerprint, tsv)
    assert record.state == "succeeded" and record.error is None and record.finished is not None
    assert [e.epoch for e in record.history] == [1, 2, 3, 4, 5] and record.epoch == record.epochs == 5
    assert all(e.eval_accuracy is not None for e in record.history)
    assert result is not None and result.published and result.decision == "first_version" and result.baseline is None
    head = store.head("acme", "sentiment")
    assert head.version == result.version and head.meta["kind"] == "prefix" and result.labels == ["0", "1"]
    assert result.train_rows == 300 and result.eval_rows == result.new.rows == 100 and result.trainable_params > 0

    # the published scores are the serving engine's own on the job's eval split
    backbone = load_backbone(backbone_dir, device="cpu")
    _, data = store.get("acme", "sentiment")
    with dataset_file(tsv, "tsv", "x") as path:
        _, ev, labels = load_datasets(TrainingOptions(**OPTIONS).train_config(backbone="b", train=str(path), fmt="tsv"))
    assert evaluate(Engine(backbone), data, "check", ev.examples, labels) == result.new
    assert result.new.accuracy > 0.7  # it learnt the task (chance: 0.5)

    # the same job again trains the same adapter: a tie keeps the served version
    record, again = run(store, backbone_dir, fingerprint, tsv)
    assert record.state == "succeeded" and again is not None and not again.published and again.version is None
    assert again.decision == "not_better" and again.baseline is not None and again.baseline.version == head.version
    assert (again.new.accuracy, again.new.macro_f1) == (again.baseline.accuracy, again.baseline.macro_f1)
    assert store.head("acme", "sentiment").version == head.version

    # force publishes it, and says so
    record, forced = run(store, backbone_dir, fingerprint, tsv, force=True)
    assert forced is not None and forced.published and forced.decision == "forced"
    assert store.head("acme", "sentiment").version == forced.version > head.version

    # other labels: not comparable, not published
    record, other = run(store, backbone_dir, fingerprint, tsv, label_names=["neg", "pos"])
    assert other is not None and other.decision == "labels_differ" and not other.published
    assert store.head("acme", "sentiment").version == forced.version


class CancelAfterFirstEpoch:
    """The store, except that the tenant cancels the job as soon as its first epoch is recorded."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def update_job(self, tenant: str, job_id: str, **changes: Any) -> JobRecord:
        record = self.store.update_job(tenant, job_id, **changes)
        if changes.get("epoch") == 1:
            self.store.request_cancel(tenant, job_id)
        return record


def test_cancel_stops_training_and_publishes_nothing(store, backbone_dir, fingerprint, tsv):
    job = queue(store, tsv, epochs=20)
    state = JobRun(spec(backbone_dir, fingerprint, job), CancelAfterFirstEpoch(store), poll_s=0.0).run()
    record = store.get_job("acme", job.job_id)
    assert state == record.state == "cancelled" and record.cancel_requested and record.result is None
    assert record.epoch == 1 and len(record.history) == 1 and record.epochs == 20
    with pytest.raises(NotFoundError):
        store.head("acme", "sentiment")

    queued = queue(store, tsv)
    store.request_cancel("acme", queued.job_id)  # cancelled while queued: the runner does nothing
    assert JobRun(spec(backbone_dir, fingerprint, queued), store).run() == "cancelled"
    assert store.get_job("acme", queued.job_id).started is None


def test_time_limit_bad_data_and_backbone_mismatch_fail_with_a_code(store, backbone_dir, fingerprint, tsv):
    job = queue(store, tsv)
    JobRun(spec(backbone_dir, fingerprint, job, max_job_s=1e-6), store).run()
    record = store.get_job("acme", job.job_id)
    assert record.state == "failed" and record.error is not None and record.error.code == "job_timeout"

    one_label = b"id\tdocument\tlabel\n" + b"".join(f"{i}\tgood movie {i}\t1\n".encode() for i in range(20))
    record, _ = run(store, backbone_dir, fingerprint, one_label)
    assert record.state == "failed" and record.error is not None and record.error.code == "bad_labels"
    assert "dataset ds_" in record.error.message and "/tmp" not in record.error.message  # no server paths

    job = queue(store, tsv)
    JobRun(spec(backbone_dir, "sha256:" + "0" * 64, job), store).run()
    record = store.get_job("acme", job.job_id)
    assert record.state == "failed" and record.error is not None and record.error.code == "backbone_mismatch"
    assert record.history == ()  # refused before training
    with pytest.raises(NotFoundError):
        store.head("acme", "sentiment")


@pytest.mark.redis
def test_run_job_opens_the_store_by_url_redis(redis_server, redis_prefix, backbone_dir, fingerprint, tsv):
    """What the actor calls: ``run_job`` opens the store from the spec's URL (here Redis) and closes it."""
    url = f"{redis_server.url}?prefix={redis_prefix}"
    store: Any = open_store(url)
    try:
        store.create_tenant("acme")
        job = queue(store, tsv, epochs=2)
        assert run_job(spec(backbone_dir, fingerprint, job, store=url)) == "succeeded"
        record = store.get_job("acme", job.job_id)
        assert record.state == "succeeded" and len(record.history) == 2 and record.result is not None
        assert record.result["published"] and store.head("acme", "sentiment").version == record.result["version"]
        assert run_job(spec(backbone_dir, fingerprint, job, store=url)) == "succeeded"  # a finished job: untouched
        assert store.get_job("acme", job.job_id) == record
    finally:
        store.close()

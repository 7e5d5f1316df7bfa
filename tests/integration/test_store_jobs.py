"""Training datasets and job records in the store (issue #16), for file:// and a real redis-server:
round trips, per-tenant isolation (404), limits, terminal records, cancel, purge on delete_tenant,
persistence across store objects, id checks, races, and 503s that leave nothing half-written."""

from __future__ import annotations

import errno
import threading

import pytest

from prefixserve.adapters.errors import (
    BadRequestError,
    ConflictError,
    InvalidIdError,
    NotFoundError,
    QuotaExceededError,
    RateLimitedError,
    StoreUnavailableError,
)
from prefixserve.adapters.store import (
    DatasetInfo,
    EpochRecord,
    JobError,
    JobRecord,
    TrainingLimits,
    TrainingStore,
    open_store,
)
from prefixserve.adapters.store.file import FileStore
from prefixserve.adapters.store.redis_store import RedisStore
from tests.fixtures.redis_server import RedisServer
from tests.integration import test_store_behaviour as behaviour
from tests.integration.test_store_redis import refusing_writes
from tests.integration.test_store_safety import FailingDisk, files_under

backend = behaviour.backend  # the same two-backend fixture: file:// and a real redis-server
LIMITS = TrainingLimits()
TSV = b"id\tdocument\tlabel\n1\tgood movie\t1\n2\tbad movie\t0\n"


def dataset(n: int = 0, size: int = 200) -> bytes:
    return f"{n}\t".encode() + b"x" * size + b"\n"


def queue_job(store, tenant: str = "acme", *, limits: TrainingLimits = LIMITS, epochs: int = 3) -> JobRecord:
    ds = store.put_dataset(tenant, TSV, fmt="tsv", name="train.tsv", limits=TrainingLimits(max_datasets=0))
    return store.create_job(
        tenant, prefix_id="sentiment", dataset_id=ds.dataset_id, options={"lr": 0.01}, epochs=epochs, limits=limits
    )


@pytest.fixture
def store(backend):
    s = backend()
    s.create_tenant("acme")
    s.create_tenant("globex")
    return s


def test_dataset_round_trip_list_and_delete(store):
    assert isinstance(store, TrainingStore)
    info = store.put_dataset("acme", TSV, fmt="tsv", name="nsmc train.tsv", limits=LIMITS)
    assert info.dataset_id.startswith("ds_") and (info.tenant, info.format, info.size) == ("acme", "tsv", len(TSV))
    assert info.name == "nsmc train.tsv" and info.matches(TSV) and not info.matches(TSV + b"\n")
    assert store.dataset_info("acme", info.dataset_id) == info
    assert store.get_dataset("acme", info.dataset_id) == (info, TSV)
    second = store.put_dataset("acme", b'{"text": "a", "label": 1}\n', fmt="jsonl", limits=LIMITS)
    assert second.dataset_id != info.dataset_id and second.name == ""
    assert [d.dataset_id for d in store.list_datasets("acme")] == [second.dataset_id, info.dataset_id]
    assert DatasetInfo.from_json(info.to_json()) == info
    store.delete_dataset("acme", info.dataset_id)
    for call in (store.dataset_info, store.get_dataset, store.delete_dataset):
        with pytest.raises(NotFoundError):
            call("acme", info.dataset_id)
    assert store.list_datasets("acme") == [second]


def test_bad_uploads_are_400s_that_store_nothing(store):
    for data, fmt, name in [(b"", "tsv", ""), (TSV, "xlsx", ""), (TSV, "csv", "a\nb"), (TSV, "csv", "n" * 256)]:
        with pytest.raises(BadRequestError):
            store.put_dataset("acme", data, fmt=fmt, name=name, limits=LIMITS)
    with pytest.raises(BadRequestError):
        store.put_dataset("acme", TSV, fmt="tsv", limits={"max_datasets": 1})  # not TrainingLimits
    assert store.list_datasets("acme") == []
    with pytest.raises(NotFoundError):
        store.put_dataset("nobody", TSV, fmt="tsv", limits=LIMITS)


def test_job_round_trip_progress_and_listing(store):
    job = queue_job(store)
    assert job.job_id.startswith("job_") and (job.state, job.epoch, job.epochs, job.active) == ("queued", 0, 3, True)
    assert job.options == {"lr": 0.01} and job.started is None and job.finished is None and job.created == job.updated
    assert store.get_job("acme", job.job_id) == job
    epoch = EpochRecord(1, 0.7, 2.5, eval_loss=0.6, eval_accuracy=0.8, eval_macro_f1=0.79)
    running = store.update_job("acme", job.job_id, state="running", runner="trainer-1", epoch=1, history=(epoch,))
    assert running.state == "running" and running.started is not None and running.updated >= job.updated
    assert running.history == (epoch,) and running.runner == "trainer-1" and running.created == job.created
    assert store.get_job("acme", job.job_id) == running
    as_dicts = store.update_job("acme", job.job_id, history=[epoch.__dict__, {**epoch.__dict__, "epoch": 2}], epoch=2)
    assert [e.epoch for e in as_dicts.history] == [1, 2] and as_dicts.started == running.started
    done = store.update_job("acme", job.job_id, state="succeeded", epoch=3, result={"version": 4, "kept": True})
    assert done.finished is not None and done.result == {"version": 4, "kept": True} and not done.active
    assert JobRecord.from_json(done.to_json()) == done == store.get_job("acme", job.job_id)
    later = queue_job(store)
    assert [j.job_id for j in store.list_jobs("acme")] == [later.job_id, job.job_id]
    assert [j.job_id for j in store.list_jobs("acme", limit=1)] == [later.job_id]
    with pytest.raises(BadRequestError):
        store.list_jobs("acme", limit=0)
    for bad in ({"state": "paused"}, {"created": 1.0}, {"cancel_requested": True}, {"epoch": -1}, {"error": "x"}):
        with pytest.raises(ValueError):
            store.update_job("acme", later.job_id, **bad)
    assert store.get_job("acme", later.job_id) == later
    with pytest.raises(NotFoundError):
        store.create_job("acme", prefix_id="p", dataset_id="ds_" + "0" * 24, options={}, epochs=1, limits=LIMITS)
    with pytest.raises(BadRequestError):
        store.create_job("acme", prefix_id="p", dataset_id=later.dataset_id, options=[1], epochs=1, limits=LIMITS)


def test_terminal_records_never_change_and_free_their_slot(store):
    one = TrainingLimits(max_active_jobs=1)
    for terminal in ("succeeded", "failed", "cancelled"):
        job = queue_job(store, limits=one)
        with pytest.raises(RateLimitedError) as err:
            queue_job(store, limits=one)
        assert err.value.code == "too_many_jobs" and err.value.status == 429 and err.value.retry_after
        store.update_job("acme", job.job_id, state="running")
        error = JobError("job_timeout", "the job ran longer than 3600 s") if terminal == "failed" else None
        final = store.update_job("acme", job.job_id, state=terminal, error=error)
        assert final.finished is not None and final.error == error
        for late in ({"state": "running"}, {"epoch": 2, "history": ()}, {"state": "succeeded", "result": {"v": 1}}):
            assert store.update_job("acme", job.job_id, **late) == final  # unchanged, not even `updated`
        assert store.request_cancel("acme", job.job_id) == final == store.get_job("acme", job.job_id)
    assert [j.state for j in store.list_jobs("acme")] == ["cancelled", "failed", "succeeded"]
    unlimited = TrainingLimits(max_active_jobs=0)
    assert len({queue_job(store, limits=unlimited).job_id for _ in range(3)}) == 3


def test_request_cancel_cancels_a_queued_job_and_flags_a_running_one(store):
    queued = queue_job(store, limits=TrainingLimits(max_active_jobs=0))
    cancelled = store.request_cancel("acme", queued.job_id)
    assert (cancelled.state, cancelled.cancel_requested, cancelled.active) == ("cancelled", True, False)
    assert cancelled.finished is not None
    running = queue_job(store, limits=TrainingLimits(max_active_jobs=1))  # the cancelled job freed its slot
    store.update_job("acme", running.job_id, state="running")
    flagged = store.request_cancel("acme", running.job_id)
    assert (flagged.state, flagged.cancel_requested, flagged.finished) == ("running", True, None)
    assert store.update_job("acme", running.job_id, epoch=1).cancel_requested  # progress keeps the flag
    assert store.update_job("acme", running.job_id, state="cancelled").finished is not None


def test_dataset_limits_count_bytes_and_refusals_store_nothing(store):
    limits = TrainingLimits(max_dataset_bytes=1000, max_datasets=3)
    a = store.put_dataset("acme", dataset(1, 400), fmt="tsv", limits=limits)
    store.put_dataset("acme", dataset(2, 400), fmt="tsv", limits=limits)
    with pytest.raises(QuotaExceededError) as err:
        store.put_dataset("acme", dataset(3, 400), fmt="tsv", limits=limits)  # 3 x 403 bytes > 1000
    assert err.value.code == "quota_dataset_bytes" and err.value.status == 429
    small = store.put_dataset("acme", dataset(3, 10), fmt="tsv", limits=limits)
    with pytest.raises(QuotaExceededError) as err:
        store.put_dataset("acme", b"x", fmt="tsv", limits=limits)
    assert err.value.code == "quota_datasets"
    assert len(store.list_datasets("acme")) == 3
    assert store.put_dataset("globex", dataset(4, 900), fmt="csv", limits=limits).size > 900  # per tenant
    store.delete_dataset("acme", a.dataset_id)  # frees a slot and its bytes
    store.put_dataset("acme", dataset(5, 400), fmt="tsv", limits=limits)
    unlimited = TrainingLimits(max_dataset_bytes=0, max_datasets=0)
    store.put_dataset("acme", dataset(6, 5000), fmt="tsv", limits=unlimited)
    assert small in store.list_datasets("acme") and len(store.list_datasets("acme")) == 4


def test_a_dataset_in_use_by_an_active_job_cannot_be_deleted(store):
    job = queue_job(store)
    with pytest.raises(ConflictError) as err:
        store.delete_dataset("acme", job.dataset_id)
    assert err.value.code == "dataset_in_use" and err.value.status == 409
    assert store.get_dataset("acme", job.dataset_id)[1] == TSV
    store.update_job("acme", job.job_id, state="failed", error=JobError("bad_dataset", "no label column"))
    store.delete_dataset("acme", job.dataset_id)
    assert store.get_job("acme", job.job_id).dataset_id == job.dataset_id  # the record keeps its history


def test_another_tenants_ids_are_404_on_every_method(store):
    job = queue_job(store)
    ds = job.dataset_id
    calls = [
        lambda: store.dataset_info("globex", ds),
        lambda: store.get_dataset("globex", ds),
        lambda: store.delete_dataset("globex", ds),
        lambda: store.create_job("globex", prefix_id="p", dataset_id=ds, options={}, epochs=1, limits=LIMITS),
        lambda: store.get_job("globex", job.job_id),
        lambda: store.update_job("globex", job.job_id, state="failed"),
        lambda: store.request_cancel("globex", job.job_id),
        lambda: store.list_datasets("nobody"),
        lambda: store.list_jobs("nobody"),
    ]
    for call in calls:
        with pytest.raises(NotFoundError) as err:
            call()
        assert err.value.status == 404
    assert store.list_datasets("globex") == [] and store.list_jobs("globex") == []
    assert store.get_job("acme", job.job_id) == job and store.get_dataset("acme", ds)[1] == TSV


def test_bad_ids_are_refused_before_anything_is_touched(store):
    ds = store.put_dataset("acme", TSV, fmt="tsv", limits=LIMITS).dataset_id
    bad_datasets = [
        "",
        "ds_",
        "../ds_" + "0" * 24,
        "ds_" + "G" * 24,
        "ds_" + "0" * 25,
        ds.upper(),
        "job_" + "0" * 24,
        7,
    ]
    for bad in bad_datasets:
        for call in (store.dataset_info, store.get_dataset, store.delete_dataset):
            with pytest.raises(InvalidIdError):
                call("acme", bad)
        with pytest.raises(InvalidIdError):
            store.create_job("acme", prefix_id="p", dataset_id=bad, options={}, epochs=1, limits=LIMITS)
    for bad in ["", "job_", "job_" + "0" * 23, "job_" + "0" * 24 + "/x", ds, None]:
        for call in (store.get_job, store.request_cancel, lambda t, j: store.update_job(t, j, epoch=1)):
            with pytest.raises(InvalidIdError):
                call("acme", bad)
    for bad_tenant in ("../acme", "a:b", ""):
        with pytest.raises(InvalidIdError):
            store.get_dataset(bad_tenant, ds)
    with pytest.raises(InvalidIdError):
        store.create_job("acme", prefix_id="../x", dataset_id=ds, options={}, epochs=1, limits=LIMITS)
    assert store.get_dataset("acme", ds)[1] == TSV  # the well-formed id still works


def test_records_survive_a_new_store_object(backend, store):
    job = queue_job(store)
    store.update_job("acme", job.job_id, state="running", runner="trainer-7")
    reopened = backend()
    assert reopened.get_job("acme", job.job_id) == store.get_job("acme", job.job_id)
    assert reopened.get_dataset("acme", job.dataset_id) == store.get_dataset("acme", job.dataset_id)
    assert [j.job_id for j in reopened.active_jobs()] == [job.job_id]
    with pytest.raises(RateLimitedError):  # the slot is still taken, seen from the new object too
        queue_job(reopened, limits=TrainingLimits(max_active_jobs=1))


def test_active_jobs_lists_every_tenants_queued_and_running_jobs_oldest_first(store):
    unlimited = TrainingLimits(max_active_jobs=0)
    first, second = queue_job(store, limits=unlimited), queue_job(store, "globex")
    third = queue_job(store, limits=unlimited)
    store.update_job("acme", first.job_id, state="running")
    store.update_job("acme", third.job_id, state="succeeded")
    assert [(j.tenant, j.job_id) for j in store.active_jobs()] == [("acme", first.job_id), ("globex", second.job_id)]


def test_delete_tenant_purges_datasets_and_jobs_and_a_namesake_sees_none(store):
    job = queue_job(store)
    kept = queue_job(store, "globex")
    store.delete_tenant("acme")
    assert [j.job_id for j in store.active_jobs()] == [kept.job_id]  # a deleted tenant's jobs are active for nobody
    store.create_tenant("acme")
    assert store.list_datasets("acme") == [] and store.list_jobs("acme") == []
    for call in (
        lambda: store.get_job("acme", job.job_id),
        lambda: store.update_job("acme", job.job_id, state="running"),
        lambda: store.get_dataset("acme", job.dataset_id),
    ):
        with pytest.raises(NotFoundError):
            call()
    queue_job(store, limits=TrainingLimits(max_active_jobs=1))  # the old job holds no slot
    if isinstance(store, RedisStore):  # and nothing is left behind: only globex's keys and the version floor
        store.delete_tenant("acme")
        left = {k.decode().removeprefix(store.prefix) for k in store._r.scan_iter(match=f"{store.prefix}*")}
        assert not any(":acme" in k for k in left) and "job:globex:" + kept.job_id in left
    else:
        assert not (store.root / "tenants" / "acme" / "jobs" / f"{job.job_id}.json").exists()


def test_a_dataset_whose_bytes_changed_is_a_404(store):
    info = store.put_dataset("acme", TSV, fmt="tsv", limits=LIMITS)
    if isinstance(store, FileStore):
        (store.root / "tenants" / "acme" / "datasets" / f"{info.dataset_id}.bin").write_bytes(TSV.upper())
    else:
        store._r.set(store._k("dsb", "acme", info.dataset_id), TSV.upper())
    with pytest.raises(NotFoundError):
        store.get_dataset("acme", info.dataset_id)
    assert store.dataset_info("acme", info.dataset_id) == info


def race(clients: list, call, refusal: type[Exception]) -> tuple[list, int]:
    """``call(client)`` in one thread per client, all released at once: (results, number refused)."""
    barrier, results, refused = threading.Barrier(len(clients)), [], []

    def run(client) -> None:
        barrier.wait()
        try:
            results.append(call(client))
        except refusal:
            refused.append(client)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, len(refused)


def test_racing_create_job_with_one_slot_lets_exactly_one_win(backend, store):
    one = TrainingLimits(max_active_jobs=1)
    ds = store.put_dataset("acme", TSV, fmt="tsv", limits=LIMITS).dataset_id
    clients = [backend() for _ in range(4)]  # like four Ingress replicas
    for _ in range(5):
        won, refused = race(
            clients,
            lambda c: c.create_job("acme", prefix_id="p", dataset_id=ds, options={}, epochs=1, limits=one),
            RateLimitedError,
        )
        assert len(won) == 1 and refused == len(clients) - 1
        assert [j.job_id for j in store.active_jobs()] == [won[0].job_id]
        store.request_cancel("acme", won[0].job_id)  # frees the slot for the next round


def test_racing_uploads_never_exceed_the_dataset_limit(backend, store):
    limits = TrainingLimits(max_datasets=2, max_dataset_bytes=0)
    clients = [backend() for _ in range(4)]
    stored, refused = race(
        clients, lambda c: c.put_dataset("acme", dataset(id(c)), fmt="tsv", limits=limits), QuotaExceededError
    )
    assert len(stored) == 2 and refused == 2
    assert sorted(d.dataset_id for d in store.list_datasets("acme")) == sorted(d.dataset_id for d in stored)


# --- a store that cannot be written: 503, nothing half-written ------------------------------------


@pytest.mark.parametrize("after", [0, 1])  # which of the upload's 2 file writes (blob, record) fails
def test_file_writes_on_a_failing_disk_are_503s_that_leave_nothing(tmp_path, monkeypatch, after):
    store = open_store(f"file://{tmp_path}/store")
    assert isinstance(store, FileStore)
    store.create_tenant("acme")
    job = queue_job(store)
    before, record = files_under(store.root), store.get_job("acme", job.job_id)
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, errno.ENOSPC, after=after)
        calls = [
            lambda: store.put_dataset("acme", TSV, fmt="tsv", limits=LIMITS),
            lambda: store.create_job(
                "acme", prefix_id="p", dataset_id=job.dataset_id, options={}, epochs=1, limits=TrainingLimits(0)
            ),
            lambda: store.update_job("acme", job.job_id, state="running"),
            lambda: store.request_cancel("acme", job.job_id),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailableError) as err:
                call()
            assert err.value.status == 503 and err.value.retry_after and str(store.root) not in err.value.message
    assert files_under(store.root) == before and store.get_job("acme", job.job_id) == record
    assert len(store.list_datasets("acme")) == 1


def test_a_file_upload_that_cannot_clean_up_stays_invisible_and_is_collected(tmp_path, monkeypatch):
    store = open_store(f"file://{tmp_path}/store")
    assert isinstance(store, FileStore)
    store.create_tenant("acme")
    limits = TrainingLimits(max_datasets=1)
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, errno.EROFS, after=1, removes=False)  # the record's rename fails
        with pytest.raises(StoreUnavailableError):
            store.put_dataset("acme", TSV, fmt="tsv", limits=limits)
    ddir = store.root / "tenants" / "acme" / "datasets"
    assert sorted(p.suffix for p in ddir.iterdir()) == [".bin", ".tmp"]  # debris (the blob, the record's temp)...
    assert store.list_datasets("acme") == []  # ...that nothing lists or counts
    info = store.put_dataset("acme", TSV, fmt="tsv", limits=limits)
    assert sorted(p.name for p in ddir.iterdir()) == [f"{info.dataset_id}.bin", f"{info.dataset_id}.json"]


@pytest.fixture(scope="module")
def sick_redis(tmp_path_factory):
    """A private redis-server that the test below makes refuse writes (the shared one stays healthy)."""
    server = RedisServer(tmp_path_factory.mktemp("sick-redis-jobs"))
    server.start()
    yield server
    server.stop(kill=True)


@pytest.mark.redis
@pytest.mark.parametrize("mode", ["OOM", "READONLY", "MISCONF"])
def test_redis_refusing_writes_gives_503s_that_change_nothing(sick_redis, mode):
    prefix = f"j{mode.lower()}:"
    store = open_store(f"{sick_redis.url}?prefix={prefix}", retries=1)
    assert isinstance(store, RedisStore)
    store.create_tenant("acme")
    job, spare = queue_job(store, limits=TrainingLimits(0)), queue_job(store, limits=TrainingLimits(0))
    store.request_cancel("acme", spare.job_id)
    admin = sick_redis.client()
    before = {k: admin.dump(k) for k in admin.scan_iter(match=f"{prefix}*")}
    calls = [
        lambda: store.put_dataset("acme", TSV * 1000, fmt="tsv", limits=LIMITS),
        lambda: store.create_job(
            "acme", prefix_id="p", dataset_id=job.dataset_id, options={}, epochs=1, limits=TrainingLimits(0)
        ),
        lambda: store.update_job("acme", job.job_id, state="running", epoch=1),
        lambda: store.request_cancel("acme", job.job_id),
    ]
    if mode != "OOM":  # under maxmemory Redis still runs what only deletes
        calls.append(lambda: store.delete_dataset("acme", spare.dataset_id))
    with refusing_writes(sick_redis, mode):
        for call in calls:
            with pytest.raises(StoreUnavailableError) as err:
                call()
            assert err.value.status == 503 and err.value.code == "store_unavailable" and err.value.retry_after
        assert store.get_job("acme", job.job_id) == job  # reads still work
    assert {k: admin.dump(k) for k in admin.scan_iter(match=f"{prefix}*")} == before
    assert store.update_job("acme", job.job_id, state="running").state == "running"  # healed: writes work again
    store.delete_tenant("acme")
    admin.close()
    store.close()


def test_training_limits_are_checked_and_round_trip():
    assert TrainingLimits.from_dict(TrainingLimits(2, 10, 60.0, 3).to_dict()) == TrainingLimits(2, 10, 60.0, 3)
    assert TrainingLimits.from_dict({"max_active_jobs": 4}) == TrainingLimits(max_active_jobs=4)
    for bad in ({"max_active_jobs": -1}, {"max_datasets": 1.5}, {"max_dataset_bytes": True}, {"max_job_s": -1.0}):
        with pytest.raises(ValueError):
            TrainingLimits(**bad)
    with pytest.raises(ValueError):
        TrainingLimits(max_job_s=float("inf"))

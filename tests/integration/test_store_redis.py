"""Redis-only behaviour against a real redis-server: restarts, durability, auth, DB index, prefix, no KEYS,
refused writes (OOM, READONLY, MISCONF) and blobs of crashed puts."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time

import pytest

from prefixserve.adapters.errors import InvalidAdapterError, NotFoundError, StoreUnavailableError
from prefixserve.adapters.ratelimit import RateLimits
from prefixserve.adapters.store import ChangeEvent, open_store
from prefixserve.adapters.store.redis_store import RedisStore
from prefixserve.server.app import free_port
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.redis


def blob(version: int) -> bytes:
    return b"BLOB" + bytes([version]) * 1000


def validator(data: bytes) -> dict:
    if not data.startswith(b"BLOB"):
        raise InvalidAdapterError("not a test blob")
    return {"kind": "prompt", "num_virtual_tokens": data[4], "labels": ["a"], "fingerprint": "fp"}


@pytest.fixture(scope="module", autouse=True)
def back_to_plain_redis(redis_server):
    """These tests switch the shared server to appendonly; leave it as the session started it."""
    yield
    if redis_server.appendonly or redis_server.proc is None:
        redis_server.restart(appendonly=False, kill=False)


@pytest.fixture
def url(redis_server, redis_prefix):
    return f"{redis_server.url}?prefix={redis_prefix}"


def redis_store(url: str, **opts) -> RedisStore:
    store = open_store(url, validator=validator, **opts)
    assert isinstance(store, RedisStore)
    return store


def test_clients_recover_after_redis_restarts_mid_test(redis_server, url):
    redis_server.restart(appendonly=True)  # durable from here on
    writer, reader = open_store(url, validator=validator), open_store(url, validator=validator)
    resyncs = threading.Event()
    reader.subscribe(lambda e: resyncs.set() if e.resync else None)
    writer.create_tenant("acme")
    writer.put("acme", "x", blob(1))
    assert reader.get("acme", "x")[1] == blob(1)
    redis_server.restart(kill=True, down_for=0.3)  # crash; clients retry with backoff
    assert reader.get("acme", "x")[1] == blob(1)
    assert writer.put("acme", "x", blob(2)).version == 2
    assert reader.head("acme", "x").version == 2
    assert resyncs.wait(3.0), "the feed did not report that it reconnected (events may have been lost)"
    events = []
    got = threading.Event()

    def on_event(event: ChangeEvent) -> None:
        if not event.resync:
            events.append(event)
            got.set()

    reader.subscribe(on_event)
    writer.put("acme", "x", blob(3))
    assert got.wait(2.0) and events[-1] == ChangeEvent("acme", "x", 3)  # the feed is live again
    writer.close()
    reader.close()


def test_appendonly_restart_loses_no_published_version(redis_server, url):
    redis_server.restart(appendonly=True)
    store = open_store(url, validator=validator, keep_versions=10)
    key = store.create_tenant("acme")
    published = [(store.put("acme", f"id{i % 3}", blob(i)), blob(i)) for i in range(1, 10)]
    redis_server.restart(appendonly=True, kill=True)  # SIGKILL: a crash, not a clean shutdown
    for info, sent in published:
        got, data = store.get("acme", info.prefix_id, version=info.version)
        assert got == info and data == sent
    assert [(i.prefix_id, i.version) for i in store.list("acme")] == [("id0", 3), ("id1", 3), ("id2", 3)]
    assert store.get("acme", "id0")[1] == blob(9)
    assert store.authenticate(key) == "acme"
    store.close()


def test_unreachable_redis_is_a_503(redis_server, url):
    store = open_store(url, validator=validator, retries=2)
    store.create_tenant("acme")
    store.put("acme", "x", blob(1))
    redis_server.appendonly = True
    redis_server.stop(kill=False)  # graceful: AOF flushed
    try:
        with pytest.raises(StoreUnavailableError) as err:
            store.get("acme", "x")
        assert err.value.status == 503 and "127.0.0.1" in err.value.message
        with pytest.raises(StoreUnavailableError):
            store.head("acme", "x")  # what the Ingress asks on every request
    finally:
        redis_server.start(appendonly=True)
    assert store.get("acme", "x")[1] == blob(1)
    store.close()


def test_password_db_index_and_prefix(redis_server, redis_prefix, monkeypatch):
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "psuser", "on", ">s3cret", "~*", "&*", "+@all")
    try:
        base = f"redis://psuser:s3cret@127.0.0.1:{redis_server.port}/3?prefix={redis_prefix}"
        store = open_store(base, validator=validator)
        assert "s3cret" not in store.url and "/3" in store.url
        store.create_tenant("acme")
        store.put("acme", "x", blob(1))
        db3 = redis_server.client(db=3)
        assert db3.exists(f"{redis_prefix}a:acme") and not admin.exists(f"{redis_prefix}a:acme")
        monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "s3cret")  # password from env, user from URL
        env_store = open_store(
            f"redis://psuser@127.0.0.1:{redis_server.port}/3", validator=validator, prefix=redis_prefix
        )
        assert env_store.get("acme", "x")[1] == blob(1)
        other_prefix = open_store(f"redis://psuser@127.0.0.1:{redis_server.port}/3?prefix=other:", validator=validator)
        with pytest.raises(NotFoundError):
            other_prefix.get("acme", "x")
        monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "wrong")
        bad = open_store(f"redis://psuser@127.0.0.1:{redis_server.port}/3", validator=validator, retries=1)
        with pytest.raises(StoreUnavailableError):
            bad.ping()
        store.delete_tenant("acme")
        for s in (store, env_store, other_prefix, bad):
            s.close()
        for key in db3.scan_iter(match=f"{redis_prefix}*"):
            db3.delete(key)
    finally:
        admin.execute_command("ACL", "DELUSER", "psuser")


def test_never_uses_keys_and_cleans_up_after_delete_tenant(redis_server, url, redis_prefix):
    admin = redis_server.client()
    admin.config_resetstat()
    store = open_store(url, validator=validator, keep_versions=2, retain_grace_s=0)
    store.create_tenant("acme")
    store.create_tenant("globex")
    for v in range(1, 6):
        store.put("acme", "x", blob(v))
    store.put("acme", "y", blob(1))
    store.delete("acme", "y")
    store.put("globex", "x", blob(1))
    store.list_tenants(), store.list("acme"), store.versions("acme", "x")
    blobs = sorted(k.decode() for k in admin.scan_iter(match=f"{redis_prefix}b:*"))
    assert blobs == [f"{redis_prefix}b:acme:x:4", f"{redis_prefix}b:acme:x:5", f"{redis_prefix}b:globex:x:1"]
    store.delete_tenant("acme")
    store.delete_tenant("globex")
    # nothing left behind but the store-wide version floor (a recreated tenant numbers above it)
    assert [k.decode() for k in admin.scan_iter(match=f"{redis_prefix}*")] == [f"{redis_prefix}vfloor"]
    assert int(admin.get(f"{redis_prefix}vfloor")) == 5
    assert "cmdstat_keys" not in admin.info("commandstats")
    store.close()


# --- writes refused (OOM, READONLY, MISCONF) and blobs of crashed puts (issue #11) ---------------


@pytest.fixture(scope="module")
def sick_redis(redis_server, tmp_path_factory):
    """A private redis-server that the tests below make refuse writes (the shared one stays healthy)."""
    server = RedisServer(tmp_path_factory.mktemp("sick-redis"))
    server.start()
    yield server
    server.stop(kill=True)


def _wait_bgsave(client) -> str:
    deadline = time.monotonic() + 10
    while client.info("persistence")["rdb_bgsave_in_progress"] and time.monotonic() < deadline:
        time.sleep(0.02)
    return client.info("persistence")["rdb_last_bgsave_status"]


@contextlib.contextmanager
def refusing_writes(server: RedisServer, mode: str):
    """Make ``server`` refuse writes the way production Redis does, then heal it."""
    admin = server.client()
    if mode == "OOM":
        admin.config_set("maxmemory", 1)  # with the default noeviction policy: every write is refused
    elif mode == "READONLY":
        admin.replicaof("127.0.0.1", free_port())  # a replica of a master that is not there: read-only
    else:  # MISCONF: snapshots are configured but fail (the data dir is gone), so writes stop
        shutil.rmtree(server.dir, ignore_errors=True)
        admin.config_set("save", "3600 1")
        admin.bgsave()
        assert _wait_bgsave(admin) == "err"
    try:
        yield
    finally:
        if mode == "OOM":
            admin.config_set("maxmemory", 0)
        elif mode == "READONLY":
            admin.replicaof("NO", "ONE")
        else:
            admin.config_set("save", "")
        admin.close()


def _keys(client, prefix: str) -> list[str]:
    return sorted(k.decode() for k in client.scan_iter(match=f"{prefix}*", count=1000))


@pytest.mark.parametrize("mode", ["OOM", "READONLY", "MISCONF"])
def test_refused_writes_are_503s_that_change_nothing(sick_redis, mode):
    prefix = f"s{mode.lower()}:"
    store = open_store(f"{sick_redis.url}?prefix={prefix}", validator=validator, retries=1)
    key = store.create_tenant("acme")
    store.put("acme", "x", blob(1))
    store.check_writable()
    admin = sick_redis.client()
    before = {k: admin.dump(k) for k in _keys(admin, prefix)}
    calls = [
        store.check_writable,
        lambda: store.put("acme", "x", blob(2)),
        lambda: store.put("acme", "new", blob(2)),
        lambda: store.create_tenant("globex"),
        lambda: store.set_quota("acme", store.tenant_info("acme").quota),
        lambda: store.set_limits("acme", RateLimits(requests_per_s=1)),
    ]
    if mode != "OOM":  # under maxmemory Redis still runs what starts by freeing memory (delete, rotate-key)
        calls += [lambda: store.delete("acme", "x"), lambda: store.rotate_key("acme")]
    with refusing_writes(sick_redis, mode):
        for call in calls:
            with pytest.raises(StoreUnavailableError) as err:
                call()
            assert err.value.status == 503 and err.value.code == "store_unavailable" and err.value.retry_after
        assert store.get("acme", "x")[1] == blob(1) and store.authenticate(key) == "acme"  # reads still work
        assert {k: admin.dump(k) for k in _keys(admin, prefix)} == before  # nothing half-written
    store.check_writable()
    assert store.put("acme", "x", blob(3)).version == 2
    store.delete_tenant("acme")
    store.close()
    admin.close()


@pytest.mark.parametrize("mode", ["OOM", "MISCONF"])
@pytest.mark.parametrize("step", ["_write_blob", "_publish"])
def test_a_put_refused_part_way_leaves_nothing_that_lasts(sick_redis, monkeypatch, mode, step):
    prefix = f"smid{mode}{step}:"
    store = redis_store(f"{sick_redis.url}?prefix={prefix}", retries=1, orphan_age_s=0.3)
    store.create_tenant("acme")
    store.put("acme", "x", blob(1))
    admin = sick_redis.client()
    before = _keys(admin, prefix)
    real_step, sickness = getattr(store, step), contextlib.ExitStack()

    def fall_ill_first(*args):
        sickness.enter_context(refusing_writes(sick_redis, mode))  # Redis stops taking writes mid-put
        return real_step(*args)

    monkeypatch.setattr(store, step, fall_ill_first)
    with sickness, pytest.raises(StoreUnavailableError):
        store.put("acme", "x", blob(2))
    monkeypatch.undo()
    assert store.get("acme", "x")[1] == blob(1) and store.head("acme", "x").version == 1
    if mode == "OOM":  # deletes still work under maxmemory: the put cleaned up at once
        assert _keys(admin, prefix) == before
    time.sleep(0.35)  # MISCONF refused even the cleanup: the next put collects the leftovers
    assert store.put("acme", "y", blob(3)).version == 1
    blobs = [k for k in _keys(admin, prefix) if k.startswith(f"{prefix}b:")]
    assert blobs == [f"{prefix}b:acme:x:1", f"{prefix}b:acme:y:1"] and not admin.zcard(f"{prefix}pend:acme")
    store.close()
    admin.close()


def test_blob_of_a_crashed_put_is_collected_by_a_later_put(redis_server, url, redis_prefix):
    store = redis_store(url, orphan_age_s=0.5)
    admin = redis_server.client()
    store.create_tenant("acme")
    store.put("acme", "x", blob(1))
    version = store._reserve("acme", "x")  # the put's first two steps, then a "crash": no publish
    assert version is not None
    store._write_blob("acme", "x", version, blob(9))
    orphan = f"{redis_prefix}b:acme:x:{version}"
    assert admin.exists(orphan) and admin.zcard(f"{redis_prefix}pend:acme") == 1
    assert store.put("acme", "x", blob(2)).version == version + 1
    assert admin.exists(orphan), "a pending blob younger than orphan_age_s may belong to a put in flight"
    time.sleep(0.6)
    assert store.put("acme", "y", blob(3)).version == 1  # any later put of the tenant collects it
    assert not admin.exists(orphan) and admin.zcard(f"{redis_prefix}pend:acme") == 0
    with pytest.raises(NotFoundError):
        store.get("acme", "x", version=version)
    assert store.get("acme", "x")[1] == blob(2)
    crashed = store._reserve("acme", "y")  # collect_orphans sweeps on demand (an operator's cron job)
    assert crashed is not None
    store._write_blob("acme", "y", crashed, blob(4))
    assert store.collect_orphans(max_age_s=10) == 0
    assert store.collect_orphans(max_age_s=0) == 1 and not admin.exists(f"{redis_prefix}b:acme:y:{crashed}")
    store.close()
    admin.close()


def test_an_unpublished_blob_goes_with_its_deleted_tenant(redis_server, url, redis_prefix):
    store = redis_store(url)
    store.create_tenant("acme")
    version = store._reserve("acme", "x")
    assert version is not None
    store._write_blob("acme", "x", version, blob(1))
    late = store._reserve("acme", "x")  # reserved before the delete, written after it: refused
    assert late is not None
    store.delete_tenant("acme")
    with pytest.raises(NotFoundError):
        store._write_blob("acme", "x", late, blob(2))
    admin = redis_server.client()
    assert _keys(admin, redis_prefix) == [f"{redis_prefix}vfloor"] and int(admin.get(f"{redis_prefix}vfloor")) == late
    store.create_tenant("acme")
    assert store.put("acme", "x", blob(3)).version == late + 1  # above every number the old tenant used
    store.close()
    admin.close()

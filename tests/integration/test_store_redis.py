"""Redis-only behaviour against a real redis-server: restarts, durability, auth, DB index, prefix, no KEYS."""

from __future__ import annotations

import threading

import pytest

from prefixserve.adapters.errors import InvalidAdapterError, NotFoundError, StoreUnavailableError
from prefixserve.adapters.store import ChangeEvent, open_store

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
    store = open_store(url, validator=validator, keep_versions=2)
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
    assert list(admin.scan_iter(match=f"{redis_prefix}*")) == []  # nothing left behind
    assert "cmdstat_keys" not in admin.info("commandstats")
    store.close()

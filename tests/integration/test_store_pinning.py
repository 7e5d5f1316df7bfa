"""Versions and rollback (pin / unpin) on both store backends: file:// and a real redis-server.

The backends and blobs come from :mod:`test_store_behaviour` (its ``backend`` / ``store`` fixtures
parametrize file and redis)."""

from __future__ import annotations

import threading
import time

import pytest

from prefixserve.adapters.errors import InvalidIdError, NotFoundError
from prefixserve.adapters.store import ChangeEvent, VersionHistory
from tests.integration import test_store_behaviour as behaviour
from tests.integration.test_store_behaviour import decode, make_blob

backend, store = behaviour.backend, behaviour.store  # the fixtures: file and redis


def numbers(history: VersionHistory) -> list[int]:
    return [i.version for i in history.versions]


def put_versions(s, n: int, tenant: str = "acme", prefix_id: str = "x") -> None:
    for v in range(1, n + 1):
        assert s.put(tenant, prefix_id, make_blob(v)).version >= v


def test_pin_serves_that_version_until_unpin(store):
    put_versions(store, 2)
    assert store.head("acme", "x").version == 2
    pinned = store.pin("acme", "x", 1)
    assert pinned.version == 1 and pinned == store.head("acme", "x", version=1)
    assert store.head("acme", "x") == pinned  # head serves the pin
    info, data = store.get("acme", "x")  # so does get without a version
    assert info == pinned and decode(data) == 1
    assert decode(store.get("acme", "x", 2)[1]) == 2 and store.head("acme", "x", version=2).version == 2
    assert [i.version for i in store.list("acme")] == [1]  # list shows what is served
    h = store.history("acme", "x")
    assert (h.current.version, h.pinned and h.pinned.version, h.served.version, numbers(h)) == (2, 1, 1, [1, 2])
    assert store.tenant_info("acme").bytes == len(make_blob(2))  # quota usage counts the newest version
    assert store.unpin("acme", "x").version == 2
    assert store.head("acme", "x").version == 2 and store.history("acme", "x").pinned is None
    assert store.unpin("acme", "x").version == 2  # unpinning twice changes nothing
    assert store.pin("acme", "x", 2).version == 2  # pinning the newest is allowed (and shown)
    assert store.history("acme", "x").pinned is not None


def test_a_put_clears_the_pin_and_retention_keeps_the_version_pinned_until_then(backend):
    s = backend(keep_versions=2)
    s.create_tenant("acme")
    put_versions(s, 2)
    s.pin("acme", "x", 1)
    assert s.put("acme", "x", make_blob(3)).version == 3
    h = s.history("acme", "x")
    assert h.pinned is None and h.served.version == 3 == s.head("acme", "x").version
    assert numbers(h) == [1, 2, 3]  # keep_versions=2, plus v1: pinned until this put
    assert s.pin("acme", "x", 1).version == 1  # so it can be rolled back to again
    s.put("acme", "x", make_blob(4))
    assert numbers(s.history("acme", "x")) == [1, 3, 4]  # v2 dropped; v1 was pinned again
    s.put("acme", "x", make_blob(5))
    assert numbers(s.history("acme", "x")) == [4, 5]  # no pin: keep_versions alone
    for v in (1, 2):
        with pytest.raises(NotFoundError):  # dropped: no rollback to it, no explicit version
            s.pin("acme", "x", v)
        with pytest.raises(NotFoundError):
            s.head("acme", "x", version=v)
        assert decode(s.get("acme", "x", v)[1]) == v  # yet fetchable by number in its grace window


def test_unknown_versions_ids_and_bad_numbers(store):
    put_versions(store, 2)
    for call in (
        lambda: store.pin("acme", "x", 3),  # never published
        lambda: store.head("acme", "x", version=9),
        lambda: store.pin("acme", "nope", 1),
        lambda: store.unpin("acme", "nope"),
        lambda: store.history("acme", "nope"),
    ):
        with pytest.raises(NotFoundError):
            call()
    for bad in (0, -1, True, "x"):
        with pytest.raises(InvalidIdError):
            store.pin("acme", "x", bad)
    assert store.head("acme", "x").version == 2 and store.history("acme", "x").pinned is None


def test_tenants_never_see_or_move_each_others_pins(store):
    store.create_tenant("globex")
    put_versions(store, 2)
    put_versions(store, 1, tenant="globex", prefix_id="other")
    store.pin("acme", "x", 1)
    for call in (
        lambda: store.history("globex", "x"),
        lambda: store.pin("globex", "x", 1),
        lambda: store.unpin("globex", "x"),
        lambda: store.head("globex", "x", version=1),
        lambda: store.head("globex", "x"),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert store.head("acme", "x").version == 1  # untouched
    # the same name in another tenant has its own versions and pin
    store.put("globex", "x", make_blob(7))
    store.put("globex", "x", make_blob(8))
    assert store.history("globex", "x").pinned is None and store.head("globex", "x").version == 2
    store.pin("globex", "x", 1)
    store.unpin("acme", "x")
    assert store.head("acme", "x").version == 2 and decode(store.get("globex", "x")[1]) == 7


def test_versions_of_a_deleted_and_recreated_name_never_come_back(store):
    put_versions(store, 2)
    store.pin("acme", "x", 1)
    store.delete("acme", "x")
    with pytest.raises(NotFoundError):
        store.history("acme", "x")
    assert store.put("acme", "x", make_blob(5)).version == 3  # numbers never restart
    assert store.history("acme", "x").pinned is None and numbers(store.history("acme", "x")) == [3]
    for v in (1, 2):
        with pytest.raises(NotFoundError):
            store.pin("acme", "x", v)
        with pytest.raises(NotFoundError):
            store.head("acme", "x", version=v)
    store.pin("acme", "x", 3)
    store.delete_tenant("acme")  # and after the tenant itself is deleted and re-created
    store.create_tenant("acme")
    assert store.put("acme", "x", make_blob(6)).version == 4
    h = store.history("acme", "x")
    assert h.pinned is None and numbers(h) == [4]
    with pytest.raises(NotFoundError):
        store.pin("acme", "x", 3)


def test_a_pin_reaches_a_second_client_at_once_and_its_feed_within_one_second(backend):
    a, b = backend(), backend()  # two replicas' clients of one store
    a.create_tenant("acme")
    put_versions(a, 2)
    events: list[ChangeEvent] = []
    got = threading.Event()

    def on_event(event: ChangeEvent) -> None:
        if not event.resync and event.prefix_id == "x":
            events.append(event)
            got.set()

    sub = b.subscribe(on_event)
    for change, served in ((lambda: a.pin("acme", "x", 1), 1), (lambda: a.unpin("acme", "x"), 2)):
        got.clear()
        t0 = time.monotonic()
        change()
        assert b.head("acme", "x").version == served  # the very next head on another client
        assert got.wait(1.0), "no change event within 1 s"
        assert events[-1] == ChangeEvent("acme", "x", served), events  # the feed names the served version
        print(f"feed delay {time.monotonic() - t0:.3f} s")
    sub.close()


def test_pins_racing_puts_leave_a_kept_pin_or_none(store):
    put_versions(store, 3)
    stop = threading.Event()
    results: list[int | None] = []

    def pinner() -> None:
        while not stop.is_set():
            try:
                results.append(store.pin("acme", "x", 2).version)
            except NotFoundError:  # dropped by retention meanwhile: refused, never half-pinned
                results.append(None)

    thread = threading.Thread(target=pinner)
    thread.start()
    try:
        for v in range(4, 10):
            store.put("acme", "x", make_blob(v))
    finally:
        stop.set()
        thread.join()
    h = store.history("acme", "x")
    assert h.pinned is None or h.pinned.version in numbers(h)
    assert decode(store.get("acme", "x")[1]) == h.served.version  # blob i was put as version i
    assert set(results) <= {2, None}

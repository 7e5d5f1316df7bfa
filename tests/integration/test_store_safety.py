"""Store safety (issue #11), for file:// and a real redis-server: identities unique for all time, a
grace window for superseded versions, 503s (never 500s, never half-writes) from an unwritable disk,
nothing left by a put racing delete_tenant, and per-tenant rate limits stored with the tenant."""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from prefixserve.adapters.errors import BadRequestError, ConflictError, NotFoundError, StoreUnavailableError
from prefixserve.adapters.ratelimit import RateLimits
from prefixserve.adapters.store import AdapterStore, file_base, open_store
from prefixserve.adapters.store.file import FileStore
from prefixserve.adapters.store.redis_store import RedisStore
from tests.integration import test_store_behaviour as behaviour
from tests.integration.test_store_behaviour import decode, fake_validator, make_blob

backend = behaviour.backend  # the same two-backend fixture: file:// and a real redis-server


def tamper(store: AdapterStore, tenant: str, prefix_id: str, version: int, data: bytes) -> None:
    """Overwrite a stored blob behind the store's back (what a reused version number used to do)."""
    if isinstance(store, FileStore):
        (store.root / "tenants" / tenant / "adapters" / prefix_id / "v" / f"{version}.bin").write_bytes(data)
    else:
        assert isinstance(store, RedisStore)
        store._r.set(store._blob_prefix(tenant, prefix_id) + str(version), data)


def leftovers(store: AdapterStore, tenant: str) -> list[str]:
    """Whatever the store still holds for ``tenant`` (SCAN for Redis, never KEYS)."""
    if isinstance(store, FileStore):
        return [*map(str, (store.root / "tenants").glob(f"{tenant}*")), *map(str, (store.root / "trash").iterdir())]
    assert isinstance(store, RedisStore)
    return sorted(k.decode() for k in store._r.scan_iter(match=f"{store.prefix}*{tenant}*", count=1000))


# 1. identity: a (tenant name, prefix id, version) names one blob for all time


def test_recreated_tenant_never_reuses_a_version_number(backend):
    store = backend(keep_versions=1, retain_grace_s=0)
    seen: dict[int, str] = {}  # version -> sha256 of the blob it named
    for round_ in range(1, 16):
        store.create_tenant("acme")
        info = store.put("acme", "m", make_blob(round_))
        assert info.version not in seen and all(info.version > v for v in seen), (info.version, sorted(seen))
        seen[info.version] = info.sha256
        got, data = store.get("acme", "m")
        assert got.sha256 == hashlib.sha256(data).hexdigest() and decode(data) == round_
        store.delete_tenant("acme")
    store.create_tenant("acme")
    info = store.put("acme", "m", make_blob(99))
    assert info.version > max(seen) > 1
    for old in seen:
        with pytest.raises(NotFoundError):
            store.get("acme", "m", version=old)


def test_readers_racing_delete_and_recreate_never_see_two_blobs_under_one_version(backend):
    writer, reader = backend(keep_versions=1, retain_grace_s=0), backend()
    writer.create_tenant("acme")
    writer.put("acme", "m", make_blob(1))
    stop, seen, problems = threading.Event(), dict[int, str](), list[str]()

    def read():
        while not stop.is_set():
            try:
                head = reader.head("acme", "m")
                info, data = reader.get("acme", "m", version=head.version)
            except NotFoundError:
                continue  # between delete_tenant and the next put
            if info.sha256 != hashlib.sha256(data).hexdigest() or info.version != head.version:
                problems.append(f"v{head.version}: the record does not describe the bytes")
            if seen.setdefault(info.version, info.sha256) != info.sha256:
                problems.append(f"v{info.version} named two different blobs")

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for round_ in range(2, 16):
        writer.delete_tenant("acme")
        writer.create_tenant("acme")
        writer.put("acme", "m", make_blob(round_))
    stop.set()
    for t in threads:
        t.join()
    assert not problems, problems[:3]


def test_a_blob_that_does_not_match_its_record_is_never_served(backend):
    store = backend(keep_versions=2)
    store.create_tenant("acme")
    store.put("acme", "m", make_blob(1))
    store.put("acme", "m", make_blob(2))
    tamper(store, "acme", "m", 1, make_blob(7))  # right size class, wrong bytes
    with pytest.raises(NotFoundError):
        store.get("acme", "m", version=1)
    tamper(store, "acme", "m", 2, make_blob(7))
    for call in (lambda: store.get("acme", "m"), lambda: store.get("acme", "m", version=2)):
        with pytest.raises(NotFoundError):
            call()
    assert store.head("acme", "m").version == 2  # the record is still there; only its bytes are refused


# 2. grace window: a version resolved by head stays fetchable while newer puts land


def test_superseded_versions_stay_fetchable_within_the_grace_window(backend):
    store = backend(keep_versions=1)  # default retain_grace_s: 60 s
    store.create_tenant("acme")
    for v in (1, 2, 3):
        store.put("acme", "m", make_blob(v))
    assert [i.version for i in store.versions("acme", "m")] == [3]  # versions() lists the kept ones
    for v in (1, 2):
        info, data = store.get("acme", "m", version=v)
        assert info.version == v == decode(data)

    strict = backend(keep_versions=1, retain_grace_s=0)
    strict.create_tenant("globex")
    for v in (1, 2, 3):
        strict.put("globex", "m", make_blob(v))
    with pytest.raises(NotFoundError):
        strict.get("globex", "m", version=1)

    store.delete("acme", "m")  # a deleted id drops its versions at once, grace or not
    store.put("acme", "m", make_blob(4))
    for v in (1, 2, 3):
        with pytest.raises(NotFoundError):
            store.get("acme", "m", version=v)


def test_versions_are_collected_once_their_grace_has_passed(backend):
    store = backend(keep_versions=1, retain_grace_s=0.3)
    store.create_tenant("acme")
    store.put("acme", "m", make_blob(1))
    store.put("acme", "m", make_blob(2))  # v1 superseded now
    assert decode(store.get("acme", "m", version=1)[1]) == 1
    time.sleep(0.4)
    store.put("acme", "m", make_blob(3))  # collects v1 (grace over), supersedes v2
    with pytest.raises(NotFoundError):
        store.get("acme", "m", version=1)
    assert decode(store.get("acme", "m", version=2)[1]) == 2


def resolve_then_fetch_under_write_bursts(backend, retain_grace_s: float, seconds: float = 1.5) -> tuple[int, int]:
    """4 writers publish one id as fast as they can (keep_versions=1) while 8 readers do what the
    Ingress + a serving replica do: ``head``, then ``get(version=head.version)``. (reads, false 404s)"""
    writers = [backend(keep_versions=1, retain_grace_s=retain_grace_s) for _ in range(2)]
    readers = [backend(keep_versions=1, retain_grace_s=retain_grace_s) for _ in range(2)]
    writers[0].create_tenant("acme")
    writers[0].put("acme", "hot", make_blob(1))
    stop, counts, lock = threading.Event(), {"reads": 0, "missing": 0, "wrong": 0}, threading.Lock()

    def write(i):
        n = 1
        while not stop.is_set():
            n += 1
            with contextlib.suppress(ConflictError):  # outraced 5 times in a row by the other writers
                writers[i % 2].put("acme", "hot", make_blob(n))

    def read(i):
        store = readers[i % 2]
        while not stop.is_set():
            head = store.head("acme", "hot")
            try:
                info, data = store.get("acme", "hot", version=head.version)
                outcome = "reads" if info.version == head.version and info.matches(data) else "wrong"
            except NotFoundError:
                outcome = "missing"
            with lock:
                counts[outcome] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    assert counts["wrong"] == 0, counts
    return counts["reads"] + counts["missing"], counts["missing"]


def test_a_resolved_version_stays_fetchable_under_write_bursts(backend):
    reads, missing = resolve_then_fetch_under_write_bursts(backend, retain_grace_s=60)
    print(f"{backend.kind}: {reads} head+get pairs, {missing} false 404s")
    assert reads > 100 and missing == 0


# 3. an unwritable disk (file store): 503 with a retry hint, nothing half-written


class FailingDisk:
    """Writes under ``root`` fail with ``err`` from the ``after``-th file write on (0: all of them).

    A file write is ``write_atomic``'s open + write + ``os.replace``: ENOSPC fails the write (the
    temp file exists and must be cleaned up), EROFS fails the rename. ``removes=False`` fails
    ``os.remove`` too (a disk that turned read-only: cleanup is impossible). ``opens=True`` fails
    ``os.open`` for writing (lock files, the writability probe).
    """

    def __init__(self, monkeypatch, root: Path, err: int, after: int = 0, removes: bool = True, opens: bool = False):
        self.root, self.err, self.after, self.writes = str(root), err, after, 0
        real_open, real_replace, real_remove, real_os_open = builtins.open, os.replace, os.remove, os.open
        disk = self

        def ours(path) -> bool:
            return os.fspath(path).startswith(self.root)

        def fail():
            raise OSError(disk.err, os.strerror(disk.err))

        class NoSpace:  # the temp file exists, but no byte fits
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                fail()

        def fake_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            if ours(path) and "w" in mode:
                disk.writes += 1
                return NoSpace(f) if disk.failing() and disk.err == errno.ENOSPC else f
            return f

        def fake_replace(src, dst, *args, **kwargs):
            if ours(dst) and disk.failing() and disk.err != errno.ENOSPC:
                fail()
            return real_replace(src, dst, *args, **kwargs)

        def fake_remove(path, *args, **kwargs):
            if ours(path) and not removes and disk.failing():
                fail()
            return real_remove(path, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if opens and ours(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                fail()
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(file_base, "open", fake_open, raising=False)  # write_atomic's open only
        monkeypatch.setattr(os, "replace", fake_replace)
        monkeypatch.setattr(os, "remove", fake_remove)
        monkeypatch.setattr(os, "open", fake_os_open)

    def failing(self) -> bool:
        return self.writes > self.after


def file_store(tmp_path, **opts) -> FileStore:
    store = open_store(f"file://{tmp_path}/store", validator=fake_validator, keep_versions=2, **opts)
    assert isinstance(store, FileStore)
    return store


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "locks" not in p.parts)


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
@pytest.mark.parametrize("after", [0, 1, 2, 3])  # which of the put's 4 file writes fails first
def test_file_put_on_a_failing_disk_is_a_503_and_leaves_nothing_behind(tmp_path, monkeypatch, err, after):
    store = file_store(tmp_path)
    store.create_tenant("acme")
    old = store.put("acme", "m", make_blob(1))
    before = files_under(store.root)
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, err, after=after)
        with pytest.raises(StoreUnavailableError) as caught:
            store.put("acme", "m", make_blob(2))
    assert caught.value.status == 503 and caught.value.code == "store_unavailable"
    assert caught.value.retry_after and caught.value.retry_after > 0 and str(store.root) not in caught.value.message
    assert store.head("acme", "m") == old and decode(store.get("acme", "m")[1]) == 1  # the old version serves
    assert [i.version for i in store.versions("acme", "m")] == [1]
    assert files_under(store.root) == before, "a blob, record or temp file was left behind"
    assert store.put("acme", "m", make_blob(3)).version > 1  # the disk is back: puts work again
    assert decode(store.get("acme", "m")[1]) == 3


def test_file_put_that_cannot_clean_up_stays_invisible_and_is_collected_later(tmp_path, monkeypatch):
    store = file_store(tmp_path)
    store.create_tenant("acme")
    store.put("acme", "m", make_blob(1))
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, errno.EROFS, after=3, removes=False)  # the pointer write fails
        with pytest.raises(StoreUnavailableError):
            store.put("acme", "m", make_blob(2))
    vdir = store.root / "tenants/acme/adapters/m/v"
    assert sorted(p.name for p in vdir.iterdir()) == ["1.bin", "1.json", "2.bin", "2.json"]  # debris...
    assert [i.version for i in store.versions("acme", "m")] == [1]  # ...that nobody can see
    with pytest.raises(NotFoundError):
        store.get("acme", "m", version=2)
    assert store.put("acme", "m", make_blob(3)).version == 3
    assert sorted(p.name for p in vdir.iterdir()) == ["1.bin", "1.json", "3.bin", "3.json"]  # and then it is gone


def test_file_admin_writes_on_a_read_only_disk_are_503s_that_change_nothing(tmp_path, monkeypatch):
    store = file_store(tmp_path)
    key = store.create_tenant("acme")
    store.put("acme", "m", make_blob(1))
    store.check_writable()
    before = files_under(store.root)
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, errno.EROFS, removes=False, opens=True)
        for call in (
            store.check_writable,
            lambda: store.put("acme", "m", make_blob(2)),
            lambda: store.delete("acme", "m"),
            lambda: store.create_tenant("globex"),
            lambda: store.delete_tenant("acme"),
            lambda: store.set_quota("acme", store.tenant_info("acme").quota),
            lambda: store.set_limits("acme", RateLimits(requests_per_s=1)),
            lambda: store.rotate_key("acme"),
            lambda: store.revoke_key("acme"),
        ):
            with pytest.raises(StoreUnavailableError) as caught:
                call()
            assert caught.value.status == 503 and caught.value.retry_after
        assert decode(store.get("acme", "m")[1]) == 1 and store.authenticate(key) == "acme"  # reads still work
    assert files_under(store.root) == before
    with monkeypatch.context() as patch:
        FailingDisk(patch, store.root, errno.ENOSPC)
        with pytest.raises(StoreUnavailableError):
            store.create_tenant("globex")  # a full disk: no half-made tenant, no stray key file
        with pytest.raises(StoreUnavailableError):
            store.rotate_key("acme")
    assert files_under(store.root) == before and [t.name for t in store.list_tenants()] == ["acme"]
    assert store.authenticate(key) == "acme"
    store.check_writable()


def test_check_writable_passes_on_a_healthy_store(backend):
    store = backend()
    store.check_writable()
    store.check_writable()


# 4. a put racing delete_tenant leaves nothing behind


def test_puts_racing_delete_tenant_leave_nothing_behind(backend):
    store = backend(keep_versions=1, retain_grace_s=0)
    unexpected = []

    def push(i):
        for j in range(6):
            try:
                store.put("acme", f"id{i % 2}", make_blob(j))
            except NotFoundError:
                return  # the tenant is gone: expected
            except Exception as exc:
                unexpected.append(repr(exc))
                return

    for _ in range(12):
        store.create_tenant("acme")
        threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.002)
        store.delete_tenant("acme")
        for t in threads:
            t.join()
        assert leftovers(store, "acme") == []
    assert not unexpected, unexpected[:3]


# 5. per-tenant rate limits live with the tenant


def test_rate_limits_are_stored_with_the_tenant(backend):
    store, other = backend(), backend()
    store.create_tenant("acme")
    store.create_tenant("globex")
    assert store.tenant_info("acme").limits is None  # the server's default
    limits = RateLimits(requests_per_s=5.5, rows_per_s=100.0, burst_s=3.0, max_concurrent=4)
    store.set_limits("acme", limits)
    assert other.tenant_info("acme").limits == limits  # persisted, not cached
    assert {t.name: t.limits for t in other.list_tenants()} == {"acme": limits, "globex": None}
    assert other.tenant_info("acme").to_dict()["limits"] == limits.to_dict()
    store.set_limits("acme", RateLimits(requests_per_s=0.1))
    assert other.tenant_info("acme").limits == RateLimits(requests_per_s=0.1)
    store.set_limits("acme", None)
    assert other.tenant_info("acme").limits is None and other.tenant_info("acme").to_dict()["limits"] is None
    with pytest.raises(NotFoundError):
        store.set_limits("nobody", limits)
    with pytest.raises(BadRequestError):
        store.set_limits("acme", {"requests_per_s": 1})  # a dict is not RateLimits
    store.set_limits("globex", limits)
    store.delete_tenant("globex")
    store.create_tenant("globex")
    assert store.tenant_info("globex").limits is None  # a recreated tenant starts from the default

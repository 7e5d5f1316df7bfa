"""The same behavioural tests for every store backend: file:// and a real redis-server."""

from __future__ import annotations

import struct
import threading
import time

import pytest

from prefixserve.adapters.errors import InvalidAdapterError, InvalidIdError, NotFoundError, QuotaExceededError
from prefixserve.adapters.store import AdapterReader, AdapterStore, ChangeEvent, Quota, open_store

MAGIC = b"PSTEST01"


def make_blob(version: int, size: int = 4096) -> bytes:
    """Every body byte encodes ``version`` (and the header repeats it): a torn read cannot pass ``decode``."""
    return MAGIC + struct.pack("<Q", version) + bytes([version % 251]) * (size + version % 97)


def decode(data: bytes) -> int:
    assert data[:8] == MAGIC
    (v,) = struct.unpack("<Q", data[8:16])
    assert data[16:] == bytes([v % 251]) * (len(data) - 16), "mixed bytes from two versions"
    return v


def fake_validator(data: bytes) -> dict:
    """Stands in for format.inspect_packed: rejects non-test blobs, derives meta from the bytes."""
    try:
        v = decode(data)
    except AssertionError:
        raise InvalidAdapterError("not a test adapter", code="bad_header") from None
    return {"kind": "prefix", "num_virtual_tokens": v, "labels": ("neg", "pos"), "fingerprint": f"fp-{v}"}


class StoreFactory:
    """``backend()`` -> a new client of one fresh store (every call opens the same URL)."""

    def __init__(self, kind: str, url: str, extra: dict):
        self.kind, self.url, self.extra = kind, url, extra
        self.opened: list[AdapterStore] = []

    def __call__(self, **opts) -> AdapterStore:
        validator = opts.pop("validator", fake_validator)  # validator=None -> format.inspect_packed
        store = open_store(self.url, validator=validator, **{**self.extra, **opts})
        self.opened.append(store)
        return store


@pytest.fixture(params=["file", "redis"])
def backend(request, tmp_path):
    if request.param == "file":
        url, extra = f"file://{tmp_path}/store", {"poll_interval": 0.05}
    else:
        server = request.getfixturevalue("redis_server")
        url, extra = f"{server.url}?prefix={request.getfixturevalue('redis_prefix')}", {}
    factory = StoreFactory(request.param, url, extra)
    yield factory
    for store in factory.opened:
        store.close()


@pytest.fixture
def store(backend):
    s = backend()
    s.create_tenant("acme")
    return s


def test_round_trip_is_byte_exact_and_meta_comes_from_validator(store):
    data = make_blob(1) + b""
    info = store.put("acme", "sentiment", data)
    assert (info.version, info.size, info.tenant, info.prefix_id) == (1, len(data), "acme", "sentiment")
    assert (
        info.meta["kind"] == "prefix" and info.meta["labels"] == ["neg", "pos"] and info.meta["fingerprint"] == "fp-1"
    )
    got_info, got = store.get("acme", "sentiment")
    assert got == data and got_info == info == store.head("acme", "sentiment")
    assert store.list("acme") == [info]
    payload = MAGIC + struct.pack("<Q", 0)  # version 0: an empty body is valid to the fake validator
    store.put("acme", "tiny", payload)
    assert store.get("acme", "tiny")[1] == payload


def test_versions_increase_old_ones_are_collected_and_numbers_survive_delete(backend):
    store = backend(keep_versions=3, retain_grace_s=0)  # no grace window: dropped versions go at once
    store.create_tenant("acme")
    for v in range(1, 6):
        assert store.put("acme", "x", make_blob(v)).version == v
    assert [i.version for i in store.versions("acme", "x")] == [3, 4, 5]
    assert decode(store.get("acme", "x", version=4)[1]) == 4
    assert decode(store.get("acme", "x", version="3")[1]) == 3
    with pytest.raises(NotFoundError):
        store.get("acme", "x", version=1)  # collected
    store.delete("acme", "x")
    for call in (
        lambda: store.get("acme", "x"),
        lambda: store.head("acme", "x"),
        lambda: store.versions("acme", "x"),
        lambda: store.get("acme", "x", 5),
        lambda: store.delete("acme", "x"),
    ):
        with pytest.raises(NotFoundError):
            call()
    assert store.put("acme", "x", make_blob(9)).version == 6  # never reuses a number a cache may hold
    assert store.list("acme")[0].version == 6


def test_quota_is_enforced_and_counts_current_versions(backend):
    store = backend()
    size = len(make_blob(1))
    store.create_tenant("small", Quota(max_adapters=2, max_bytes=3 * size))
    store.put("small", "a", make_blob(1))
    store.put("small", "b", make_blob(1))
    with pytest.raises(QuotaExceededError) as err:
        store.put("small", "c", make_blob(1))
    assert err.value.code == "quota_adapters" and err.value.status == 429
    store.put("small", "a", make_blob(1))  # overwriting does not add an adapter, and old bytes are released
    store.set_quota("small", Quota(max_adapters=5, max_bytes=3 * size))
    store.put("small", "c", make_blob(1))
    with pytest.raises(QuotaExceededError) as err:
        store.put("small", "d", make_blob(1))
    assert err.value.code == "quota_bytes"
    info = store.tenant_info("small")
    assert (info.adapters, info.bytes) == (3, 3 * size)
    store.delete("small", "c")
    store.put("small", "d", make_blob(1))  # a delete frees quota
    assert [i.prefix_id for i in store.list("small")] == ["a", "b", "d"]


def test_tenants_are_isolated_and_existence_never_leaks(store):
    store.create_tenant("globex")
    store.put("acme", "sentiment", make_blob(1))
    store.put("globex", "sentiment", make_blob(2))  # both tenants may own "sentiment"
    assert decode(store.get("acme", "sentiment")[1]) == 1
    assert decode(store.get("globex", "sentiment")[1]) == 2
    store.put("acme", "only-acme", make_blob(3))
    errors = []
    for call in (
        lambda: store.get("globex", "only-acme"),
        lambda: store.head("globex", "only-acme"),
        lambda: store.get("globex", "never-existed"),
        lambda: store.get("nobody", "only-acme"),
        lambda: store.delete("globex", "only-acme"),
    ):
        with pytest.raises(NotFoundError) as err:
            call()
        errors.append((err.value.code, err.value.status))
    assert set(errors) == {("not_found", 404)}
    assert "only-acme" not in [i.prefix_id for i in store.list("globex")]
    with pytest.raises(NotFoundError):
        store.put("nobody", "x", make_blob(1))


@pytest.mark.parametrize(
    "bad", ["", "../etc", "..", ".hidden", "a/b", "a\\b", "x" * 129, "a:b", "sp ace", "é", "a\x00b", None, 7]
)
def test_bad_ids_and_tenant_names_are_rejected_before_any_io(store, bad):
    for call in (
        lambda: store.put("acme", bad, make_blob(1)),
        lambda: store.get("acme", bad),
        lambda: store.head(bad, "x"),
        lambda: store.create_tenant(bad),
        lambda: store.delete(bad, "x"),
        lambda: store.list(bad),
    ):
        with pytest.raises(InvalidIdError) as err:
            call()
        assert err.value.status == 400
    assert store.list("acme") == []


def test_rejected_put_stores_nothing_and_keeps_previous_version(store):
    store.put("acme", "x", make_blob(1))
    for bad in (b"garbage", b"", make_blob(2)[:-1] + b"\x00"):
        with pytest.raises(InvalidAdapterError):
            store.put("acme", "x", bad)
    with pytest.raises(InvalidAdapterError):
        store.put("acme", "fresh", b"garbage")
    assert [(i.prefix_id, i.version) for i in store.list("acme")] == [("x", 1)]
    assert [i.version for i in store.versions("acme", "x")] == [1]
    assert store.tenant_info("acme").bytes == len(make_blob(1))
    assert store.put("acme", "x", make_blob(3)).version == 2  # a rejected put burns no number (or only gaps)


def test_api_keys_authenticate_rotate_revoke_and_delete_tenant(store):
    key = store.create_tenant("globex", Quota(max_adapters=1, max_bytes=0))
    assert key.startswith("psk_") and store.authenticate(key) == "globex"
    for wrong in (key[:-1] + ("A" if key[-1] != "A" else "B"), "psk_nope", "", None, key.replace("psk_", "xxx_")):
        assert store.authenticate(wrong) is None
    new = store.rotate_key("globex")
    assert store.authenticate(new) == "globex" and store.authenticate(key) is None
    extra = store.rotate_key("globex", revoke_old=False)
    assert store.authenticate(new) == store.authenticate(extra) == "globex"
    assert len(store.tenant_info("globex").key_ids) == 2
    assert store.revoke_key("globex", extra.split("_")[1]) == 1
    assert store.authenticate(extra) is None and store.authenticate(new) == "globex"
    assert {t.name for t in store.list_tenants()} == {"acme", "globex"}
    store.put("globex", "a", make_blob(1))
    store.delete_tenant("globex")
    assert store.authenticate(new) is None
    assert [t.name for t in store.list_tenants()] == ["acme"]
    with pytest.raises(NotFoundError):
        store.get("globex", "a")
    store.create_tenant("globex")  # a recreated tenant starts empty
    assert store.list("globex") == []
    assert store.revoke_key("globex") == 1 and store.tenant_info("globex").key_ids == ()


def test_writer_overwriting_while_readers_read_never_tears(backend):
    writer, readers = backend(keep_versions=2), [backend(), backend()]
    writer.create_tenant("acme")
    writer.put("acme", "hot", make_blob(1, 16384))
    stop, reads, problems = threading.Event(), [0, 0], []

    def read(i):
        last = 0
        while not stop.is_set():
            try:
                info, data = readers[i].get("acme", "hot")
                v = decode(data)
                assert info.version == v and info.meta["num_virtual_tokens"] == v and info.size == len(data)
                assert v >= last, "went back in time"
                last = v
                reads[i] += 1
            except Exception as exc:
                problems.append(repr(exc))
                return

    threads = [threading.Thread(target=read, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20  # stops as soon as enough has happened; a loaded box gets more time
    v = 1
    while time.monotonic() < deadline and (sum(reads) < 2000 or v < 60):
        v += 1
        writer.put("acme", "hot", make_blob(v, 16384))
    stop.set()
    for t in threads:
        t.join()
    assert not problems, problems[:3]
    assert sum(reads) >= 1000 and v >= 30, (reads, v)
    print(f"{backend.kind}: {sum(reads)} reads, {v} versions")
    assert decode(readers[0].get("acme", "hot")[1]) == v


def test_backends_implement_both_protocols(store):
    assert isinstance(store, AdapterReader) and isinstance(store, AdapterStore)


def test_invalidation_reaches_a_second_client_within_one_second(backend):
    a, b = backend(), backend()
    a.create_tenant("acme")
    a.put("acme", "x", make_blob(1))
    events, got = [], threading.Event()

    def on_event(event: ChangeEvent):
        if not event.resync and event.prefix_id == "x":
            events.append(event)
            got.set()

    sub = b.subscribe(on_event)
    assert decode(b.get("acme", "x")[1]) == 1
    t0 = time.monotonic()
    a.put("acme", "x", make_blob(2))
    assert got.wait(1.0), "no change event within 1 s"
    assert events[-1] == ChangeEvent("acme", "x", 2)
    assert decode(b.get("acme", "x")[1]) == 2 and time.monotonic() - t0 < 1.0
    got.clear()
    a.delete("acme", "x")
    assert got.wait(1.0) and events[-1] == ChangeEvent("acme", "x", None)
    sub.close()


def test_default_validator_accepts_a_real_packed_adapter_and_rejects_junk(backend):
    torch = pytest.importorskip("torch")
    from prefixserve.adapters.format import dump_packed

    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "SEQ_CLS",
        "num_virtual_tokens": 4,
        "token_dim": 32,
        "num_layers": 2,
        "num_attention_heads": 4,
    }
    g = torch.Generator().manual_seed(0)
    tensors = {
        "prompt_embeddings": torch.randn(4, 2 * 2 * 32, generator=g),  # (P, layers*2*hidden)
        "base_model.classifier.dense.weight": torch.randn(32, 32, generator=g),
        "base_model.classifier.dense.bias": torch.randn(32, generator=g),
        "base_model.classifier.out_proj.weight": torch.randn(2, 32, generator=g),
        "base_model.classifier.out_proj.bias": torch.randn(2, generator=g),
    }
    data = dump_packed(config, tensors, ["neg", "pos"], "sha256:test-backbone")
    store = backend(validator=None)  # None -> format.inspect_packed
    store.create_tenant("acme")
    info = store.put("acme", "real", data)
    assert info.meta["kind"] == "prefix" and info.meta["num_virtual_tokens"] == 4
    assert info.meta["labels"] == ["neg", "pos"] and info.meta["fingerprint"] == "sha256:test-backbone"
    assert store.get("acme", "real")[1] == data
    with pytest.raises(InvalidAdapterError):
        store.put("acme", "junk", data[:100])
    assert [i.prefix_id for i in store.list("acme")] == ["real"]


def accept_any(data: bytes) -> dict:
    return {"kind": "prefix", "num_virtual_tokens": 1, "labels": ["a"], "fingerprint": "sha256:x"}


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_quota_holds_under_concurrent_puts(kind, request, tmp_path):
    if kind == "file":
        url = f"file://{tmp_path}/store"
    else:
        server = request.getfixturevalue("redis_server")
        url = f"{server.url}?prefix={request.getfixturevalue('redis_prefix')}"
    stores = [open_store(url, validator=accept_any) for _ in range(4)]
    stores[0].create_tenant("acme", Quota(max_adapters=5, max_bytes=0))
    results = []

    def push(i):
        for j in range(5):
            try:
                stores[i].put("acme", f"id{i}-{j}", b"x" * 100)
                results.append("ok")
            except QuotaExceededError:
                results.append("quota")

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("quota") == 15
    info = stores[0].tenant_info("acme")
    assert (info.adapters, info.bytes) == (5, 500)
    for s in stores:
        s.close()

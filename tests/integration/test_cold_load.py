"""A Worker's cold load through both stores (file:// and a real redis-server), up to the engine:
``store.get(version)`` -> the digest check of ``Worker._fetch`` -> ``load_packed`` -> ``to_device_tensors``.

The bytes are hashed once, by the store; what the Worker no longer re-hashes must still never be served:
a blob that does not match its record is a ``NotFoundError``, on the versioned (one round trip) read too.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest
import torch
from safetensors.torch import load as st_load

from prefixserve.adapters.errors import NotFoundError
from prefixserve.adapters.format import BackboneSpec, load_packed
from prefixserve.adapters.ref import AdapterRef
from prefixserve.adapters.store.redis_store import RedisStore
from prefixserve.adapters.synthetic import random_adapter
from prefixserve.adapters.transfer import to_device_tensors
from tests.integration import test_store_behaviour as behaviour
from tests.integration.test_store_safety import tamper

backend = behaviour.backend  # file:// and a real redis-server
FP = "sha256:cold-load-test"
CONFIG = SimpleNamespace(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, model_type="roberta")
SPEC = BackboneSpec(FP, num_layers=2, num_heads=4, hidden=64, head_style="roberta", max_virtual_tokens=100)


def cold_load(store, tenant: str, prefix_id: str, version: int, sha256: str) -> dict[str, torch.Tensor]:
    info, data = store.get(tenant, prefix_id, version)
    if info.sha256 != sha256 or info.size != len(data):  # Worker._fetch
        raise NotFoundError("another version")
    return to_device_tensors(load_packed(data, expect=SPEC).tensors, "cpu", torch.float32)


def test_cold_loads_give_the_stored_tensors_and_leave_earlier_ones_intact(backend):
    store = backend(validator=None)  # the real validator: format.inspect_packed
    store.create_tenant("acme")
    blobs = [random_adapter(CONFIG, FP, num_virtual_tokens=5, seed=s) for s in range(4)]
    infos = [store.put("acme", "m", blob) for blob in blobs]  # keeps the last 3 versions
    loaded = [cold_load(store, "acme", "m", i.version, i.sha256) for i in infos[1:]]
    loaded.append(cold_load(store, "acme", "m", infos[-1].version, infos[-1].sha256))  # another read of the same
    for tensors, blob in zip(loaded, [*blobs[1:], blobs[-1]]):
        expected = st_load(blob)
        assert tensors.keys() == expected.keys()
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_a_blob_that_does_not_match_its_record_is_never_loaded(backend):
    store = backend(validator=None)
    store.create_tenant("acme")
    good = random_adapter(CONFIG, FP, num_virtual_tokens=5, seed=1)
    info = store.put("acme", "m", good)
    assert cold_load(store, "acme", "m", info.version, info.sha256)
    evil = random_adapter(CONFIG, FP, num_virtual_tokens=5, seed=2)  # valid, same size, other bytes
    assert len(evil) == len(good)
    tamper(store, "acme", "m", info.version, evil)
    for version in (info.version, None):
        with pytest.raises(NotFoundError):
            store.get("acme", "m", version)
    with pytest.raises(NotFoundError):
        cold_load(store, "acme", "m", info.version, info.sha256)


def test_a_versioned_redis_read_is_one_round_trip(backend):
    store = backend(validator=None)
    if not isinstance(store, RedisStore):
        pytest.skip("redis only")
    store.create_tenant("acme")
    info = store.put("acme", "m", random_adapter(CONFIG, FP, num_virtual_tokens=5))
    calls: list[str] = []
    client = store._r
    original_pipeline, original_get = client.pipeline, client.get

    def pipeline(*args, **kwargs):
        calls.append("pipeline")
        return original_pipeline(*args, **kwargs)

    def get(*args, **kwargs):
        calls.append("get")
        return original_get(*args, **kwargs)

    client.pipeline, client.get = pipeline, get
    try:
        assert store.get("acme", "m", info.version)[0] == info
        assert calls == ["pipeline"]
        assert store.get("acme", "m")[0] == info  # the served one: pin + pointer (one round trip), then the blob
        assert calls == ["pipeline", "pipeline", "get"]
        store.delete("acme", "m")
        with pytest.raises(NotFoundError):
            store.get("acme", "m", info.version)
    finally:
        client.pipeline, client.get = original_pipeline, original_get


def test_the_worker_serves_only_the_digest_its_ref_names(backend):
    """``Worker._fetch`` compares the store-checked record with the ref: another digest or size is a 404."""
    from prefixserve.server.worker import Worker  # imports Ray Serve: only here

    store = backend(validator=None)
    store.create_tenant("acme")
    info = store.put("acme", "m", random_adapter(CONFIG, FP, num_virtual_tokens=5))
    fetch = cast(Any, Worker).func_or_class._fetch
    replica = SimpleNamespace(store=store)
    assert len(fetch(replica, AdapterRef("acme", "m", info.version, info.sha256))) == info.size
    with pytest.raises(NotFoundError):
        fetch(replica, AdapterRef("acme", "m", info.version, "0" * 64))

    class LyingReader:  # a record whose size disagrees with the bytes (a backend bug): refused too
        def get(self, tenant, prefix_id, version=None):
            got, data = store.get(tenant, prefix_id, version)
            return replace(got, size=got.size + 1), data

    with pytest.raises(NotFoundError):
        fetch(SimpleNamespace(store=LyingReader()), AdapterRef("acme", "m", info.version, info.sha256))

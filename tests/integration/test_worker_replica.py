"""The Worker replica and the quickstart demo in-process, on tiny backbones (no Ray cluster)."""

from __future__ import annotations

import os
from typing import Any, cast


def test_quickstart_demo_adapter_runs(tiny_backbones):
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.server.quickstart import demo_adapter

    for arch in ("roberta", "bert"):
        bb = load_backbone(tiny_backbones[arch], device="cpu")
        data = demo_adapter(tiny_backbones[arch], bb.fingerprint, num_virtual_tokens=4)
        engine = Engine(bb)
        pred = engine.predict([Row(engine.to_device("demo", data), "this movie was great")])[0]
        assert pred.label in ("negative", "positive") and abs(sum(pred.scores.values()) - 1) < 1e-5


def test_quickstart_falls_back_when_offline(tiny_backbones, monkeypatch):
    from prefixserve.server.quickstart import resolve_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_backbone(tiny_backbones["roberta"]) == (tiny_backbones["roberta"], None)
    path, notice = resolve_backbone("klue/definitely-not-cached-model")
    assert notice and "FALLING BACK" in notice and os.path.isfile(os.path.join(path, "config.json"))


def test_worker_batches_across_requests_and_isolates_failures(tiny_backbones, tmp_path):
    """The Worker deployment class in-process (no cluster), with its real fair batcher: rows of concurrent
    calls share forwards, a missing adapter fails only its call, a failing row only itself."""
    import asyncio
    import pickle

    from prefixserve.adapters.engine import Prediction
    from prefixserve.adapters.errors import PrefixServeError
    from prefixserve.adapters.ref import AdapterRef
    from prefixserve.adapters.store import ChangeEvent, open_store
    from prefixserve.server.protocol import ClassifyCall
    from prefixserve.server.quickstart import demo_adapter
    from prefixserve.server.schemas import AppSettings
    from prefixserve.server.worker import Worker

    url = f"file://{tmp_path / 'store'}"
    settings = AppSettings(
        backbone=tiny_backbones["roberta"], store=url, device="cpu", dtype="float32", torch_threads=1
    )
    replica = cast(Any, Worker).func_or_class(settings)  # the class under @serve.deployment

    store = open_store(url)
    fp = replica.backbone.fingerprint
    for tenant in ("a", "b"):
        store.create_tenant(tenant)
        for i in range(2):
            store.put(
                tenant,
                f"p{i}",
                demo_adapter(tiny_backbones["roberta"], fp, num_virtual_tokens=3 + i, seed=10 * ord(tenant) + i),
            )
    texts = ("this movie was great", "so boring", "i love it")

    async def run(calls):
        return await asyncio.gather(*(replica.classify(c) for c in calls))

    def ref(tenant: str, prefix_id: str) -> AdapterRef:  # what the Ingress resolves with store.head
        head = store.head(tenant, prefix_id)
        return AdapterRef(tenant, prefix_id, head.version, head.sha256)

    calls = [ClassifyCall(ref(t, f"p{i}"), texts) for t in ("a", "b") for i in range(2)]
    alone = [asyncio.run(run([c]))[0] for c in calls]
    together = asyncio.run(run([*calls, ClassifyCall(AdapterRef("a", "missing", 1, "0" * 64), ("x",))]))
    missing = together[-1].error
    assert missing is not None and (missing.code, missing.status) == ("not_found", 404) and not together[-1].results
    for one, many in zip(alone, together):
        assert one.first_error() is None and many.first_error() is None and many.ref == one.ref
        for x, y in zip(one.predictions(), many.predictions()):
            assert x.label == y.label
            assert all(abs(x.scores[k] - y.scores[k]) < 1e-5 for k in x.scores)
    assert pickle.loads(pickle.dumps(together[0])) == together[0]  # typed replies survive the Ray boundary
    snap = together[0].stats
    assert sum(snap.batch_rows.counts[3:]) >= 1  # a forward of > 4 rows: rows of several calls
    assert sum(snap.batch_adapters.counts[1:]) >= 1  # ... and of several adapters

    refs = {(c.ref.tenant, c.ref.prefix_id): c.ref for c in calls}
    replica._on_change(ChangeEvent("a", "p1", 1))  # the version it holds: kept
    replica._on_change(ChangeEvent("a", "p0", 2))  # superseded: dropped from the device
    replica._on_change(ChangeEvent("b", "p0", None))  # deleted: dropped
    cache = replica.engine.cache
    assert refs["a", "p1"] in cache and refs["a", "p0"] not in cache
    assert refs["b", "p0"] not in cache and refs["b", "p1"] in cache

    real = replica.engine.predict

    def flaky(rows):
        if any(r.text == "boom" for r in rows):
            raise RuntimeError("bad row /secret/path")
        return real(rows)

    replica.engine.predict = flaky
    out = asyncio.run(run([ClassifyCall(refs["a", "p0"], ("fine", "boom", "ok"))]))[0]
    assert [isinstance(r, PrefixServeError) for r in out.results] == [False, True, False]
    assert isinstance(out.results[0], Prediction)
    bad = out.first_error()
    assert bad is not None and bad.code == "internal" and bad.status == 500
    assert "secret" not in bad.message and "RuntimeError" not in bad.message  # no internal text
    store.close()


def test_a_reused_name_is_never_served_the_old_owners_adapter(tiny_backbones, tmp_path):
    """Delete a tenant, re-create it, upload another adapter under the same prefix id, as fast as the
    store allows: the new owner gets the new adapter, and a ref to the old bytes is a 404, never the new ones."""
    import asyncio

    from prefixserve.adapters.engine import Row
    from prefixserve.adapters.errors import NotFoundError
    from prefixserve.adapters.ref import AdapterRef
    from prefixserve.adapters.store import open_store
    from prefixserve.server.protocol import ClassifyCall
    from prefixserve.server.quickstart import demo_adapter
    from prefixserve.server.schemas import AppSettings
    from prefixserve.server.worker import Worker

    url = f"file://{tmp_path / 'store'}"
    settings = AppSettings(
        backbone=tiny_backbones["roberta"], store=url, device="cpu", dtype="float32", torch_threads=1
    )
    replica = cast(Any, Worker).func_or_class(settings)
    replica._on_change = lambda event: None  # the change feed may lag arbitrarily: correctness must not need it
    store = open_store(url)
    fp = replica.backbone.fingerprint
    texts = ("this movie was great", "so boring")

    def classify(ref: AdapterRef):
        return asyncio.run(replica.classify(ClassifyCall(ref, texts)))

    def own_answer(data: bytes, key: str) -> list[dict[str, float]]:  # the adapter alone, from its own bytes
        adapter = replica.engine.to_device(key, data)
        return [p.scores for p in replica.engine.predict([Row(adapter, t) for t in texts])]

    old = None
    for attempt in range(5):
        store.create_tenant("t")
        data = demo_adapter(tiny_backbones["roberta"], fp, num_virtual_tokens=3, seed=100 + attempt)
        info = store.put("t", "m", data)
        ref = AdapterRef("t", "m", info.version, info.sha256)
        reply = classify(ref)
        assert reply.first_error() is None
        assert [p.scores for p in reply.predictions()] == own_answer(data, f"new{attempt}")
        if old is not None:
            old_ref, old_data = old
            assert ref != old_ref and own_answer(data, "x") != own_answer(old_data, "y")
            stale = classify(old_ref)  # resolved before the delete, arriving after: its own bytes or a 404
            if stale.error is None:
                assert [p.scores for p in stale.predictions()] == own_answer(old_data, f"old{attempt}")
            else:
                assert isinstance(stale.error, NotFoundError)
            replica.engine.cache.discard(old_ref)  # evicted meanwhile: now it must be a 404, not the new bytes
            assert isinstance(classify(old_ref).error, NotFoundError)
        old = (ref, data)
        store.delete_tenant("t")
    store.close()

"""The ``Backbone`` deployment: holds the Engine and the device adapter cache; batches rows across tenants.

Transport split (as LitServe): the Ingress decodes and validates; here a request is resolved to a
device adapter (a store fetch on a miss, off the event loop), *then* split into rows that enter
``@serve.batch`` one by one, so a batch mixes rows of many requests, tenants and adapters; one
``Engine.predict`` runs them in ONE forward; results go back per row and are re-assembled per request.

Decisions:
* Requests carry ``(tenant, prefix_id, version)`` in the payload, never ``serve_multiplexed_model_id``
  (Serve splits batches by multiplexed id, which would defeat cross-tenant batching).
* The Ingress names the version (it ``head``s the store on every request), so coherence does not
  depend on this replica: the cache key ``tenant/prefix@version`` is immutable and a new version is a
  miss. The store's change feed only evicts superseded versions early (memory, not correctness).
* Validation happens before batching: a missing adapter or bad file fails its own request before
  any row is queued. If a forward still fails (should not happen), the batch is re-run row by row so
  that only the bad row reports an error.
* Rows are plain tuples and results plain dicts: nothing raised crosses the handle (a custom
  exception's constructor need not survive Ray's re-raise wrapper); errors are
  ``{"error": {"code", "message", "status"}}``.
* ``max_batch_size`` and ``batch_wait_timeout_s`` come from ``user_config`` (``reconfigure``), so they can
  be changed on a running deployment without restarting replicas.
* The model is loaded in ``__init__`` (inside the replica), never when the application is built.
* No custom ``check_health`` on the store: a store outage must not make Serve restart (and reload)
  every Backbone replica; the Ingress's ``/readyz`` reports the store instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict

from ray import serve

from prefixserve.adapters.errors import PrefixServeError

from .metrics import BackboneStats

log = logging.getLogger("prefixserve.backbone")
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT_S = 0.005


def error_dict(exc: BaseException) -> dict:
    if isinstance(exc, PrefixServeError):
        return {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
    log.exception("internal error", exc_info=exc)
    return {"error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}", "status": 500}}


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit use)
        return "local"


@serve.deployment(
    name="Backbone",
    max_ongoing_requests=2 * DEFAULT_MAX_BATCH_SIZE,
    user_config={"max_batch_size": DEFAULT_MAX_BATCH_SIZE, "batch_wait_timeout_s": DEFAULT_BATCH_WAIT_S},
)
class Backbone:
    def __init__(
        self,
        backbone: str,
        store: str,
        device: str = "auto",
        dtype: str = "float32",
        cache_bytes: int = 2 * 2**30,
        torch_threads: int | None = None,
    ):
        import torch

        from prefixserve.adapters.backbone import load_backbone
        from prefixserve.adapters.engine import Engine
        from prefixserve.adapters.store import open_store

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        t0 = time.perf_counter()
        self.backbone = load_backbone(backbone, device=device, dtype=dtype)
        self.engine = Engine(self.backbone, cache_bytes=cache_bytes)
        self.spec = self.backbone.spec
        self.replica = _replica_id()
        self.stats = BackboneStats(self.replica)
        self.store = open_store(store)
        self._inflight: dict[str, asyncio.Future] = {}
        self._loaded: dict[tuple[str, str], set[int]] = {}  # versions put on the device, per prefix
        self._loaded_lock = threading.Lock()
        self._idle = asyncio.Event()  # set while no forward runs (see _infer)
        self._idle.set()
        self._subscription = self.store.subscribe(self._on_change)  # last: the callback uses the above
        log.info(
            "backbone %s (%s) loaded on %s/%s in %.1fs",
            backbone,
            self.backbone.fingerprint[:19],
            self.backbone.device,
            dtype,
            time.perf_counter() - t0,
        )

    # ---- control ----------------------------------------------------------------------------------
    def reconfigure(self, user_config: dict) -> None:
        cfg = user_config or {}
        self._infer.set_max_batch_size(int(cfg.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)))
        self._infer.set_batch_wait_timeout_s(float(cfg.get("batch_wait_timeout_s", DEFAULT_BATCH_WAIT_S)))

    def info(self) -> dict:
        """What the Ingress needs to validate uploads against this backbone."""
        return {
            "backbone": self.backbone.name,
            "fingerprint": self.backbone.fingerprint,
            "spec": asdict(self.spec),
            "device": str(self.backbone.device),
            "replica": self.replica,
            "max_batch_size": self._infer._get_max_batch_size(),
            "batch_wait_timeout_s": self._infer._get_batch_wait_timeout_s(),
        }

    def ready(self) -> bool:
        return True

    def stats_snapshot(self) -> dict:
        return self.stats.snapshot(self.engine.cache.stats)

    def _on_change(self, event) -> None:
        """Change feed (store thread): drop superseded versions of that prefix from the device."""
        if getattr(event, "resync", False):
            return  # versions are in the keys: nothing stale can be served, only memory is at stake
        keep = {event.version} if event.version is not None else set()
        with self._loaded_lock:
            loaded = self._loaded.pop((event.tenant, event.prefix_id), set())
            if loaded & keep:
                self._loaded[(event.tenant, event.prefix_id)] = loaded & keep
        for v in loaded - keep:
            self.engine.cache.discard(f"{event.tenant}/{event.prefix_id}@{v}")

    def __del__(self):
        try:
            self._subscription.close()
            self.store.close()
        except Exception:
            pass

    # ---- adapters ---------------------------------------------------------------------------------
    def _load(self, key: str, tenant: str, prefix_id: str, version: int):
        """Blocking: fetch the packed bytes and put them on the device (validated against this backbone)."""
        t0 = time.perf_counter()
        ok = False
        try:
            adapter = self.engine.adapter(key, lambda: self.store.get(tenant, prefix_id, version)[1])
            with self._loaded_lock:
                self._loaded.setdefault((tenant, prefix_id), set()).add(version)
            ok = True
            return adapter
        finally:
            self.stats.fetch(time.perf_counter() - t0, ok)

    async def _adapter(self, tenant: str, prefix_id: str, version: int):
        key = f"{tenant}/{prefix_id}@{version}"
        hit = self.engine.cache.lookup(key)
        if hit is not None:
            return hit
        fut = self._inflight.get(key)
        if fut is None:  # one fetch per key however many requests miss at once
            fut = asyncio.ensure_future(asyncio.to_thread(self._load, key, tenant, prefix_id, version))
            self._inflight[key] = fut
            fut.add_done_callback(lambda _f, k=key: self._inflight.pop(k, None))
        return await asyncio.shield(fut)

    # ---- requests ---------------------------------------------------------------------------------
    async def classify(self, request: dict) -> dict:
        """``{tenant, prefix_id, version, inputs, text_pairs?}`` -> ``{version, replica, results, stats}``.

        ``results`` holds one dict per input: a prediction or ``{"error": ...}``.
        """
        tenant, prefix_id, version = request["tenant"], request["prefix_id"], int(request["version"])
        try:
            adapter = await self._adapter(tenant, prefix_id, version)
        except Exception as exc:  # not found / invalid: fails this request only, before batching
            return {
                "version": version,
                "replica": self.replica,
                "error": error_dict(exc)["error"],
                "stats": self.stats_snapshot(),
            }
        pairs = request.get("text_pairs") or [None] * len(request["inputs"])
        await self._idle.wait()  # join the NEXT batch together with everyone who arrived during this forward
        results = await asyncio.gather(
            *(self._infer((adapter, text, pair)) for text, pair in zip(request["inputs"], pairs))
        )
        return {"version": version, "replica": self.replica, "results": results, "stats": self.stats_snapshot()}

    @serve.batch(max_batch_size=DEFAULT_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_S)
    async def _infer(self, rows: list[tuple]) -> list[dict]:
        # rows: [(DeviceAdapter, text, pair)] from any requests. The forward runs off the event loop, so
        # fetches and new arrivals proceed meanwhile. Serve forms the next batch as soon as its wait
        # expires, even while this forward runs (it then waits for the semaphore), so rows arriving
        # mid-forward would go out in many tiny batches; instead they wait on ``_idle`` in classify()
        # and are released together when this forward ends: one full batch.
        self._idle.clear()
        try:
            return await asyncio.to_thread(self._forward, rows)
        finally:
            self._idle.set()

    def _forward(self, rows: list[tuple]) -> list[dict]:
        from prefixserve.adapters.engine import Row

        batch = [Row(a, text, pair) for a, text, pair in rows]
        t0 = time.perf_counter()
        try:
            preds = self.engine.predict(batch)  # ONE forward for all rows: B = len(rows)
            out = [p.to_dict() for p in preds]  # label, score, scores, truncated
        except Exception:
            log.exception("batch of %d failed; retrying row by row", len(batch))
            out = []
            for row in batch:
                try:
                    out.append(self.engine.predict([row])[0].to_dict())
                except Exception as exc:
                    out.append(error_dict(exc))
        self.stats.batch(len(batch), len({r.adapter.key for r in batch}), time.perf_counter() - t0)
        return out

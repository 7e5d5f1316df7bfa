"""The ``Worker`` deployment: holds the Engine and the device adapter cache; batches rows across tenants.

Naming: *backbone* is the setting (a hub id or folder) and the loaded encoder
(:class:`prefixserve.adapters.backbone.Backbone`); the Serve deployment that runs it is the Worker.

Transport split (as LitServe): the Ingress decodes and validates; here a :class:`ClassifyCall` is
resolved to a device adapter (a store fetch on a miss, off the event loop), *then* split into rows that
enter ``@serve.batch`` one by one, so a batch mixes rows of many requests, tenants and adapters; one
``Engine.predict`` runs them in ONE forward; results go back per row and are re-assembled per request.

Decisions:
* Calls carry an :class:`AdapterRef` in the payload, never ``serve_multiplexed_model_id`` (Serve
  splits batches by multiplexed id, which would defeat cross-tenant batching).
* The Ingress names the version (it ``head``s the store on every request), so coherence does not
  depend on this replica: the device cache is keyed by the immutable ref and a new version is a
  miss. The store's change feed only evicts superseded versions early (memory, not correctness).
* Validation happens before batching: a missing adapter or bad file fails its own call before any
  row is queued. If a forward still fails (should not happen), the batch is re-run row by row so
  that only the bad row reports an error.
* Nothing is raised through the handle: a :class:`ClassifyReply` carries errors as values.
* ``max_batch_size`` and ``batch_wait_timeout_s`` come from ``user_config`` (``reconfigure``), so they
  can be changed on a running deployment without restarting replicas.
* The model is loaded in ``__init__`` (inside the replica), never when the application is built.
* No custom ``check_health`` on the store: a store outage must not make Serve restart (and reload)
  every Worker replica; the Ingress's ``/readyz`` reports the store instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Any

from ray import serve

from prefixserve.adapters.engine import DeviceAdapter, Row
from prefixserve.adapters.errors import as_error
from prefixserve.adapters.ref import AdapterRef
from prefixserve.adapters.store import AdapterReader, ChangeEvent

from .metrics import WorkerSnapshot, WorkerStats
from .protocol import ClassifyCall, ClassifyReply, RowResult, WorkerInfo
from .schemas import DEFAULTS, AppSettings, BatchingConfig

log = logging.getLogger("prefixserve.worker")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit use)
        return "local"


@serve.deployment(
    name="Worker",
    max_ongoing_requests=DEFAULTS.worker_max_ongoing,
    user_config=DEFAULTS.user_config(),
)
class Worker:
    def __init__(self, settings: AppSettings):
        import torch

        from prefixserve.adapters.backbone import load_backbone
        from prefixserve.adapters.engine import Engine
        from prefixserve.adapters.store import open_store

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        t0 = time.perf_counter()
        self.backbone = load_backbone(settings.backbone, device=settings.device, dtype=settings.dtype)
        self.engine = Engine(self.backbone, cache_bytes=settings.cache_bytes)
        self.replica = _replica_id()
        self.stats = WorkerStats(self.replica)
        self.store: AdapterReader = open_store(settings.store)  # the read side only: head / get / subscribe
        self._inflight: dict[AdapterRef, asyncio.Future[DeviceAdapter]] = {}
        self._loaded: dict[tuple[str, str], set[int]] = {}  # versions put on the device, per prefix
        self._loaded_lock = threading.Lock()
        self._idle = asyncio.Event()  # set while no forward runs (see _infer)
        self._idle.set()
        self._subscription = self.store.subscribe(self._on_change)  # last: the callback uses the above
        log.info(
            "backbone %s (%s) loaded on %s/%s in %.1fs",
            settings.backbone,
            self.backbone.fingerprint[:19],
            self.backbone.device,
            settings.dtype,
            time.perf_counter() - t0,
        )

    # ---- control ----------------------------------------------------------------------------------
    @property
    def _batcher(self) -> Any:  # @serve.batch's wrapper: its setters are not in the type
        return self._infer

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchingConfig(**(user_config or {}))
        self._batcher.set_max_batch_size(cfg.max_batch_size)
        self._batcher.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def info(self) -> WorkerInfo:
        """What the Ingress needs to validate uploads against this backbone."""
        return WorkerInfo(
            backbone=self.backbone.name,
            fingerprint=self.backbone.fingerprint,
            spec=self.backbone.spec,
            device=str(self.backbone.device),
            replica=self.replica,
            max_batch_size=self._batcher._get_max_batch_size(),
            batch_wait_timeout_s=self._batcher._get_batch_wait_timeout_s(),
        )

    def ready(self) -> bool:
        return True

    def stats_snapshot(self) -> WorkerSnapshot:
        return self.stats.snapshot(self.engine.cache.stats)

    def _on_change(self, event: ChangeEvent) -> None:
        """Change feed (store thread): drop superseded versions of that prefix from the device."""
        if event.resync:
            return  # versions are in the refs: nothing stale can be served, only memory is at stake
        keep = {event.version} if event.version is not None else set()
        with self._loaded_lock:
            loaded = self._loaded.pop((event.tenant, event.prefix_id), set())
            if loaded & keep:
                self._loaded[(event.tenant, event.prefix_id)] = loaded & keep
        for version in loaded - keep:
            self.engine.cache.discard(AdapterRef(event.tenant, event.prefix_id, version))

    def __del__(self) -> None:
        try:
            self._subscription.close()
            self.store.close()
        except Exception:
            pass

    # ---- adapters ---------------------------------------------------------------------------------
    def _load(self, ref: AdapterRef) -> DeviceAdapter:
        """Blocking: fetch the packed bytes and put them on the device (validated against this backbone)."""
        t0 = time.perf_counter()
        ok = False
        try:
            adapter = self.engine.adapter(ref, lambda: self.store.get(ref.tenant, ref.prefix_id, ref.version)[1])
            with self._loaded_lock:
                self._loaded.setdefault((ref.tenant, ref.prefix_id), set()).add(ref.version)
            ok = True
            return adapter
        finally:
            self.stats.fetch(time.perf_counter() - t0, ok)

    async def _adapter(self, ref: AdapterRef) -> DeviceAdapter:
        hit = self.engine.cache.lookup(ref)
        if hit is not None:
            return hit
        fut = self._inflight.get(ref)
        if fut is None:  # one fetch per ref however many requests miss at once
            fut = asyncio.ensure_future(asyncio.to_thread(self._load, ref))
            self._inflight[ref] = fut
            fut.add_done_callback(functools.partial(self._fetched, ref))
        return await asyncio.shield(fut)

    def _fetched(self, ref: AdapterRef, _future: asyncio.Future[DeviceAdapter]) -> None:
        self._inflight.pop(ref, None)

    # ---- requests ---------------------------------------------------------------------------------
    async def classify(self, call: ClassifyCall) -> ClassifyReply:
        """One prediction per input, or the error that stopped this call (other calls are unaffected)."""
        try:
            adapter = await self._adapter(call.ref)
        except Exception as exc:  # not found / invalid: fails this call only, before batching
            return ClassifyReply(call.ref, self.replica, error=as_error(exc, log), stats=self.stats_snapshot())
        await self._idle.wait()  # join the NEXT batch together with everyone who arrived during this forward
        rows = [Row(adapter, text, pair) for text, pair in zip(call.inputs, call.pairs())]
        results: list[RowResult] = await asyncio.gather(*(self._infer(row) for row in rows))
        return ClassifyReply(call.ref, self.replica, tuple(results), stats=self.stats_snapshot())

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def _infer(self, rows: list[Row]) -> list[RowResult]:
        # rows from any calls. The forward runs off the event loop, so fetches and new arrivals proceed
        # meanwhile. Serve forms the next batch as soon as its wait expires, even while this forward runs
        # (it then waits for the semaphore), so rows arriving mid-forward would go out in many tiny
        # batches; instead they wait on ``_idle`` in classify() and are released together when this
        # forward ends: one full batch.
        self._idle.clear()
        try:
            return await asyncio.to_thread(self._forward, rows)
        finally:
            self._idle.set()

    def _forward(self, rows: list[Row]) -> list[RowResult]:
        t0 = time.perf_counter()
        out: list[RowResult]
        try:
            out = list(self.engine.predict(rows))  # ONE forward for all rows: B = len(rows)
        except Exception:
            log.exception("batch of %d failed; retrying row by row", len(rows))
            out = []
            for row in rows:
                try:
                    out.append(self.engine.predict([row])[0])
                except Exception as exc:
                    out.append(as_error(exc, log))
        self.stats.batch(len(rows), len({r.adapter.key for r in rows}), time.perf_counter() - t0)
        return out

"""The ``Worker`` deployment: holds the Engine and the device adapter cache; batches rows across tenants.

Naming: *backbone* is the setting (a hub id or folder) and the loaded encoder
(:class:`prefixserve.adapters.backbone.Backbone`); the Serve deployment that runs it is the Worker.

Transport split (as LitServe): the Ingress decodes and validates; here a :class:`ClassifyCall` is
resolved to a device adapter (a store fetch on a miss, off the event loop), *then* split into rows that
join the tenant's queue in a :class:`~.batching.FairBatcher`, so a batch mixes rows of many requests,
tenants and adapters, shared fairly among tenants (deficit round-robin by tokens); one
``Engine.predict`` runs them in ONE forward; results go back per row and are re-assembled per call.

Decisions:
* Calls carry an :class:`AdapterRef` in the payload, never ``serve_multiplexed_model_id`` (Serve
  splits batches by multiplexed id, which would defeat cross-tenant batching).
* The Ingress names the version (it ``head``s the store on every request), so coherence does not
  depend on this replica: the device cache is keyed by the immutable ref and a new version is a
  miss. The store's change feed only evicts superseded versions early (memory, not correctness).
* Validation happens before batching: a missing adapter or bad file fails its own call before any
  row is queued. If a forward still fails, the batch is bisected so that only the failing rows
  report an error (and only as ``internal`` with an incident id: no exception text leaves the replica).
* The fetched bytes must hash to the ref's sha256: a name deleted and re-created (its version
  numbers start over) can never be answered with the old owner's adapter. They are hashed once, by
  the store (``AdapterReader.get`` returns only bytes that match the record it returns); the Worker
  compares that record's digest with the ref's. Hashing 3.8 MB again cost 2.5 ms of the 5 ms budget.
* Nothing is raised through the handle: a :class:`ClassifyReply` carries errors as values.
* ``max_batch_size``, ``max_batch_tokens`` and ``batch_wait_timeout_s`` come from ``user_config``
  (``reconfigure``), so they can be changed on a running deployment without restarting replicas.
* The model is loaded in ``__init__`` (inside the replica), never when the application is built.
* No custom ``check_health`` on the store: a store outage must not make Serve restart (and reload)
  every Worker replica; the Ingress's ``/readyz`` reports the store instead.
* ``backbone_fingerprint`` (when set) pins the backbone: a replica that loads any other (another hub
  revision, another cache volume) raises ``FingerprintMismatchError`` in ``__init__``, so Serve never
  marks it running and the application (and ``/readyz``, and KubeRay's RayService status) stays
  un-ready instead of answering with adapters bound to another encoder.
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
from prefixserve.adapters.errors import FingerprintMismatchError, NotFoundError, as_error
from prefixserve.adapters.ref import AdapterRef
from prefixserve.adapters.store import AdapterReader, ChangeEvent

from .batching import FairBatcher, estimate_tokens
from .metrics import WorkerSnapshot, WorkerStats
from .protocol import ClassifyCall, ClassifyReply, RowResult, WorkerInfo
from .schemas import DEFAULTS, AppSettings, BatchingConfig

log = logging.getLogger("prefixserve.worker")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (unit use)
        return "local"


def check_fingerprint(loaded: str, settings: AppSettings) -> None:
    """Refuse a backbone other than the pinned one (``settings.backbone_fingerprint``; None: no pin)."""
    if settings.backbone_fingerprint and loaded != settings.backbone_fingerprint:
        raise FingerprintMismatchError(
            f"backbone {settings.backbone!r} loaded as {loaded}, but backbone_fingerprint pins "
            f"{settings.backbone_fingerprint}: this replica refuses to serve adapters bound to another encoder"
        )


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
        check_fingerprint(self.backbone.fingerprint, settings)
        self.engine = Engine(self.backbone, cache_bytes=settings.cache_bytes)
        self.replica = _replica_id()
        self.stats = WorkerStats(self.replica)
        self.store: AdapterReader = open_store(settings.store)  # the read side only: head / get / subscribe
        self._inflight: dict[AdapterRef, asyncio.Future[DeviceAdapter]] = {}
        self._loaded: dict[tuple[str, str], set[AdapterRef]] = {}  # refs put on the device, per prefix
        self._loaded_lock = threading.Lock()
        self.max_row_tokens = self.engine.max_length
        self.fair = settings.fair_batching
        self.batcher: FairBatcher[Row, RowResult] = FairBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            wait_timeout_s=settings.batch_wait_timeout_s,
            target_batch_s=settings.target_batch_ms / 1000.0,
            on_formed=self.stats.formed,
        )
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
    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = BatchingConfig(**(user_config or {}))
        self.batcher.max_batch_size = cfg.max_batch_size
        self.batcher.max_batch_tokens = cfg.max_batch_tokens
        self.batcher.wait_timeout_s = cfg.batch_wait_timeout_s
        self.batcher.target_batch_s = cfg.target_batch_ms / 1000.0
        self.fair = cfg.fair_batching

    def info(self) -> WorkerInfo:
        """What the Ingress needs to validate uploads against this backbone."""
        return WorkerInfo(
            backbone=self.backbone.name,
            fingerprint=self.backbone.fingerprint,
            spec=self.backbone.spec,
            device=str(self.backbone.device),
            replica=self.replica,
            max_batch_size=self.batcher.max_batch_size,
            batch_wait_timeout_s=self.batcher.wait_timeout_s,
        )

    def ready(self) -> bool:
        return True

    def stats_snapshot(self) -> WorkerSnapshot:
        return self.stats.snapshot(self.engine.cache.stats)

    def _on_change(self, event: ChangeEvent) -> None:
        """Change feed (store thread): drop superseded versions of that prefix from the device."""
        if event.resync:
            return  # versions are in the refs: nothing stale can be served, only memory is at stake
        with self._loaded_lock:
            loaded = self._loaded.pop((event.tenant, event.prefix_id), set())
            keep = {ref for ref in loaded if ref.version == event.version}
            if keep:
                self._loaded[(event.tenant, event.prefix_id)] = keep
        for ref in loaded - keep:
            self.engine.cache.discard(ref)

    def __del__(self) -> None:
        try:
            self._subscription.close()
            self.store.close()
        except Exception:
            pass

    # ---- adapters ---------------------------------------------------------------------------------
    def _fetch(self, ref: AdapterRef) -> bytes:
        """The bytes ``ref`` names, or NotFoundError: a re-created name's version may hold other bytes."""
        info, data = self.store.get(ref.tenant, ref.prefix_id, ref.version)  # checked against info.sha256
        if info.sha256 != ref.sha256 or info.size != len(data):
            raise NotFoundError(f"version {ref.version} of adapter {ref.prefix_id!r} not found")
        return data

    def _load(self, ref: AdapterRef) -> DeviceAdapter:
        """Blocking: fetch the packed bytes and put them on the device (validated against this backbone)."""
        t0 = time.perf_counter()
        ok = False
        try:
            adapter = self.engine.adapter(ref, functools.partial(self._fetch, ref))
            with self._loaded_lock:
                self._loaded.setdefault((ref.tenant, ref.prefix_id), set()).add(ref)
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
        """One result per input, or the error that stopped this call (other calls are unaffected)."""
        try:
            adapter = await self._adapter(call.ref)
        except Exception as exc:  # not found / invalid: fails this call only, before batching
            return ClassifyReply(call.ref, self.replica, error=as_error(exc, log), stats=self.stats_snapshot())
        rows = [Row(adapter, text, pair) for text, pair in zip(call.inputs, call.pairs())]
        costs = [estimate_tokens(r.text, r.text_pair, max_row_tokens=self.max_row_tokens) for r in rows]
        queue = call.ref.tenant if self.fair else ""  # one queue for all: arrival order (ablation only)
        results = await self.batcher.submit(queue, rows, costs)  # a fair share of the next batches
        return ClassifyReply(call.ref, self.replica, tuple(results), stats=self.stats_snapshot())

    async def _run_batch(self, rows: list[Row]) -> list[RowResult]:
        # Off the event loop, so fetches and new arrivals proceed meanwhile; the batcher runs one at a time.
        return await asyncio.to_thread(self._forward, rows)

    def _forward(self, rows: list[Row]) -> list[RowResult]:
        t0 = time.perf_counter()
        out = self._predict_isolating(rows)
        self.stats.batch(
            len(rows), len({r.adapter.key for r in rows}), time.perf_counter() - t0, (r.adapter.kind for r in rows)
        )
        return out

    def _predict_isolating(self, rows: list[Row]) -> list[RowResult]:
        """ONE forward for all rows; if it fails, bisect so that only the failing rows get an error.

        k bad rows among n cost O(k log n) forwards, not n (a re-run row by row let one poison row
        multiply everyone's latency).
        """
        try:
            return list(self.engine.predict(rows))  # B = len(rows)
        except Exception as exc:
            if len(rows) == 1:
                return [as_error(exc, log)]
        half = len(rows) // 2
        return self._predict_isolating(rows[:half]) + self._predict_isolating(rows[half:])

"""Prometheus metrics, served by the Ingress at ``/metrics`` (prometheus_client text format).

Decisions:
* Request metrics (count, errors by code, latency) are recorded where requests arrive: the Ingress,
  in its own ``CollectorRegistry`` (one per process; no global registry clashes in tests).
* Worker metrics (rows per batch, distinct adapters per batch, cache hits/misses/evictions, store
  fetch latency) happen in other processes. Each Worker replica keeps cumulative counters and
  small fixed-bucket histograms (:class:`Hist`) and piggybacks a typed :class:`WorkerSnapshot` on
  every classify reply;
  the Ingress keeps the latest snapshot per replica and exposes it labelled ``replica``. Snapshots are
  cumulative, so a late or skipped one only delays the numbers; replicas silent for 10 min drop out.
  With several Ingress replicas each exports the same Worker series: aggregate with
  ``max by (replica)``. The Worker also reports to Ray's own metrics (``ray.serve.metrics``) when
  the Ray metrics agent runs, for clusters that scrape Ray instead.
* Label cardinality is bounded: ``tenant`` (never prefix id), ``route`` (the route template),
  ``code`` (the stable error code), ``replica`` (Worker replicas).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prefixserve.adapters.cache import CacheStats

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ADAPTER_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
TOKEN_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FILL_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STALE_S = 600.0
# WorkerSnapshot field -> (Prometheus name, help)
HISTOGRAMS = {
    "batch_rows": ("prefixserve_batch_rows", "rows per backbone forward"),
    "batch_adapters": ("prefixserve_batch_adapters", "distinct adapters per forward"),
    "batch_tokens": ("prefixserve_batch_tokens", "estimated tokens per backbone forward"),
    "batch_fill": ("prefixserve_batch_fill", "share of the token budget a forward used"),
    "fetch_seconds": ("prefixserve_store_fetch_seconds", "store fetch + device load latency"),
    "forward_seconds": ("prefixserve_forward_seconds", "backbone forward latency"),
}


@dataclass(frozen=True)
class HistSnapshot:
    """A histogram's state: upper bounds and non-cumulative counts per bucket (the last is +Inf)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: ``(le, cumulative count)`` up to ``+Inf``."""
        out, total = [], 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts):
            total += count
            out.append((bound, float(total)))
        return out


class Hist:
    """A fixed-bucket histogram (non-cumulative counts per bucket)."""

    def __init__(self, bounds: Iterable[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # last bucket: +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistSnapshot:
        return HistSnapshot(self.bounds, tuple(self.counts), self.sum)


@dataclass(frozen=True)
class WorkerSnapshot:
    """One Worker replica's cumulative counters; travels back with every classify reply."""

    replica: str
    cache: CacheStats
    batch_rows: HistSnapshot
    batch_adapters: HistSnapshot
    batch_tokens: HistSnapshot
    batch_fill: HistSnapshot
    fetch_seconds: HistSnapshot
    forward_seconds: HistSnapshot
    fetch_errors: int
    rows_by_kind: tuple[tuple[str, int], ...] = ()  # (adapter kind, rows served), cumulative

    def histograms(self) -> dict[str, HistSnapshot]:
        return {name: getattr(self, name) for name in HISTOGRAMS}


class WorkerStats:
    """What one Worker replica counts; ``snapshot()`` travels back with each reply."""

    def __init__(self, replica: str):
        self.replica = replica
        self.batch_rows = Hist(ROW_BUCKETS)
        self.batch_adapters = Hist(ADAPTER_BUCKETS)
        self.batch_tokens = Hist(TOKEN_BUCKETS)  # estimated tokens per forward
        self.batch_fill = Hist(FILL_BUCKETS)  # estimated tokens / the token budget when the batch was formed
        self.fetch_seconds = Hist(SECONDS_BUCKETS)
        self.forward_seconds = Hist(SECONDS_BUCKETS)
        self.fetch_errors = 0
        self.rows_by_kind: dict[str, int] = {}
        self._ray = _ray_metrics()

    def batch(self, rows: int, adapters: int, seconds: float, kinds: Iterable[str] = ()) -> None:
        """One forward: its rows, distinct adapters, seconds, and each row's adapter kind."""
        for kind in kinds:
            self.rows_by_kind[kind] = self.rows_by_kind.get(kind, 0) + 1
        self.batch_rows.observe(rows)
        self.batch_adapters.observe(adapters)
        self.forward_seconds.observe(seconds)
        if self._ray:
            self._ray["rows"].observe(rows)
            self._ray["adapters"].observe(adapters)

    def formed(self, tokens: int, budget: int) -> None:
        """A batch was formed with ``tokens`` (estimated) under a budget of ``budget`` tokens."""
        self.batch_tokens.observe(tokens)
        self.batch_fill.observe(min(1.0, tokens / max(1, budget)))

    def fetch(self, seconds: float, ok: bool = True) -> None:
        self.fetch_seconds.observe(seconds)
        self.fetch_errors += 0 if ok else 1
        if self._ray:
            self._ray["fetch"].observe(seconds)

    def snapshot(self, cache: CacheStats) -> WorkerSnapshot:
        return WorkerSnapshot(
            replica=self.replica,
            cache=CacheStats(**cache.to_dict()),  # a copy: the live one keeps counting
            batch_rows=self.batch_rows.snapshot(),
            batch_adapters=self.batch_adapters.snapshot(),
            batch_tokens=self.batch_tokens.snapshot(),
            batch_fill=self.batch_fill.snapshot(),
            fetch_seconds=self.fetch_seconds.snapshot(),
            forward_seconds=self.forward_seconds.snapshot(),
            fetch_errors=self.fetch_errors,
            rows_by_kind=tuple(sorted(self.rows_by_kind.items())),
        )


def _ray_metrics() -> dict[str, Any] | None:
    """Ray-native histograms (exported by Ray's metrics agent); None outside a Serve replica."""
    try:
        from ray.serve.metrics import Histogram

        return {
            "rows": Histogram(
                "prefixserve_backbone_batch_rows", description="rows per forward", boundaries=list(ROW_BUCKETS)
            ),
            "adapters": Histogram(
                "prefixserve_backbone_batch_adapters",
                description="distinct adapters per forward",
                boundaries=list(ADAPTER_BUCKETS),
            ),
            "fetch": Histogram(
                "prefixserve_backbone_store_fetch_seconds",
                description="store fetch latency",
                boundaries=list(SECONDS_BUCKETS),
            ),
        }
    except Exception:  # no Ray / not in a replica: the snapshot path still works
        return None


class IngressMetrics:
    """The Ingress process's registry plus the latest Worker snapshots."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "prefixserve_requests_total", "HTTP requests", ["route", "tenant", "status"], registry=self.registry
        )
        self.errors = Counter(
            "prefixserve_request_errors_total",
            "error responses by stable code",
            ["tenant", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "prefixserve_request_latency_seconds",
            "request latency at the ingress",
            ["route"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter("prefixserve_classify_rows_total", "classified inputs", ["tenant"], registry=self.registry)
        self.training_jobs = Counter(  # by the replica that launched the job (server/training.py)
            "prefixserve_training_jobs_total",
            "training jobs that reached a final state, by state",
            ["state"],
            registry=self.registry,
        )
        self._snapshots: dict[str, tuple[float, WorkerSnapshot]] = {}
        self._lock = threading.Lock()
        self.registry.register(_SnapshotCollector(self))

    def observe(self, route: str, tenant: str, status: int, seconds: float, code: str | None = None) -> None:
        self.requests.labels(route, tenant, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if code:
            self.errors.labels(tenant, code).inc()

    def worker_snapshot(self, snap: WorkerSnapshot | None) -> None:
        if snap is not None and snap.replica:
            with self._lock:
                self._snapshots[snap.replica] = (time.monotonic(), snap)

    def snapshots(self) -> list[WorkerSnapshot]:
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (t, _) in self._snapshots.items() if now - t > _STALE_S]:
                del self._snapshots[k]
            return [s for _, s in self._snapshots.values()]

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _SnapshotCollector:
    """Turns Worker snapshots into metric families at scrape time."""

    def __init__(self, owner: IngressMetrics):
        self.owner = owner

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        snaps = self.owner.snapshots()
        counters = {
            name: CounterMetricFamily(
                f"prefixserve_adapter_cache_{name}", f"device adapter cache {name}", labels=["replica"]
            )
            for name in ("hits", "misses", "evictions")
        }
        resident = GaugeMetricFamily(
            "prefixserve_adapter_cache_resident_bytes", "device bytes held by adapters", labels=["replica"]
        )
        fetch_err = CounterMetricFamily("prefixserve_store_fetch_errors", "failed adapter fetches", labels=["replica"])
        by_kind = CounterMetricFamily(
            "prefixserve_rows_by_kind", "rows served, by adapter kind", labels=["replica", "kind"]
        )
        hists = {
            field: HistogramMetricFamily(metric, help_text, labels=["replica"])
            for field, (metric, help_text) in HISTOGRAMS.items()
        }
        for snap in snaps:
            rep, cache = [snap.replica], snap.cache
            for name, fam in counters.items():
                fam.add_metric(rep, float(getattr(cache, name)))
            resident.add_metric(rep, float(cache.resident_bytes))
            fetch_err.add_metric(rep, float(snap.fetch_errors))
            for kind, n in snap.rows_by_kind:
                by_kind.add_metric([snap.replica, kind], float(n))
            for name, hist in snap.histograms().items():
                hists[name].add_metric(rep, hist.cumulative(), hist.sum)
        yield from counters.values()
        yield resident
        yield fetch_err
        yield by_kind
        yield from hists.values()

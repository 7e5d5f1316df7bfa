"""Server pieces that need no Ray cluster: settings, app builder, auth, CLI, metrics, quickstart demo."""

from __future__ import annotations

import os
import stat
from typing import Any, cast

import pytest

from prefixserve.adapters.errors import AuthError


def test_settings_validation():
    from pydantic import ValidationError

    from prefixserve.server.schemas import AppSettings

    s = AppSettings(backbone="x", store="file:///tmp/s", max_batch_size=8)
    assert s.worker_max_ongoing == 16
    assert s.user_config() == {
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.005,
        "max_batch_tokens": 8192,
        "target_batch_ms": 50.0,
        "fair_batching": True,
    }
    older = AppSettings.model_validate({"backbone_num_cpus": 2, "worker_num_gpus": 1})  # the older spelling works
    assert (older.worker_num_cpus, older.worker_num_gpus) == (2, 1)
    for bad in (
        dict(store="/tmp/no-scheme"),
        dict(max_batch_size=16, max_ongoing_requests=8),
        dict(autoscaling={"min_replicas": 3, "max_replicas": 2}),
        dict(unknown=1),
    ):
        with pytest.raises(ValidationError):
            AppSettings(**bad)


def test_build_app_loads_nothing(monkeypatch):
    import prefixserve.adapters.backbone as bb
    from prefixserve.server.app import build_app, worker_options
    from prefixserve.server.schemas import AppSettings

    monkeypatch.setattr(bb, "load_backbone", lambda *a, **k: pytest.fail("model loaded while building the app"))
    app = build_app(
        {
            "backbone": "nowhere/model",
            "store": "redis://127.0.0.1:1/0",
            "autoscaling": {"min_replicas": 1, "max_replicas": 3},
            "max_batch_size": 4,
        }
    )
    ingress: Any = app._bound_deployment
    assert ingress.name == "Ingress"
    worker = (
        ingress.init_args[0]._bound_deployment
        if hasattr(ingress.init_args[0], "_bound_deployment")
        else ingress.init_args[0]
    )
    assert worker.name == "Worker"
    assert isinstance(ingress.init_args[1], AppSettings) and ingress.init_args[1].max_batch_size == 4
    opts = worker_options(AppSettings(max_batch_size=4, replicas=2))
    assert opts["num_replicas"] == 2 and opts["max_ongoing_requests"] >= 4
    assert opts["user_config"]["max_batch_size"] == 4
    auto = worker_options(AppSettings.model_validate({"autoscaling": {"min_replicas": 0, "max_replicas": 4}}))
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 4
    assert auto["autoscaling_config"]["target_ongoing_requests"] == 32.0  # = max_batch_size by default


def test_admin_key_file_and_env(tmp_path, monkeypatch):
    from prefixserve.server.auth import ADMIN_KEY_ENV, resolve_admin_key

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    key, path = resolve_admin_key(tmp_path / "sub" / "admin_key")
    assert path is not None and path.is_file() and stat.S_IMODE(os.stat(path).st_mode) == 0o600 and len(key) > 30
    assert resolve_admin_key(path) == (key, path)  # every replica reads the same key
    monkeypatch.setenv(ADMIN_KEY_ENV, "from-env")
    assert resolve_admin_key(path) == ("from-env", None)


def test_authenticator():
    from prefixserve.server.auth import Authenticator, Principal, bearer

    class Store:
        def authenticate(self, key):
            return "acme" if key == "good" else None

    auth = Authenticator(cast(Any, Store()), "admin-secret", metrics_token="scrape")
    assert bearer("Bearer  tok ") == "tok" and bearer("bearer tok") == "tok"
    for header in (None, "", "Basic tok", "Bearer", "Bearer "):
        with pytest.raises(AuthError):
            bearer(header)
    assert auth.principal("Bearer good") == Principal("tenant", "acme")
    assert auth.principal("Bearer admin-secret") == Principal("admin", "admin")
    assert auth.principal("Bearer scrape") == Principal("metrics", "metrics")
    with pytest.raises(AuthError):
        auth.principal("Bearer bad")
    assert Authenticator(cast(Any, Store()), "admin-secret").principal("Bearer good").role == "tenant"
    with pytest.raises(AuthError):  # no metrics token configured: it is just a bad key
        Authenticator(cast(Any, Store()), "admin-secret").principal("Bearer scrape")


def test_serve_cli_parses():
    from prefixserve.server.cli import settings_from_args
    from prefixserve.server.main import build_parser

    parser = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--backbone",
            "b",
            "--store",
            "file:///tmp/s",
            "--autoscale",
            "1:3",
            "--max-batch-size",
            "8",
            "--batch-wait-ms",
            "2",
        ]
    )
    s = settings_from_args(args)
    assert (s.autoscaling.min_replicas, s.autoscaling.max_replicas) == (1, 3)
    assert s.max_batch_size == 8 and s.batch_wait_timeout_s == pytest.approx(0.002)
    assert args.host == "127.0.0.1" and args.port == 8000
    s = settings_from_args(parser.parse_args(["serve", "--backbone", "b", "--store", "memory://", "--replicas", "2"]))
    assert s.replicas == 2 and s.autoscaling is None
    for bad in (["--autoscale", "3:1"], ["--autoscale", "x"], ["--replicas", "2", "--autoscale", "1:2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--backbone", "b", "--store", "memory://", *bad])


def test_metrics_render_with_worker_snapshot():
    import pickle

    from prefixserve.adapters.cache import CacheStats
    from prefixserve.server.metrics import IngressMetrics, WorkerStats

    stats = WorkerStats("r1")
    stats.batch(rows=5, adapters=3, seconds=0.01, kinds=["lora", "prefix", "lora", "ia3", "bottleneck"])
    stats.fetch(0.002)
    m = IngressMetrics()
    m.observe("/v1/classify", "acme", 200, 0.02)
    m.observe("/v1/classify", "acme", 404, 0.01, code="not_found")
    snap = stats.snapshot(CacheStats(hits=4, misses=1, evictions=0))
    assert pickle.loads(pickle.dumps(snap)) == snap  # it crosses the Ray boundary
    m.worker_snapshot(snap)
    text = m.render()[0].decode()
    assert 'prefixserve_request_errors_total{code="not_found",tenant="acme"} 1.0' in text
    assert 'prefixserve_adapter_cache_hits_total{replica="r1"} 4.0' in text
    assert 'prefixserve_batch_rows_bucket{le="8",replica="r1"} 1.0' in text
    assert 'prefixserve_batch_adapters_sum{replica="r1"} 3.0' in text
    assert 'prefixserve_rows_by_kind_total{kind="lora",replica="r1"} 2.0' in text
    assert 'prefixserve_rows_by_kind_total{kind="bottleneck",replica="r1"} 1.0' in text


def test_local_cluster_has_room_for_a_training_runner(monkeypatch):
    """A 2-core machine: Worker 1 + Ingress 0.5 + runner 1 need 3 logical CPUs, else every job stays queued."""
    from prefixserve.server.app import local_cpus
    from prefixserve.server.schemas import AppSettings

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    s = AppSettings.without_env(worker_num_cpus=1, ingress_num_cpus=0.5)
    assert local_cpus(s) == 3
    assert local_cpus(s, num_cpus=2) == 2  # given: kept
    assert local_cpus(AppSettings.without_env(training={"enabled": False})) is None  # Ray's own default
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_cpus(s) == 16  # enough cores: nothing raised

"""Application builder (``serve build`` / KubeRay compatible) and the local launcher.

``prefixserve.server.app:build_app`` takes the Serve config's ``args:`` dict (see
:class:`~prefixserve.server.schemas.AppSettings`) and returns the bound application
``Ingress -> Backbone``. Building loads nothing: the model is loaded in each Backbone replica's
``__init__``. A Serve config file for it::

    applications:
      - name: prefixserve
        route_prefix: /
        import_path: prefixserve.server.app:build_app
        args: {backbone: klue/roberta-base, store: "redis://redis:6379/0", max_batch_size: 32,
               autoscaling: {min_replicas: 1, max_replicas: 4}}

``run_local`` is what ``prefixserve serve`` and the quickstart use: Ray on loopback, Serve HTTP on
``host:port``, then ``serve.run``.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from .schemas import AppSettings

APP_NAME = "prefixserve"


def backbone_options(s: AppSettings) -> dict:
    """``Deployment.options`` for Backbone: replicas or autoscaling, batching user_config, resources."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.backbone_max_ongoing,
        "user_config": s.user_config(),
        "ray_actor_options": {"num_cpus": s.backbone_num_cpus, "num_gpus": s.backbone_num_gpus},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": 5,
    }
    if s.autoscaling is not None:
        auto = s.autoscaling.model_dump()
        if auto.get("target_ongoing_requests") is None:  # scale out only once batches are full
            auto["target_ongoing_requests"] = float(s.max_batch_size)
        opts["autoscaling_config"] = auto
    else:
        opts["num_replicas"] = s.replicas
    return opts


def build_app(args: dict | None = None):
    """Serve application builder: ``args`` (dict or AppSettings) -> ``Application``. Loads no model."""
    from .backbone_deployment import Backbone
    from .ingress import Ingress

    s = args if isinstance(args, AppSettings) else AppSettings(**(args or {}))
    backbone = Backbone.options(**backbone_options(s)).bind(
        backbone=s.backbone,
        store=s.store,
        device=s.device,
        dtype=s.dtype,
        cache_bytes=s.cache_bytes,
        torch_threads=s.torch_threads,
    )
    ingress = Ingress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    )
    return ingress.bind(backbone, s.model_dump())


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pin_ray_to_loopback() -> None:
    """Keep a local Ray cluster on 127.0.0.1.

    Ray 2.60 rewrites ``_node_ip_address="127.0.0.1"`` to the machine's routable address
    (``services.resolve_ip_for_localhost``) and its GCS/raylet then listen on every interface.
    Its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node IP and every
    listener on loopback. The env var reaches Ray's child processes; the constant covers a driver
    that imported Ray already.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # private module moved: the env var still applies to a fresh import
        pass


def start_ray(num_cpus: int | None = None, *, address: str | None = None, log_to_driver: bool | None = None) -> None:
    """Ray on loopback (local default), or connect to ``address``; idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if address:
        ray.init(address=address)
    else:
        pin_ray_to_loopback()
        if log_to_driver is None:
            log_to_driver = os.environ.get("PREFIXSERVE_RAY_LOGS", "1") != "0"
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=num_cpus, log_to_driver=log_to_driver)


def run_local(
    settings: AppSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    address: str | None = None,
    blocking: bool = False,
) -> str:
    """Start Ray + Serve HTTP on ``host:port`` and deploy; returns the base URL."""
    from ray import serve

    start_ray(num_cpus, address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"

"""Application builder (``serve build`` / KubeRay compatible) and the local launcher.

``prefixserve.server.app:build_app`` takes the Serve config's ``args:`` dict (see
:class:`~prefixserve.server.schemas.AppSettings`) and returns the bound application
``Ingress -> Worker``. Building loads nothing: the backbone is loaded in each Worker replica's
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
from typing import TYPE_CHECKING, Any

from .schemas import AppSettings

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "prefixserve"


def worker_options(s: AppSettings) -> dict[str, Any]:
    """``Deployment.options`` for the Worker: replicas or autoscaling, batching user_config, resources."""
    opts: dict[str, Any] = {
        "max_ongoing_requests": s.worker_max_ongoing,
        "user_config": s.user_config(),
        "ray_actor_options": {"num_cpus": s.worker_num_cpus, "num_gpus": s.worker_num_gpus},
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


def build_app(args: dict[str, Any] | AppSettings | None = None) -> Application:
    """Serve application builder: ``args`` (dict or AppSettings) -> ``Application``. Loads no model."""
    from .ingress import Ingress
    from .worker import Worker

    s = args if isinstance(args, AppSettings) else AppSettings.model_validate(args or {})
    # @serve.deployment makes Deployment objects; Ray's stubs still type them as the decorated classes
    worker = Worker.options(**worker_options(s)).bind(s)  # type: ignore[attr-defined]
    ingress = Ingress.options(  # type: ignore[attr-defined]
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    )
    return ingress.bind(worker, s)


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

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

``run_local`` is what ``prefixserve serve`` and the quickstart use: refuse a taken ``host:port``, Ray on
loopback, Serve HTTP on ``host:port``, then ``serve.run``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schemas import AppSettings

if TYPE_CHECKING:
    from ray.serve import Application

APP_NAME = "prefixserve"
LOOPBACK = "127.0.0.1"
# what a Ray worker of a local cluster runs first (ray.init(runtime_env={"worker_process_setup_hook": ...}))
LOOPBACK_WORKER_HOOK = f"{__name__}.bind_worker_servers_to_loopback"
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})

log = logging.getLogger(__name__)


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


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pin_ray_to_loopback() -> None:
    """Keep a local Ray cluster on 127.0.0.1.

    Ray 2.60 rewrites ``_node_ip_address="127.0.0.1"`` to the machine's routable address
    (``services.resolve_ip_for_localhost``) and its GCS/raylet then listen on every interface.
    Its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) keeps the node IP and Ray's
    own listeners on loopback (Serve replicas' gRPC servers: :func:`bind_worker_servers_to_loopback`).
    The env var reaches Ray's child processes; the constant covers a driver that imported Ray already.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except ImportError:  # private module moved: the env var still applies to a fresh import
        pass


def loopback_bind_address(address: str) -> str:
    """A gRPC bind address on every interface (``[::]:0``, ``0.0.0.0:P``) -> the same port on 127.0.0.1."""
    host, sep, port = address.rpartition(":")
    return f"{LOOPBACK}:{port}" if sep and host in _WILDCARD_HOSTS else address


def bind_worker_servers_to_loopback() -> None:
    """Ray worker setup hook of a local cluster: gRPC servers that Ray starts in a worker bind 127.0.0.1.

    Single-machine mode keeps GCS, raylet, agents and every core worker on 127.0.0.1, but a Serve
    replica's inter-deployment gRPC server binds ``[::]:0`` (hard-coded in
    ``ray.serve._private.replica``, no option), i.e. every interface. Its peers reach it at the node IP,
    127.0.0.1 here, so loopback loses nothing. Ray adds that port through its one helper
    ``ray._common.tls_utils.add_port_to_grpc_server`` (the TLS switch); this wraps it, and runs before a
    worker imports the replica module, which binds the name at import. Private Ray API:
    ``tests/e2e/test_local_mode.py`` lists every Ray listener, so a Ray that moves it fails there.
    """
    try:
        from ray._common import tls_utils
    except ImportError:  # moved: say so (the e2e listener test fails too) rather than kill every worker
        log.warning("prefixserve: cannot pin Ray Serve's replica gRPC server to loopback (ray._common.tls_utils)")
        return
    add_port: Callable[[Any, str], int] = tls_utils.add_port_to_grpc_server
    if getattr(add_port, "binds_loopback", False):
        return

    def add_port_on_loopback(server: Any, address: str) -> int:
        return add_port(server, loopback_bind_address(address))

    add_port_on_loopback.binds_loopback = True  # type: ignore[attr-defined]
    tls_utils.add_port_to_grpc_server = add_port_on_loopback
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None and hasattr(replica, "add_port_to_grpc_server"):  # imported before the hook ran
        vars(replica)["add_port_to_grpc_server"] = add_port_on_loopback


def ensure_port_free(host: str, port: int) -> None:
    """Raise ``port_in_use`` (409) when something already listens on ``host:port``.

    Serve's HTTP proxy binds with SO_REUSEPORT, so a second server on a taken port would start and the
    kernel would split the connections between the two. This bind has no SO_REUSEPORT, so any listener
    on the port (or on a wildcard address that covers it) makes it fail; SO_REUSEADDR only lets a
    TIME_WAIT left by a previous run through. Called before Ray starts, so a refusal starts nothing.
    A process that binds between this check and Serve's proxy is not caught (to share the port it must
    use SO_REUSEPORT as the same user too). Other bind errors (no IPv6, an address not on this host)
    are left to Serve to report, as before.
    """
    from prefixserve.adapters.errors import PrefixServeError

    try:
        candidates = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return
    for family, kind, proto, _, addr in candidates:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(addr)
                sock.listen(1)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    owner = port_owner(port)
                    raise PrefixServeError(
                        f"port {port} on {host} is already in use (by {owner or 'another process'}); "
                        "stop it or choose another --port",
                        code="port_in_use",
                        status=409,
                    ) from None


def port_owner(port: int) -> str | None:
    """``pid N (name)`` of a process listening on TCP ``port``, when this user can see it (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except OSError:
            continue
        # columns: sl local_address rem_address st ... inode (10th); st 0A = LISTEN
        inodes.update(r[9] for r in rows if len(r) > 9 and r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in targets for fd in fds):
                with open(f"/proc/{pid}/comm") as f:
                    return f"pid {pid} ({f.read().strip()})"
        except OSError:  # another user's process, or gone
            continue
    return None


def start_ray(num_cpus: int | None = None, *, address: str | None = None, log_to_driver: bool | None = None) -> None:
    """Ray on loopback (local default), or connect to ``address``; idempotent.

    Local: single-machine mode (:func:`pin_ray_to_loopback`) puts the node and Ray's own listeners on
    127.0.0.1, and the worker setup hook (:func:`bind_worker_servers_to_loopback`) the replicas' gRPC
    servers. ``address``: a cluster's listeners must reach other nodes; nothing is pinned.
    """
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
        ray.init(
            _node_ip_address=LOOPBACK,
            include_dashboard=False,
            num_cpus=num_cpus,
            log_to_driver=log_to_driver,
            # every worker (Serve controller, proxy, replicas) pins its own gRPC servers; serve.run passes
            # the job's runtime_env on to the replicas
            runtime_env={"worker_process_setup_hook": LOOPBACK_WORKER_HOOK},
        )


def local_cpus(settings: AppSettings, num_cpus: int | None = None) -> int | None:
    """Logical CPUs for a local Ray cluster: ``num_cpus`` when given; else the machine's, raised until the
    serving replicas AND one training runner fit. Decision: on a 2-core machine Worker (1) + Ingress (0.5) +
    a runner (1) exceed 2, and every training job would stay queued forever; over-subscribing logical CPUs
    lets the OS share the cores instead (a running job slows serving down, it does not block it)."""
    if num_cpus is not None or not settings.training.enabled:
        return num_cpus
    replicas = settings.autoscaling.min_replicas if settings.autoscaling is not None else settings.replicas
    serving = replicas * settings.worker_num_cpus + settings.ingress_replicas * settings.ingress_num_cpus
    return max(os.cpu_count() or 1, math.ceil(serving + settings.training.num_cpus))


def run_local(
    settings: AppSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    address: str | None = None,
    blocking: bool = False,
) -> str:
    """Start Ray + Serve HTTP on ``host:port`` and deploy; returns the base URL.

    Local mode first checks that ``host:port`` is free (:func:`ensure_port_free`); on a cluster
    (``address``) the proxies listen on the cluster's nodes, not here.
    """
    from ray import serve

    if address is None:
        ensure_port_free(host, port)
    start_ray(local_cpus(settings, num_cpus) if address is None else None, address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"


# ---- preflight: what `prefixserve serve` checks before Ray starts (each failure: one line, exit 2) --------
HUB_TIMEOUT_S = 8.0  # a hub that cannot be reached fails the serve within this (no network: no hang)
STORE_TIMEOUT_S = 5.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model")


def _within(seconds: float, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a daemon thread, or a ``preflight_timeout`` error after ``seconds`` (DNS, a silent peer)."""
    from prefixserve.adapters.errors import PrefixServeError

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"preflight-{what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise PrefixServeError(f"{what}: no answer within {seconds:g} s", code="preflight_timeout", status=503)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_store(url: str, timeout_s: float = STORE_TIMEOUT_S) -> None:
    """The store answers and takes a write (file: the folder is writable; Redis: PING + a probe key)."""
    from urllib.parse import urlsplit

    from prefixserve.adapters.errors import PrefixServeError, StoreUnavailableError
    from prefixserve.adapters.store import open_store

    if url.startswith("memory://"):
        return
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()  # never echo a password

    def probe() -> None:
        # redis: no retries (a restart is ridden out while serving, not at start) and short socket timeouts
        opts: dict[str, Any] = {"retries": 0, "socket_timeout": 2.0} if parts.scheme.startswith("redis") else {}
        store = open_store(url, pepper="preflight", **opts)  # hashes no keys: no "pepper not set" warning here
        try:
            store.ping()
            store.check_writable()
        finally:
            store.close()

    try:
        _within(timeout_s, f"store {shown}", probe)
    except PrefixServeError as exc:
        raise StoreUnavailableError(f"store {shown} is not usable: {exc.message}", code="store_unavailable") from None
    except OSError as exc:  # a file store whose root cannot be made
        reason = exc.strerror or type(exc).__name__
        raise StoreUnavailableError(f"store {shown} is not usable: {reason}", code="store_unavailable") from None


def check_backbone(name: str, timeout_s: float = HUB_TIMEOUT_S) -> str:
    """Where the backbone will come from (``folder``, ``cache`` or ``hub``), or a ``backbone_unavailable`` error.

    Order: a local folder; the Hugging Face cache (config, weights and tokenizer all there: no network);
    ``HF_HUB_OFFLINE`` (nothing more to try); the hub, for ``config.json`` only, within ``timeout_s``.
    Reads JSON and the cache index only: no transformers import, no weights loaded.
    """
    from prefixserve.adapters.errors import PrefixServeError

    def fail(message: str) -> PrefixServeError:
        return PrefixServeError(message, code="backbone_unavailable", status=400)

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise fail(f"backbone folder {name} has no config.json (want a save_pretrained folder)")
        return "folder"
    if not _HUB_ID.match(name) or name.startswith((".", "/", "~")) or name.endswith("/"):
        raise fail(f"backbone folder {name} does not exist")
    from huggingface_hub import constants, try_to_load_from_cache

    def cached(files: tuple[str, ...]) -> bool:
        return any(isinstance(try_to_load_from_cache(name, f), str) for f in files)

    if cached(("config.json",)) and cached(_WEIGHTS) and cached(_TOKENIZER):
        return "cache"
    if constants.HF_HUB_OFFLINE:
        raise fail(
            f"backbone {name!r} is not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE}),"
            " and HF_HUB_OFFLINE is set: pass a folder, or download it first (`hf download NAME`)"
        )

    import httpx
    from huggingface_hub.utils import build_hf_headers

    url = f"{constants.ENDPOINT}/{name}/resolve/main/config.json"

    def head_config() -> int:
        # ONE request: hf_hub_download retries a refused connection for ~90 s, logging every try
        return httpx.head(url, headers=build_hf_headers(), timeout=timeout_s, follow_redirects=False).status_code

    where = f"the Hugging Face hub ({constants.ENDPOINT})"
    try:
        status = _within(timeout_s, f"{where} for backbone {name!r}", head_config)
    except PrefixServeError as exc:
        raise fail(f"cannot reach {exc.message}; pass a local folder or a cached id") from None
    except httpx.HTTPError as exc:  # refused, DNS failure, TLS, ...
        reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
        raise fail(f"cannot reach {where} for backbone {name!r} ({reason}); pass a local folder") from None
    if status in (401, 403):
        raise fail(f"backbone {name!r} is gated or private on {where}: set HF_TOKEN, or pass a local folder")
    if status == 404:
        raise fail(f"backbone {name!r} is not on {where} (check the id), and it is not a local folder")
    if status >= 400:
        raise fail(f"{where} answered HTTP {status} for backbone {name!r}")
    return "hub"


def preflight(settings: AppSettings, *, host: str, port: int, local: bool = True) -> str:
    """Port (local mode), store, backbone: each fails in seconds with one line, before Ray starts.

    Returns where the backbone comes from. Bounded hub timeouts are set in this process's env first, so
    the local Ray workers inherit them (they load the backbone again, after this check).
    """
    for var, seconds in (("HF_HUB_ETAG_TIMEOUT", "5"), ("HF_HUB_DOWNLOAD_TIMEOUT", "30")):
        os.environ.setdefault(var, seconds)
    if local:
        ensure_port_free(host, port)
    check_store(settings.store)
    return check_backbone(settings.backbone)

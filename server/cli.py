"""``prefixserve serve``: the Ray Serve application on a local Ray (loopback) or an existing cluster.

Never falls back to another backbone (only the quickstart does): a server must serve what it was
asked to, or fail.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import FrameType

from .schemas import DEFAULTS, AppSettings


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale wants MIN:MAX, e.g. 1:4; got {text!r}") from None
    if lo < 0 or hi < max(lo, 1):
        raise argparse.ArgumentTypeError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1; got {text!r}")
    return lo, hi


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    from .schemas import Autoscaling

    autoscaling = None
    if args.autoscale:
        lo, hi = args.autoscale
        autoscaling = Autoscaling(min_replicas=lo, max_replicas=hi, target_ongoing_requests=args.target_ongoing)
    return AppSettings(
        backbone=args.backbone,
        store=args.store,
        device=args.device,
        dtype=args.dtype,
        cache_bytes=args.cache_bytes,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000.0,
        replicas=args.replicas,
        autoscaling=autoscaling,
        worker_num_cpus=args.worker_cpus,
        worker_num_gpus=args.worker_gpus,
        max_inputs=args.max_inputs,
        torch_threads=args.torch_threads,
        admin_key_file=args.admin_key_file,
    )


def serve_until_interrupted(
    settings: AppSettings,
    *,
    host: str,
    port: int,
    address: str | None = None,
    num_cpus: int | None = None,
    banner: Callable[[str], None] | None = None,
) -> int:
    """Deploy, print where things are, block until Ctrl-C, then shut Serve and Ray down.

    A taken ``host:port`` (local mode) is refused first, before the admin key file is made or Ray starts.
    """
    import time

    from .app import ensure_port_free, run_local
    from .auth import ADMIN_KEY_ENV, resolve_admin_key

    if address is None:  # run_local checks again; this one keeps a refused serve free of side effects
        ensure_port_free(host, port)
    _, key_path = resolve_admin_key(settings.admin_key_file)  # same file the Ingress replicas read
    if key_path is not None and settings.admin_key_file is None:
        settings = settings.model_copy(update={"admin_key_file": str(key_path)})
    url = run_local(settings, host=host, port=port, num_cpus=num_cpus, address=address)
    where = f"from ${ADMIN_KEY_ENV}" if key_path is None else f"in {key_path} (mode 0600)"
    print(
        f"\nprefixserve is serving {settings.backbone} at {url}  (docs: {url}/docs)\nadmin key: {where}\n",
        file=sys.stderr,
        flush=True,
    )
    if banner:
        banner(url)
    import signal

    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)  # also when started in the background (SIGINT ignored)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nshutting down ...", file=sys.stderr)
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        if address is None:
            ray.shutdown()
    return 0


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from prefixserve.adapters.errors import BadRequestError

    try:
        settings = settings_from_args(args)
    except ValidationError as exc:  # the dispatcher prints it as the error envelope, exit 2
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BadRequestError(f"invalid serve settings: {problems}", code="bad_settings") from None
    return serve_until_interrupted(
        settings, host=args.host, port=args.port, address=args.ray_address, num_cpus=args.num_cpus
    )


def _help(field: str) -> str:
    return AppSettings.model_fields[field].description or field


def register(sub: argparse._SubParsersAction) -> None:
    """``serve``: every default and most help texts come from :class:`AppSettings` (written once there)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    d = DEFAULTS
    p = sub.add_parser(
        "serve",
        formatter_class=fmt,
        help="run the HTTP server (Ray Serve: Ingress + Worker)",
        description="Start the Ray Serve application: a FastAPI Ingress (auth, validation, routing) "
        "and a batched Worker deployment that holds the backbone. Same app as prefixserve.server.app:build_app.",
    )
    p.add_argument("--backbone", required=True, help=_help("backbone"))
    p.add_argument("--store", required=True, help=_help("store"))
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--replicas", type=int, default=d.replicas, help=_help("replicas"))
    group.add_argument(
        "--autoscale",
        type=parse_autoscale,
        default=None,
        metavar="MIN:MAX",
        help="autoscale Worker replicas between MIN and MAX",
    )
    p.add_argument(
        "--target-ongoing",
        type=float,
        default=None,
        help="autoscaling target ongoing requests per replica (default: --max-batch-size)",
    )
    p.add_argument("--device", default=d.device, help=_help("device"))
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"], help=_help("dtype"))
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help=_help("max_batch_size"))
    p.add_argument(
        "--batch-wait-ms", type=float, default=d.batch_wait_timeout_s * 1000.0, help="how long a batch waits to fill"
    )
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes, help=_help("cache_bytes"))
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help=_help("max_inputs"))
    # --backbone-cpus/--backbone-gpus: the flags' names before the deployment was called Worker
    p.add_argument(
        "--worker-cpus", "--backbone-cpus", type=float, default=d.worker_num_cpus, help="num_cpus per Worker"
    )
    p.add_argument(
        "--worker-gpus", "--backbone-gpus", type=float, default=d.worker_num_gpus, help="num_gpus per Worker"
    )
    p.add_argument("--torch-threads", type=int, default=d.torch_threads, help=_help("torch_threads"))
    p.add_argument("--admin-key-file", default=d.admin_key_file, help=_help("admin_key_file"))
    p.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster instead of a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.set_defaults(func=_serve)

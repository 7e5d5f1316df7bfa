"""``prefixserve serve``: the Ray Serve application on a local Ray (loopback) or an existing cluster.

Never falls back to another backbone (only the quickstart does): a server must serve what it was
asked to, or fail.
"""

from __future__ import annotations

import argparse
import sys


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale wants MIN:MAX, e.g. 1:4; got {text!r}") from None
    if lo < 0 or hi < max(lo, 1):
        raise argparse.ArgumentTypeError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1; got {text!r}")
    return lo, hi


def settings_from_args(args):
    from .schemas import AppSettings, Autoscaling

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
        replicas=args.replicas or 1,
        autoscaling=autoscaling,
        backbone_num_cpus=args.backbone_cpus,
        backbone_num_gpus=args.backbone_gpus,
        max_inputs=args.max_inputs,
        torch_threads=args.torch_threads,
        admin_key_file=args.admin_key_file,
    )


def serve_until_interrupted(
    settings, *, host: str, port: int, address: str | None = None, num_cpus: int | None = None, banner=None
) -> int:
    """Deploy, print where things are, block until Ctrl-C, then shut Serve and Ray down."""
    import time

    from .app import run_local
    from .auth import ADMIN_KEY_ENV, resolve_admin_key

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

    def _interrupt(signum, frame):
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


def _serve(args) -> int:
    from prefixserve.adapters.errors import PrefixServeError

    try:
        settings = settings_from_args(args)
    except (ValueError, PrefixServeError) as exc:
        print(f"prefixserve serve: {exc}", file=sys.stderr)
        return 2
    return serve_until_interrupted(
        settings, host=args.host, port=args.port, address=args.ray_address, num_cpus=args.num_cpus
    )


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "serve",
        formatter_class=fmt,
        help="run the HTTP server (Ray Serve: Ingress + Backbone)",
        description="Start the Ray Serve application: a FastAPI Ingress (auth, validation, routing) "
        "and a batched Backbone deployment. Same app as prefixserve.server.app:build_app.",
    )
    p.add_argument("--backbone", required=True, help="hub id or local folder of the encoder")
    p.add_argument("--store", required=True, help="file:///path | redis://host:6379/0 | memory://")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--replicas", type=int, default=None, help="fixed number of Backbone replicas (default 1)")
    group.add_argument(
        "--autoscale",
        type=parse_autoscale,
        default=None,
        metavar="MIN:MAX",
        help="autoscale Backbone replicas between MIN and MAX",
    )
    p.add_argument(
        "--target-ongoing",
        type=float,
        default=None,
        help="autoscaling target ongoing requests per replica (default: --max-batch-size)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per backbone forward")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--cache-bytes", type=int, default=2 * 2**30, help="device adapter cache budget per replica")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per classify request")
    p.add_argument("--backbone-cpus", type=float, default=1.0, help="num_cpus per Backbone replica")
    p.add_argument("--backbone-gpus", type=float, default=0.0, help="num_gpus per Backbone replica")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads per Backbone replica")
    p.add_argument(
        "--admin-key-file",
        default=None,
        help="admin key file (created 0600 if absent); ignored when PREFIXSERVE_ADMIN_KEY is set",
    )
    p.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster instead of a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    p.set_defaults(func=_serve)

"""``prefixserve serve``: the Ray Serve application on a local Ray (loopback) or an existing cluster.

Never falls back to another backbone (only the quickstart does): a server must serve what it was
asked to, or fail.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from .schemas import DEFAULTS, ENV_PREFIX, AppSettings


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale wants MIN:MAX, e.g. 1:4; got {text!r}") from None
    if lo < 0 or hi < max(lo, 1):
        raise argparse.ArgumentTypeError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1; got {text!r}")
    return lo, hi


# flag dest -> AppSettings field, for flags whose value goes straight into the settings
_FIELD_FLAGS = (
    "backbone",
    "store",
    "replicas",
    "device",
    "dtype",
    "max_batch_size",
    "cache_bytes",
    "max_inputs",
    "worker_num_cpus",
    "worker_num_gpus",
    "torch_threads",
    "admin_key_file",
)


def settings_from_args(args: argparse.Namespace) -> AppSettings:
    """Flags given on the command line > ``PREFIXSERVE_<NAME>`` in this process's env > AppSettings defaults.

    Resolved here, once: the result is what every Ingress and Worker replica gets (they never read the env).
    """
    from .schemas import Autoscaling

    given: dict[str, Any] = {f: getattr(args, f) for f in _FIELD_FLAGS if getattr(args, f, None) is not None}
    if getattr(args, "batch_wait_ms", None) is not None:
        given["batch_wait_timeout_s"] = args.batch_wait_ms / 1000.0
    if args.autoscale:
        lo, hi = args.autoscale
        given["autoscaling"] = Autoscaling(min_replicas=lo, max_replicas=hi)
    elif args.replicas is not None:
        given["autoscaling"] = None  # --replicas beats an autoscaling config from the env
    settings = AppSettings(**given)
    if args.target_ongoing is not None and settings.autoscaling is not None:
        auto = settings.autoscaling.model_copy(update={"target_ongoing_requests": args.target_ongoing})
        settings = settings.model_copy(update={"autoscaling": auto})
    return settings


def serve_until_interrupted(
    settings: AppSettings,
    *,
    host: str,
    port: int,
    address: str | None = None,
    num_cpus: int | None = None,
    banner: Callable[[str], None] | None = None,
    check: bool = True,
) -> int:
    """Deploy, print where things are, block until Ctrl-C, then shut Serve and Ray down.

    Preflight first (:func:`~.app.preflight`: a taken ``host:port`` in local mode, a store that does not
    answer or take writes, a backbone that cannot be loaded), before the admin key file is made or Ray
    starts: each fails in seconds with one line. ``check=False`` skips it.
    """
    import time

    from .app import preflight, run_local
    from .auth import ADMIN_KEY_ENV, resolve_admin_key

    if check:  # run_local checks the port again; this keeps a refused serve free of side effects
        preflight(settings, host=host, port=port, local=address is None)
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
        settings,
        host=args.host,
        port=args.port,
        address=args.ray_address,
        num_cpus=args.num_cpus,
        check=not args.no_preflight,
    )


def _env(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _help(field: str, text: str | None = None, default: Any = None) -> str:
    """The field's description, its default (written once, in AppSettings) and its env var."""
    info = AppSettings.model_fields[field]
    shown = getattr(DEFAULTS, field) if default is None else default
    return f"{text or info.description or field} (default: {shown}; env {_env(field)})"


_ENV_ONLY_HELP = """every AppSettings field can come from the environment as PREFIXSERVE_<FIELD> (nested ones as JSON,
e.g. PREFIXSERVE_AUTOSCALING='{"min_replicas": 1, "max_replicas": 4}'); a flag beats the env, the env beats
the default. Read once, here: the replicas get the resolved values. Settings without a flag:
"""


def _shown(value: Any) -> str:
    """A default as the env var would spell it (nested settings as JSON)."""
    import dataclasses
    import json

    from pydantic import BaseModel

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.dumps(dataclasses.asdict(value))
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    return str(value)


def _epilog() -> str:
    flagged = {*_FIELD_FLAGS, "batch_wait_timeout_s", "autoscaling"}
    fields = [f for f in AppSettings.model_fields if f not in flagged]
    rows = [f"  {_env(f)} (default: {_shown(getattr(DEFAULTS, f))})" for f in fields]
    return _ENV_ONLY_HELP + "\n".join(rows)


def register(sub: argparse._SubParsersAction) -> None:
    """``serve``: every default and help text comes from :class:`AppSettings` (written once there).

    Settings flags default to None (= not given), so a flag beats ``PREFIXSERVE_*`` and the env beats
    the AppSettings default; the help shows each default once, with its env var.
    """
    p = sub.add_parser(
        "serve",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the HTTP server (Ray Serve: Ingress + Worker)",
        description="Start the Ray Serve application: a FastAPI Ingress (auth, validation, routing)\n"
        "and a batched Worker deployment that holds the backbone (prefixserve.server.app:build_app).\n"
        "Preflight, before Ray starts: the port is free, the store answers and takes writes, the backbone\n"
        "is a folder, cached, or reachable on the hub; each failure is one line and exit status 2.",
        epilog=_epilog(),
    )
    p.add_argument("--backbone", help=_help("backbone"))
    p.add_argument("--store", help=_help("store"))
    p.add_argument(
        "--host",
        default=os.environ.get(f"{ENV_PREFIX}HOST", "127.0.0.1"),
        help=f"HTTP bind address (default: 127.0.0.1; env {ENV_PREFIX}HOST)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get(f"{ENV_PREFIX}PORT", "8000")),
        help=f"HTTP port (default: 8000; env {ENV_PREFIX}PORT)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--replicas", type=int, help=_help("replicas"))
    group.add_argument(
        "--autoscale",
        type=parse_autoscale,
        metavar="MIN:MAX",
        help=f"autoscale Worker replicas between MIN and MAX (default: off; env {_env('autoscaling')} as JSON)",
    )
    p.add_argument(
        "--target-ongoing",
        type=float,
        help="autoscaling target ongoing requests per replica (default: --max-batch-size)",
    )
    p.add_argument("--device", help=_help("device"))
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help=_help("dtype"))
    p.add_argument("--max-batch-size", type=int, help=_help("max_batch_size"))
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        help=f"how long a batch waits to fill, ms (default: {DEFAULTS.batch_wait_timeout_s * 1000:g}; "
        f"env {_env('batch_wait_timeout_s')} in seconds)",
    )
    p.add_argument("--cache-bytes", type=int, help=_help("cache_bytes"))
    p.add_argument("--max-inputs", type=int, help=_help("max_inputs"))
    # --backbone-cpus/--backbone-gpus: the flags' names before the deployment was called Worker
    p.add_argument(
        "--worker-cpus", "--backbone-cpus", dest="worker_num_cpus", type=float, help=_help("worker_num_cpus")
    )
    p.add_argument(
        "--worker-gpus", "--backbone-gpus", dest="worker_num_gpus", type=float, help=_help("worker_num_gpus")
    )
    p.add_argument("--torch-threads", type=int, help=_help("torch_threads"))
    p.add_argument("--admin-key-file", help=_help("admin_key_file"))
    p.add_argument("--ray-address", default=None, help="connect to an existing Ray cluster instead of a local one")
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of the local Ray (default: all cores, raised so a training runner fits beside the replicas)",
    )
    p.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the checks before Ray starts (port free, store answers and takes writes, backbone loadable)",
    )
    p.set_defaults(func=_serve)

    from .jobs_cli import register as register_jobs  # job, dataset: training through a server's API

    register_jobs(sub)

"""`prefixserve` command line: one sub-command per job, each owned by the package that does it.

Sub-command modules expose ``register(subparsers)``; they import torch/ray lazily inside their
handlers so that ``prefixserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# module path -> registers one or more sub-commands
_MODULES = (
    "prefixserve.adapters.cli",  # pack, unpack, inspect, predict
    "prefixserve.adapters.store.cli",  # store, tenant
    "prefixserve.server.cli",  # serve
    "prefixserve.trainer.cli",  # train, pretrain, experiment
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixserve",
        description="Multi-tenant prefix/prompt adapter server: one frozen encoder, many tenants' "
        "adapters batched into one forward pass.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Expected failures print ``{"error": {code, message}}`` on stderr, exit 2."""
    from prefixserve.adapters.errors import PrefixServeError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrefixServeError as exc:
        error = exc
    except OSError as exc:  # unreadable input, unwritable output: the local user may see the OS's words
        error = PrefixServeError(str(exc), code="io_error", status=400)
    print(json.dumps(error.to_dict(), ensure_ascii=False), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

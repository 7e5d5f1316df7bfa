"""``prefixserve tenant limits`` and ``prefixserve tenant training-limits``: a tenant's own rate limits and
training limits, in the store (:mod:`.cli` registers them under ``tenant``).

Both work alike: no options show the limits; some options change those fields and the others keep their
values (the tenant's own, or the built-in defaults when it has none); ``--default`` clears them so that the
server's default applies again. 0 = unlimited. The commands open the store, not a server, so they cannot
know a server's configured defaults: a tenant without limits of its own shows ``default``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from .cli import _add, _open, _print


def _rate_limits() -> Any:
    from ..ratelimit import RateLimits  # lazily: ratelimit imports the store package

    return RateLimits()


def _training_limits() -> Any:
    from .jobs import TrainingLimits

    return TrainingLimits()


@dataclass(frozen=True)
class LimitSet:
    """One set of a tenant's limits: its ``TenantInfo`` field, its fields, and how to store it."""

    attr: str  # the TenantInfo field (None: the server's default)
    fields: tuple[str, ...]
    built_in: Callable[[], Any]  # the defaults a first change starts from
    store: Callable[[Any, str, Any], None]  # (store, tenant, limits or None)


RATE = LimitSet(
    "limits",
    ("requests_per_s", "rows_per_s", "burst_s", "max_concurrent"),
    _rate_limits,
    lambda store, name, limits: store.set_limits(name, limits),
)
TRAINING = LimitSet(
    "training_limits",
    ("max_active_jobs", "max_dataset_bytes", "max_job_s", "max_datasets"),
    _training_limits,
    lambda store, name, limits: store.set_training_limits(name, limits),
)


def _row(t, kind: LimitSet) -> dict:
    own = getattr(t, kind.attr)
    row: dict = {"tenant": t.name}
    for name in kind.fields:  # 0 = unlimited, as in the quota columns
        row[name] = "default" if own is None else (getattr(own, name) or "-")
    return row


def show_or_change(args, kind: LimitSet) -> int:
    """Show (no options), change (some fields; the others keep their values) or clear (--default) limits."""
    from ..errors import BadRequestError

    given = {name: getattr(args, name) for name in kind.fields if getattr(args, name) is not None}
    if args.default and given:
        raise BadRequestError("--default clears the tenant's limits; give it alone", code="bad_limits")
    store = _open(args)
    if args.default:
        kind.store(store, args.name, None)
    elif given:
        try:
            limits = replace(getattr(store.tenant_info(args.name), kind.attr) or kind.built_in(), **given)
        except ValueError as exc:
            raise BadRequestError(str(exc), code="bad_limits") from None
        kind.store(store, args.name, limits)
    t = store.tenant_info(args.name)
    _print(args, t.to_dict(), [_row(t, kind)], ["tenant", *kind.fields])
    return 0


def register(tsub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """Add ``limits`` and ``training-limits`` to the ``tenant`` sub-commands."""
    p = _add(
        tsub,
        "limits",
        lambda args: show_or_change(args, RATE),
        parent,
        "show or change a tenant's rate limits",
        "Show a tenant's rate limits, change some of them (the others keep their values), or clear them "
        "with --default so that the server's default limits apply. 0 = unlimited.",
    )
    p.add_argument("name")
    p.add_argument("--requests-per-s", type=float, help="requests per second (token bucket refill)")
    p.add_argument("--rows-per-s", type=float, help="input rows per second (token bucket refill)")
    p.add_argument("--burst-s", type=float, help="seconds of each rate a bucket holds (short bursts pass)")
    p.add_argument("--max-concurrent", type=int, help="classify calls in flight at once")
    p.add_argument("--default", action="store_true", help="clear the limits: the server's default applies")
    p = _add(
        tsub,
        "training-limits",
        lambda args: show_or_change(args, TRAINING),
        parent,
        "show or change a tenant's training limits",
        "Show a tenant's training limits, change some of them (the others keep their values), or clear them "
        "with --default so that the server's training.limits apply. 0 = unlimited.",
    )
    p.add_argument("name")
    p.add_argument("--max-active-jobs", type=int, help="queued + running training jobs at once")
    p.add_argument("--max-dataset-bytes", type=int, help="total bytes of the tenant's stored datasets")
    p.add_argument("--max-job-s", type=float, help="wall time of one job, in seconds (then it fails: job_timeout)")
    p.add_argument("--max-datasets", type=int, help="stored datasets")
    p.add_argument("--default", action="store_true", help="clear the limits: the server's training.limits apply")

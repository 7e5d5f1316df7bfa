"""``prefixserve job ...`` and ``prefixserve dataset ...``: training as a service, from the command line.

Both go through a running server's HTTP API with :mod:`prefixserve.client` (URL: ``--server``, else
``$PREFIXSERVE_URL``, else http://127.0.0.1:8000; key: ``$PREFIXSERVE_API_KEY``, a tenant's key).

Decisions:
* ``job submit DATA``: DATA is a local file (sent inline, stored as one of your datasets) or the id of a dataset
  uploaded before (``ds_...``). Each training option is a flag made from the server's own schema
  (:class:`~.training_schemas.TrainingOptions`): its help shows the server's default, and a flag not given is
  not sent, so the server's default applies.
* ``job watch`` (and ``submit --watch``) shows a progress bar over epochs and one line per epoch on stderr, then
  the outcome as one JSON line on stdout. Exit status: 0 when the job succeeded (published or not), 3 when it
  failed or was cancelled (its error as ``{"error": ...}`` on stderr), 2 when the command itself failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from typing import Any

from .training_schemas import DatasetFormat, TrainingOptions

EXIT_JOB_FAILED = 3
_EPILOG = (
    "server: --server URL, else $PREFIXSERVE_URL, else http://127.0.0.1:8000. key: $PREFIXSERVE_API_KEY (a tenant's "
    "key; --api-key works too, but a key on the command line stays in the shell history and shows in `ps`)."
)


def _client(args: argparse.Namespace) -> Any:
    from prefixserve.client import Client

    return Client(args.server, api_key=args.api_key)


def _print(args: argparse.Namespace, data: Any, rows: list[dict[str, Any]], columns: list[str]) -> None:
    from prefixserve.adapters.store.cli import _table

    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False, default=str))
    else:
        print(_table(rows, columns) if rows else "(none)")


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


# ---- datasets -----------------------------------------------------------------------------------------
def _dataset_upload(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as c:
        ds = c.upload_dataset(
            args.file, format=args.format, name=args.name, text_column=args.text_column, label_column=args.label_column
        )
    print(json.dumps(dataclasses.asdict(ds), ensure_ascii=False))
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as c:
        items = c.list_datasets()
    rows = [
        {"id": d.dataset_id, "format": d.format, "name": d.name, "bytes": d.bytes, "created": _when(d.created)}
        for d in items
    ]
    _print(args, [dataclasses.asdict(d) for d in items], rows, ["id", "format", "name", "bytes", "created"])
    return 0


def _dataset_delete(args: argparse.Namespace) -> int:
    with _client(args) as c:
        c.delete_dataset(args.dataset_id)
    return 0


# ---- jobs ---------------------------------------------------------------------------------------------
def _job_row(job: Any) -> dict[str, Any]:
    last = job.history[-1] if job.history else None
    return {
        "id": job.job_id,
        "state": job.state,
        "prefix_id": job.prefix_id,
        "kind": job.options.get("kind", ""),
        "epoch": f"{job.epoch}/{job.epochs}",
        "eval_acc": f"{last.eval_accuracy:.4f}" if last and last.eval_accuracy is not None else "-",
        "published": job.published_version or "-",
        "created": _when(job.created),
    }


_JOB_COLUMNS = ["id", "state", "prefix_id", "kind", "epoch", "eval_acc", "published", "created"]


def _outcome(job: Any) -> int:
    """The finished job as one JSON line on stdout; its error on stderr; the exit status."""
    result = job.result or {}
    print(
        json.dumps(
            {
                "job_id": job.job_id,
                "state": job.state,
                "published": bool(result.get("published")),
                "version": result.get("version"),
                "decision": result.get("decision"),
                "reason": result.get("reason"),
            },
            ensure_ascii=False,
        )
    )
    if job.state == "succeeded":
        return 0
    error = job.error or {"code": "cancelled", "message": "the job was cancelled"}
    print(json.dumps({"error": error}, ensure_ascii=False), file=sys.stderr)
    return EXIT_JOB_FAILED


def _epoch_line(e: Any, epochs: int) -> str:
    line = f"epoch {e.epoch}/{epochs}  train loss {e.train_loss:.4f}"
    if e.eval_accuracy is not None:
        line += f"  eval loss {e.eval_loss:.4f}  accuracy {e.eval_accuracy:.4f}  macro-F1 {e.eval_macro_f1:.4f}"
    return line + f"  ({e.epoch_time_s:.1f} s)"


def _watch(client: Any, job_id: str) -> int:
    from tqdm.auto import tqdm

    shown, job = 0, None
    with tqdm(total=0, unit="epoch", desc=job_id, file=sys.stderr) as bar:
        for job in client.watch_training(job_id):
            bar.total = max(job.epochs, 1)
            bar.set_postfix_str(job.state)
            for e in job.history[shown:]:
                bar.write(_epoch_line(e, job.epochs), file=sys.stderr)
            shown = len(job.history)
            bar.update(job.epoch - bar.n)
    assert job is not None  # the stream always starts with the record
    return _outcome(job)


def _job_submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    options = {name: getattr(args, name) for name in TrainingOptions.model_fields if getattr(args, name) is not None}
    is_id = args.data.startswith("ds_") and not Path(args.data).exists()
    with _client(args) as c:
        job = c.submit_training(
            args.prefix_id,
            dataset_id=args.data if is_id else None,
            data=None if is_id else args.data,
            format=args.format,
            **options,
        )
        print(f"job {job.job_id} {job.state}", file=sys.stderr)
        if args.watch:
            return _watch(c, job.job_id)
    print(json.dumps({"job_id": job.job_id, "state": job.state, "dataset_id": job.dataset_id}))
    return 0


def _job_watch(args: argparse.Namespace) -> int:
    with _client(args) as c:
        return _watch(c, args.job_id)


def _job_status(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as c:
        job = c.training_job(args.job_id)
    if args.json:
        print(json.dumps(dataclasses.asdict(job), indent=2, ensure_ascii=False))
        return 0
    print(_print_table([_job_row(job)]))
    for e in job.history:
        print(_epoch_line(e, job.epochs))
    if job.error:
        print(f"error: {job.error.get('code')}: {job.error.get('message')}")
    if job.result:
        print(f"result: {job.result.get('decision')}: {job.result.get('reason')}")
    return 0


def _print_table(rows: list[dict[str, Any]]) -> str:
    from prefixserve.adapters.store.cli import _table

    return _table(rows, _JOB_COLUMNS)


def _job_cancel(args: argparse.Namespace) -> int:
    with _client(args) as c:
        job = c.cancel_training(args.job_id)
    print(json.dumps({"job_id": job.job_id, "state": job.state, "cancel_requested": job.cancel_requested}))
    return 0


def _job_list(args: argparse.Namespace) -> int:
    import dataclasses

    with _client(args) as c:
        jobs = c.list_training_jobs()
    _print(args, [dataclasses.asdict(j) for j in jobs], [_job_row(j) for j in jobs], _JOB_COLUMNS)
    return 0


# ---- parsers ------------------------------------------------------------------------------------------
def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per training option, typed, with the server's default in its help (default None: not sent)."""
    group = p.add_argument_group("training options (not given: the server's default)")
    for name, info in TrainingOptions.model_fields.items():
        flag, text = "--" + name.replace("_", "-"), info.description or name.replace("_", " ")
        if info.annotation is bool:
            group.add_argument(flag, dest=name, action="store_true", default=None, help=text)
            continue
        hint = info.annotation
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        shown = f" (server default: {info.default})" if info.default is not None else ""
        kw: dict[str, Any] = {"dest": name, "default": None, "help": text + shown}
        if typing.get_origin(hint) is typing.Literal:
            kw["choices"] = list(typing.get_args(hint))
        elif hint == list[str]:
            kw.update(type=_names, metavar="A,B,...")
        else:
            kw["type"] = hint
        group.add_argument(flag, **kw)


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--server", metavar="URL", default=None, help="the server (default: $PREFIXSERVE_URL, else local)")
    p.add_argument("--api-key", default=None, help="a tenant's key (default: $PREFIXSERVE_API_KEY; prefer the env)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    common = _common()

    def add(sub: argparse._SubParsersAction, name: str, func: Any, help_text: str, description: str = "") -> Any:
        p = sub.add_parser(name, parents=[common], help=help_text, description=description or help_text, epilog=_EPILOG)
        p.set_defaults(func=func)
        return p

    job = subparsers.add_parser(
        "job",
        help="training jobs on the server's cluster: submit, watch, status, cancel, list",
        description="Train an adapter on the server's Ray cluster (its backbone, its store) and publish it as a new "
        "version of one of your adapters when it beats the served version on the job's eval split (or with "
        "--force). Jobs run as Ray actors beside the server and survive its restarts.",
        epilog=_EPILOG,
    )
    jsub = job.add_subparsers(dest="job_command", metavar="COMMAND", required=True)
    p = add(
        jsub,
        "submit",
        _job_submit,
        "start a training job",
        "Start a job that trains an adapter on DATA and publishes it to --prefix-id if it beats the version "
        "served now (higher eval accuracy; a tie: higher macro-F1) or --force is given. Bad data fails at once, "
        "with the bad rows counted by reason.",
    )
    p.add_argument("data", metavar="DATA", help="a local .tsv (NSMC) / .csv / .jsonl file, or a dataset id ds_...")
    p.add_argument("--prefix-id", required=True, help="publish the trained adapter as a new version of this id")
    p.add_argument(
        "--format", choices=typing.get_args(DatasetFormat), help="DATA's format (default: from its extension)"
    )
    p.add_argument("--watch", action="store_true", help="then follow it as `job watch` does")
    _option_flags(p)
    add(
        jsub,
        "watch",
        _job_watch,
        "follow a job until it ends",
        "A progress bar over epochs and one line per epoch (loss, eval accuracy, macro-F1) on stderr; the outcome "
        f"as JSON on stdout. Exit status 0: succeeded; {EXIT_JOB_FAILED}: failed or cancelled.",
    ).add_argument("job_id", metavar="JOB_ID")
    add(jsub, "status", _job_status, "show a job: state, epochs, error or outcome").add_argument(
        "job_id", metavar="JOB_ID"
    )
    add(
        jsub, "cancel", _job_cancel, "cancel a job (queued: at once; running: within about a second; nothing published)"
    ).add_argument("job_id", metavar="JOB_ID")
    add(jsub, "list", _job_list, "your jobs, newest first")

    ds = subparsers.add_parser(
        "dataset",
        help="training datasets on the server: upload, list, delete",
        description="Datasets stored on the server for training jobs (`prefixserve job submit ds_...`).",
        epilog=_EPILOG,
    )
    dsub = ds.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True)
    p = add(
        dsub,
        "upload",
        _dataset_upload,
        "upload a labelled dataset",
        "Upload NSMC TSV (id, document, label), CSV or JSONL. The server parses it first: the answer counts "
        "usable rows and bad rows by reason; a file with no usable row is refused.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument("--format", choices=typing.get_args(DatasetFormat), help="default: from the extension")
    p.add_argument("--name", default=None, help="a name to list it by (default: the file's name)")
    p.add_argument("--text-column", default=None, help="CSV/JSONL text column (default: document | text | sentence)")
    p.add_argument("--label-column", default=None, help="CSV/JSONL label column (default: label | category)")
    add(dsub, "list", _dataset_list, "your datasets, newest first")
    add(dsub, "delete", _dataset_delete, "delete a dataset (refused while an active job uses it)").add_argument(
        "dataset_id", metavar="DATASET_ID"
    )

"""Sub-commands ``train``, ``pretrain``, ``experiment`` (torch is imported inside the handlers only).

Errors that are the user's (bad data, bad flags, mismatched --init-from, no MLM head) print
``{"error": {"code", "message"}}`` on stderr and exit 2.

Decisions: options are generated from the config dataclasses (:mod:`.config`): flag ``--<field-name>``, type,
choices (``Literal``), default and help come from the field, so no default is restated here. What is only
the command line's business stays here: which part goes in which help group, which fields are not offered
(:data:`_NOT_ON_CLI`), which are required although code may leave them unset (:data:`_REQUIRED_ON_CLI`), and
``--eval`` / ``--eval-split`` being exclusive for ``train``. A ``True`` boolean becomes ``--no-<name>``.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, Field, fields
from typing import TYPE_CHECKING, Any

from .config import (
    DataOptions,
    ExperimentConfig,
    PrefixOptions,
    PretrainConfig,
    RunOptions,
    ScheduleOptions,
    TrainConfig,
    TuningOptions,
    WeightOptions,
    parts_of,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# part -> help group (None: the command's main options, next to its own fields)
_GROUPS: dict[type, str | None] = {
    RunOptions: None,
    DataOptions: "data (NSMC TSV natively; CSV, JSONL)",
    PrefixOptions: "prefix projection",
    WeightOptions: "weight adapters (--kind lora | ia3 | bottleneck)",
    ScheduleOptions: "optimisation",
    TuningOptions: "optimisation",
}
_NOT_ON_CLI = {"train_backbone", "max_grad_norm"}  # set by experiment rows and code, never by hand
_REQUIRED_ON_CLI = {"out"}  # the commands always write their result; code may keep it in memory


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


class _HelpFormatter(argparse.HelpFormatter):
    """Show every non-None default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.default is True and action.nargs == 0:  # --no-progress style switches
            return text
        return f"{text} (default: %(default)s)".strip()


def _strip_none(hint: Any) -> Any:
    """``X | None`` -> ``X`` (``None`` is what an unset option gives anyway)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def _option(f: Field[Any], hint: Any) -> tuple[str, dict[str, Any]]:
    """(flag, ``add_argument`` keywords) for one config field."""
    flag = "--" + f.name.replace("_", "-")
    kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}  # every field documents itself
    if f.default is not MISSING:
        kw["default"] = f.default
    elif f.default_factory is not MISSING:
        kw["default"] = f.default_factory()
    else:
        kw["required"] = True
    if f.name in _REQUIRED_ON_CLI:
        kw.update(required=True, default=None)
    hint = _strip_none(hint)
    if hint is bool:
        if kw.get("default"):
            return "--no-" + f.name.replace("_", "-"), {**kw, "action": "store_false", "help": "turn off " + kw["help"]}
        return flag, {**kw, "action": "store_true"}
    if typing.get_origin(hint) is typing.Literal:
        kw["choices"] = list(typing.get_args(hint))
    elif hint == list[int]:
        kw["type"] = _ints
    elif hint == list[str]:
        kw["type"] = _names
    elif hint in (int, float):
        kw["type"] = hint
    elif hint is not str:
        raise TypeError(f"no command-line form for {f.name}: {hint}")
    return flag, kw


def add_config_options(
    parser: argparse.ArgumentParser, config_cls: type[DataclassInstance], *, exclusive: tuple[str, ...] = ()
) -> None:
    """One option per field of ``config_cls`` (its own fields in the main options, parts in their groups);
    the fields named in ``exclusive`` form one mutually exclusive set."""
    hints = typing.get_type_hints(config_cls)
    owner = {f.name: part for part in parts_of(config_cls) for f in fields(part)}
    groups: dict[str | None, argparse._ActionsContainer] = {None: parser}
    one_of: argparse._MutuallyExclusiveGroup | None = None
    for f in fields(config_cls):  # the config's own Field: an override's default, not the part's
        if f.name in _NOT_ON_CLI:
            continue
        title = _GROUPS[owner[f.name]] if f.name in owner else None
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = groups[title]
        if f.name in exclusive:
            one_of = one_of or target.add_mutually_exclusive_group()
            target = one_of
        flag, kw = _option(f, hints[f.name])
        target.add_argument(flag, **kw)


def _fields(args: argparse.Namespace, cls: type[DataclassInstance]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def _train(args: argparse.Namespace) -> int:
    from prefixserve.adapters.errors import BadRequestError

    from .train import train

    if args.upload is not None and not args.prefix_id:
        raise BadRequestError("--upload needs --prefix-id", code="bad_args")
    cfg = TrainConfig(**_fields(args, TrainConfig))
    res = train(cfg)
    summary: dict[str, Any] = {"out": cfg.out, "labels": res.labels, "best": res.best, "bytes": len(res.packed or b"")}
    if args.upload is not None:
        if res.packed is None:  # the CLI's --kind always gives an adapter; code can ask for a head only
            raise BadRequestError("nothing to upload: this run trained no adapter", code="bad_args")
        summary["upload"] = _upload(args, res.packed)
    print(json.dumps(summary, ensure_ascii=False, default=str))
    return 0


def _upload(args: argparse.Namespace, packed: bytes) -> dict[str, Any]:
    """PUT the packed adapter with :class:`prefixserve.client.Client` (its retries: 503 and a failed connect
    only, an upload is not idempotent). URL: ``--upload URL``, else ``$PREFIXSERVE_URL``, else the local
    default; key: ``--api-key``, else ``$PREFIXSERVE_API_KEY``."""
    import dataclasses

    from prefixserve.client import Client

    with Client(args.upload or None, api_key=args.api_key) as client:
        return dataclasses.asdict(client.upload(args.prefix_id, packed))


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain

    res = pretrain(PretrainConfig(**_fields(args, PretrainConfig)))
    log = res["log"]
    print(
        json.dumps(
            {"out": args.out, "loss_before": log["loss_before"], "loss_after": log["loss_after"], "steps": log["steps"]}
        )
    )
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment import markdown, run_table1

    report = run_table1(ExperimentConfig(**_fields(args, ExperimentConfig)))
    print(markdown(report))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        help="train a tenant's adapter (prefix, prompt, lora, ia3, bottleneck)",
        description="Train a prefix (P-Tuning v2), soft prompt, LoRA, IA3 or bottleneck adapter plus a "
        "classification head on a frozen backbone; write the packed adapter and <out>.log.json; optionally "
        "upload it.",
    )
    add_config_options(p, TrainConfig, exclusive=("eval", "eval_split"))
    u = p.add_argument_group("upload")
    u.add_argument(
        "--upload",
        nargs="?",
        const="",
        default=None,
        metavar="URL",
        help="PUT the adapter to URL/v1/prefixes/<prefix-id> (no URL: $PREFIXSERVE_URL, else http://127.0.0.1:8000)",
    )
    u.add_argument("--prefix-id", default=None, help="adapter id on the server (needed by --upload)")
    u.add_argument(
        "--api-key",
        default=None,
        help="the tenant's API key; default $PREFIXSERVE_API_KEY. Prefer the variable: a key given here is "
        "kept in the shell's history and shown to every local user by `ps`",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "pretrain",
        formatter_class=_HelpFormatter,
        help="pre-train a prefix by MLM on raw text",
        description="Masked-LM pre-training of a prefix on a raw-text corpus (one text per line) "
        "with the backbone and its MLM head frozen. Needs a checkpoint with an MLM head.",
    )
    add_config_options(p, PretrainConfig)
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "experiment",
        formatter_class=_HelpFormatter,
        help="reproduce paper tables (table1)",
        description="table1: linear probe, frozen prefix at each length (with --pretrain-corpus also from an "
        "MLM pre-trained prefix per length; --init-from: one pre-trained init row), full fine-tuning, prefix + "
        "full fine-tuning; writes table1.md, table1.json and table1.png.",
    )
    p.add_argument("table", choices=["table1"])
    add_config_options(p, ExperimentConfig)
    p.set_defaults(func=_experiment)

"""Sub-commands ``train``, ``pretrain``, ``experiment`` (torch is imported inside the handlers only).

Errors that are the user's (bad data, bad flags, mismatched --init-from, no MLM head) print
``{"error": {"code", "message"}}`` on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


class _HelpFormatter(argparse.HelpFormatter):
    """Show every non-None default, also for options without a help text."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        if action.default is True and action.nargs == 0:  # --no-progress style switches
            return text
        return f"{text} (default: %(default)s)".strip()


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:  # argparse skips options whose help is None: give them one
        if action.help is None and action.default not in (None, argparse.SUPPRESS) and action.option_strings:
            action.help = ""
            action.help = _HelpFormatter("x")._get_help_string(action)


def _fields(args, cls) -> dict:
    return {k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__}


def _train(args) -> int:
    from .train import TrainConfig, train, upload

    if args.upload and not args.prefix_id:
        from prefixserve.adapters.errors import BadRequestError

        raise BadRequestError("--upload needs --prefix-id", code="bad_args")
    cfg = TrainConfig(**_fields(args, TrainConfig))
    res = train(cfg)
    summary = {"out": cfg.out, "labels": res.labels, "best": res.best, "bytes": len(res.packed or b"")}
    if args.upload:
        summary["upload"] = upload(args.upload, args.prefix_id, args.api_key, res.packed)
    print(json.dumps(summary, ensure_ascii=False, default=str))
    return 0


def _pretrain(args) -> int:
    from .pretrain import PretrainConfig, pretrain

    res = pretrain(PretrainConfig(**_fields(args, PretrainConfig)))
    log = res["log"]
    print(
        json.dumps(
            {"out": args.out, "loss_before": log["loss_before"], "loss_after": log["loss_after"], "steps": log["steps"]}
        )
    )
    return 0


def _experiment(args) -> int:
    from .experiment import ExperimentConfig, run_table1

    report = run_table1(ExperimentConfig(**_fields(args, ExperimentConfig)))
    from .experiment import markdown

    print(markdown(report))
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (NSMC TSV natively; CSV, JSONL)")
    g.add_argument("--format", choices=["tsv", "csv", "jsonl"], default=None, help="unset: from the extension")
    g.add_argument("--text-column", default=None, help="unset: document | text | sentence")
    g.add_argument("--label-column", default=None, help="unset: label | category")
    g.add_argument("--text-pair-column", default=None, help="optional second text")
    g.add_argument(
        "--label-names",
        type=_names,
        default=None,
        help="comma list fixing label set/order; integer raw labels index it; unset: sorted raw values",
    )
    g.add_argument("--max-train", type=int, default=None, help="seeded subsample of the training rows")
    g.add_argument("--max-eval", type=int, default=None, help="seeded subsample of the eval rows")


def _optim_args(p: argparse.ArgumentParser, epochs: int) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--lr", type=float, default=None, help="virtual-token LR; unset: 3e-2")
    g.add_argument("--head-lr", type=float, default=1e-2)
    g.add_argument("--backbone-lr", type=float, default=3e-5, help="full fine-tuning only")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--max-length", type=int, default=128, help="real tokens per row, specials included")
    g.add_argument("--warmup", type=float, default=0.1, help="< 1: fraction of steps; else steps")
    g.add_argument("--weight-decay", type=float, default=0.01, help="head/backbone matrices only")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--patience", type=int, default=3, help="epochs without eval improvement before stopping; 0=off")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda:N")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = _HelpFormatter

    p = sub.add_parser(
        "train",
        formatter_class=fmt,
        help="train a tenant's prefix/prompt adapter",
        description="Train a prefix (P-Tuning v2) or soft prompt plus a classification head on a "
        "frozen backbone; write the packed adapter and <out>.log.json; optionally upload it.",
    )
    p.add_argument("--backbone", required=True, help="hub id or local folder (BERT/RoBERTa/XLM-R)")
    p.add_argument("--train", required=True, help="training file (.tsv NSMC, .csv, .jsonl)")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval", default=None, help="eval file (same format)")
    ev.add_argument("--eval-split", type=float, default=0.1, help="held-out fraction of --train if no --eval")
    p.add_argument("--kind", choices=["prefix", "prompt"], default="prefix")
    p.add_argument("--num-virtual-tokens", type=int, default=None, help="unset: 20, or --init-from's length")
    p.add_argument("--prefix-projection", action="store_true", help="train through an MLP; exported materialised")
    p.add_argument("--encoder-hidden-size", type=int, default=512, help="projection MLP width")
    p.add_argument("--head-dropout", type=float, default=0.1, help="dropout on the head input only")
    p.add_argument(
        "--prefix-init",
        choices=["random", "tokens"],
        default="tokens",
        help="prefix start: PEFT's N(0,1), or the K/V of random real tokens (Li & Liang)",
    )
    p.add_argument("--init-from", default=None, help="pre-trained prefix (prefixserve pretrain) or packed prefix")
    p.add_argument("--out", required=True, help="packed adapter .safetensors (log: <out>.log.json)")
    u = p.add_argument_group("upload")
    u.add_argument("--upload", default=None, metavar="URL", help="PUT the adapter to URL/v1/prefixes/<prefix-id>")
    u.add_argument("--prefix-id", default=None)
    u.add_argument("--api-key", default=None, help="Bearer token")
    _data_args(p)
    _optim_args(p, epochs=10)
    p.set_defaults(func=_train)
    _show_defaults(p)

    p = sub.add_parser(
        "pretrain",
        formatter_class=fmt,
        help="pre-train a prefix by MLM on raw text",
        description="Masked-LM pre-training of a prefix on a raw-text corpus (one text per line) "
        "with the backbone and its MLM head frozen. Needs a checkpoint with an MLM head.",
    )
    p.add_argument("--backbone", required=True)
    p.add_argument("--corpus", required=True, help="UTF-8 text file, one passage per line")
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--prefix-projection", action="store_true")
    p.add_argument("--encoder-hidden-size", type=int, default=512)
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="pre-trained prefix .safetensors")
    p.set_defaults(func=_pretrain)
    _show_defaults(p)

    p = sub.add_parser(
        "experiment",
        formatter_class=fmt,
        help="reproduce paper tables (table1)",
        description="table1: linear probe, frozen prefix at each length (optionally pre-trained "
        "init), full fine-tuning, prefix + full fine-tuning; writes table1.md and table1.json.",
    )
    p.add_argument("table", choices=["table1"])
    p.add_argument("--backbone", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", default=None)
    p.add_argument("--eval-split", type=float, default=0.1)
    p.add_argument("--lengths", type=_ints, default=[10, 50, 100, 200], help="prefix lengths, comma-separated")
    p.add_argument("--init-from", default=None, help="pre-trained prefix for an extra row")
    p.add_argument(
        "--rows",
        type=_names,
        default=["probe", "prefix", "ft", "prefix_ft"],
        help="subset of probe,prefix,ft,prefix_ft",
    )
    p.add_argument("--ft-prefix-length", type=int, default=None, help="P of the prefix+fine-tuning row")
    p.add_argument("--probe-head-lr", type=float, default=None, help="head LR of the probe row (default --head-lr)")
    p.add_argument("--prefix-init", choices=["random", "tokens"], default="tokens")
    p.add_argument("--prefix-projection", action="store_true")
    p.add_argument("--encoder-hidden-size", type=int, default=512)
    p.add_argument("--out", required=True, help="output folder")
    _data_args(p)
    _optim_args(p, epochs=10)
    p.set_defaults(func=_experiment)
    _show_defaults(p)

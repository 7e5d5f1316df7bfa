"""``prefixserve experiment table1``: the paper's Table 1 in one command.

Rows (same train/eval subsample, same seed, same epochs/patience for every row):

=============================  ===============================================================  ==========
row                            trainable                                                        servable
=============================  ===============================================================  ==========
linear probe                   head only (frozen backbone)                                      no (no adapter)
prefix P=L (each ``lengths``)  prefix + head (frozen backbone)                                  yes
prefix P=L, pre-trained init   same, prefix initialised from ``--init-from``                    yes
prompt (``--rows prompt``)     soft prompt, Q = the first of ``lengths``, + head                yes
lora, ia3, bottleneck          the weight adapter (``--lora-*``, ``--ia3-*``, ``--bottleneck``)   yes
                               + head (``--rows lora,ia3,bottleneck``)
full fine-tuning               backbone (``backbone_lr``) + head                                no (own backbone)
prefix + full fine-tuning      prefix + backbone + head, P = ``ft_prefix_length``               no (own backbone)
=============================  ===============================================================  ==========

Decisions: the fine-tuning rows train a deep copy of the backbone (the frozen rows share one instance whose
checksum is verified unchanged); lengths that leave no room for text on the backbone are skipped and listed.
Peak memory is the process high-water mark (see :mod:`.train`), so it is only an upper bound for later rows.
Writes ``table1.json`` (config + rows + per-epoch histories) and ``table1.md`` to ``out``.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ExperimentConfig, TrainConfig, shared_options

if TYPE_CHECKING:
    from prefixserve.adapters.backbone import Backbone


def _train_config(cfg: ExperimentConfig, **overrides: Any) -> TrainConfig:
    """One row's TrainConfig: the option parts it shares with the experiment, then the row's overrides.
    The experiment's own ``init_from`` (an extra row's seed) and ``out`` (a folder) are not passed down."""
    return TrainConfig(**{**shared_options(cfg, TrainConfig), **overrides})


def plan(cfg: ExperimentConfig, max_virtual: int) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """[(row name, TrainConfig overrides)], [skipped notes]."""
    rows: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
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
    if "prompt" in cfg.rows and ok:
        rows.append((f"prompt Q={ok[0]} (frozen)", dict(kind="prompt", num_virtual_tokens=ok[0])))
    if "lora" in cfg.rows:
        targets = ",".join(cfg.lora_targets)
        rows.append((f"LoRA r={cfg.lora_r} {targets} (frozen)", dict(kind="lora")))
    if "ia3" in cfg.rows:
        rows.append(("IA3 (frozen)", dict(kind="ia3")))
    if "bottleneck" in cfg.rows:
        name = f"bottleneck {cfg.bottleneck} rf={cfg.reduction_factor:g} (frozen)"
        rows.append((name, dict(kind="bottleneck")))
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


def run_table1(cfg: ExperimentConfig) -> dict[str, Any]:
    from prefixserve.adapters.backbone import load_backbone

    from .train import train

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(cfg.backbone, device=cfg.device)
    backbone_params = sum(p.numel() for p in backbone.encoder.parameters())
    rows, skipped = plan(cfg, backbone.spec.max_virtual_tokens)
    results: list[dict[str, Any]] = []
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


def _write(
    out: Path,
    cfg: ExperimentConfig,
    backbone: Backbone,
    backbone_params: int,
    results: list[dict[str, Any]],
    skipped: list[str],
) -> dict[str, Any]:
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


def markdown(report: dict[str, Any]) -> str:
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

"""``prefixserve experiment table1``: the paper's Table 1 in one command.

Rows (same train/eval subsample, same seed, same epochs/patience for every row):

=============================  ===============================================================  ==========
row                            trainable                                                        servable
=============================  ===============================================================  ==========
linear probe                   head only (frozen backbone)                                      no (no adapter)
prefix P=L (each ``lengths``)  prefix + head (frozen backbone)                                  yes
prefix P=L, MLM pre-trained    same, prefix initialised from an MLM prefix of length L that     yes
init (``--pretrain-corpus``)   the experiment pre-trains on the corpus first (:mod:`.pretrain`)
prefix, pre-trained init       same, prefix initialised from ``--init-from``                    yes
prompt (``--rows prompt``)     soft prompt, Q = the first of ``lengths``, + head                yes
lora, ia3, bottleneck          the weight adapter (``--lora-*``, ``--ia3-*``, ``--bottleneck``)   yes
                               + head (``--rows lora,ia3,bottleneck``)
full fine-tuning               backbone (``backbone_lr``) + head                                no (own backbone)
prefix + full fine-tuning      prefix + backbone + head, P = ``ft_prefix_length`` (and the      no (own backbone)
                               same from its MLM pre-trained prefix with ``--pretrain-corpus``)
=============================  ===============================================================  ==========

Decisions:
* The fine-tuning rows train a deep copy of the backbone (the frozen rows share one instance whose checksum is
  verified unchanged); lengths that leave no room for text on the backbone are skipped and listed.
* ``--pretrain-corpus``: one MLM prefix per length is pre-trained BEFORE any row (so a backbone without an MLM
  head fails with ``no_mlm_head`` before anything trains) into ``<out>/pretrained/prefix_P<L>.safetensors``,
  with the experiment's batch size, max length, warmup, seed and prefix projection (materialised). Their time
  is reported per row as pretrain time, apart from the train time. Existing files are re-made, not reused.
* Peak memory is the process high-water mark (see :mod:`.train`), so it is only an upper bound for later rows.
* ``--save-adapters`` writes each servable row's packed adapter to ``<out>/adapters/<slug>.safetensors``.
Writes ``table1.json`` (config + rows + per-epoch histories), ``table1.md`` and ``table1.png``
(:mod:`.table1_plot`, needs matplotlib) to ``out`` after every row, so partial results survive a kill.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixserve.adapters.errors import BadRequestError

from .config import ExperimentConfig, PretrainConfig, TrainConfig, shared_options

if TYPE_CHECKING:
    from prefixserve.adapters.backbone import Backbone

MLM_INIT = "MLM pre-trained init"


@dataclass(frozen=True)
class PlannedRow:
    name: str  # the table's row name
    label: str  # short name for the plot
    slug: str  # file stem of its saved adapter
    overrides: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields that differ from the experiment's
    mlm_length: int | None = None  # starts from the MLM prefix pre-trained at this length


def pretrained_prefix_path(out: str, length: int) -> Path:
    return Path(out) / "pretrained" / f"prefix_P{length}.safetensors"


def _train_config(cfg: ExperimentConfig, **overrides: Any) -> TrainConfig:
    """One row's TrainConfig: the option parts it shares with the experiment, then the row's overrides.
    The experiment's own ``init_from`` (an extra row's seed) and ``out`` (a folder) are not passed down."""
    return TrainConfig(**{**shared_options(cfg, TrainConfig), **overrides})


def _mlm_row(cfg: ExperimentConfig, p: int, name: str, label: str, slug: str, **extra: Any) -> PlannedRow:
    over = dict(kind="prefix", num_virtual_tokens=p, init_from=str(pretrained_prefix_path(cfg.out, p)))
    return PlannedRow(name, label, slug, {**over, "prefix_projection": False, **extra}, mlm_length=p)


def plan(cfg: ExperimentConfig, max_virtual: int) -> tuple[list[PlannedRow], list[str]]:
    """The rows in table order, and [skipped notes]."""
    rows: list[PlannedRow] = []
    skipped: list[str] = []
    ok = [p for p in cfg.lengths if p <= max_virtual]
    skipped += [
        f"prefix P={p}: exceeds the {max_virtual} virtual tokens this backbone allows"
        for p in cfg.lengths
        if p > max_virtual
    ]
    mlm = bool(cfg.pretrain_corpus)
    over: dict[str, Any]  # one row's TrainConfig overrides
    if "probe" in cfg.rows:
        over = dict(kind=None, head_lr=cfg.probe_head_lr or cfg.head_lr)
        rows.append(PlannedRow("linear probe (frozen, head only)", "probe", "probe", over))
    if "prefix" in cfg.rows:
        rows += [
            PlannedRow(f"prefix P={p} (frozen)", f"P={p}", f"prefix_P{p}", dict(kind="prefix", num_virtual_tokens=p))
            for p in ok
        ]
        if mlm:
            rows += [
                _mlm_row(cfg, p, f"prefix P={p}, {MLM_INIT} (frozen)", f"P={p} MLM", f"prefix_P{p}_mlm") for p in ok
            ]
        if cfg.init_from:
            over = dict(kind="prefix", init_from=cfg.init_from, num_virtual_tokens=None, prefix_projection=False)
            rows.append(PlannedRow("prefix, pre-trained init (frozen)", "init-from", "prefix_init", over))
    if "prompt" in cfg.rows and ok:
        over = dict(kind="prompt", num_virtual_tokens=ok[0])
        rows.append(PlannedRow(f"prompt Q={ok[0]} (frozen)", f"prompt Q={ok[0]}", f"prompt_Q{ok[0]}", over))
    if "lora" in cfg.rows:
        targets = ",".join(cfg.lora_targets)
        rows.append(PlannedRow(f"LoRA r={cfg.lora_r} {targets} (frozen)", "LoRA", "lora", dict(kind="lora")))
    if "ia3" in cfg.rows:
        rows.append(PlannedRow("IA3 (frozen)", "IA3", "ia3", dict(kind="ia3")))
    if "bottleneck" in cfg.rows:
        name = f"bottleneck {cfg.bottleneck} rf={cfg.reduction_factor:g} (frozen)"
        rows.append(PlannedRow(name, "bottleneck", "bottleneck", dict(kind="bottleneck")))
    if "ft" in cfg.rows:
        rows.append(PlannedRow("full fine-tuning", "FT", "ft", dict(kind=None, train_backbone=True)))
    if "prefix_ft" in cfg.rows:
        p = cfg.ft_prefix_length or (ok[0] if ok else None)
        if p:
            over = dict(
                kind="prefix",
                num_virtual_tokens=None if cfg.init_from else p,
                train_backbone=True,
                init_from=cfg.init_from,
                prefix_projection=cfg.prefix_projection and not cfg.init_from,
            )
            shown = p if not cfg.init_from else "init"
            rows.append(PlannedRow(f"prefix P={shown} + full fine-tuning", f"P={shown}+FT", "prefix_ft", over))
            if mlm and p <= max_virtual:
                name = f"prefix P={p}, {MLM_INIT} + full fine-tuning"
                rows.append(_mlm_row(cfg, p, name, f"P={p} MLM+FT", "prefix_ft_mlm", train_backbone=True))
    return rows, skipped


def _pretrain_all(cfg: ExperimentConfig, backbone: Backbone, lengths: list[int]) -> dict[int, dict[str, Any]]:
    """{P: pre-training summary}: one MLM prefix per length, saved where the rows' ``init_from`` points."""
    from .pretrain import pretrain

    done: dict[int, dict[str, Any]] = {}
    for p in lengths:
        out = pretrained_prefix_path(cfg.out, p)
        own = dict(epochs=cfg.pretrain_epochs, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, out=str(out))
        pcfg = PretrainConfig(
            **{**shared_options(cfg, PretrainConfig), **own}, corpus=str(cfg.pretrain_corpus), num_virtual_tokens=p
        )
        log = pretrain(pcfg, backbone=backbone)["log"]
        done[p] = {
            "num_virtual_tokens": p,
            "file": str(out),
            "steps": log["steps"],
            "lines": log["lines"],
            "loss_before": log["loss_before"],
            "loss_after": log["loss_after"],
            "pretrain_time_s": log["train_time_s"],
        }
    return done


def run_table1(cfg: ExperimentConfig) -> dict[str, Any]:
    from prefixserve.adapters.backbone import load_backbone

    from .train import train

    if cfg.pretrain_corpus and not Path(cfg.pretrain_corpus).is_file():
        raise BadRequestError(f"--pretrain-corpus {cfg.pretrain_corpus!r} does not exist", code="file_not_found")
    out = Path(cfg.out)
    backbone = load_backbone(cfg.backbone, device=cfg.device)
    backbone_params = sum(p.numel() for p in backbone.encoder.parameters())
    rows, skipped = plan(cfg, backbone.spec.max_virtual_tokens)
    # before any row: a backbone without an MLM head stops here (no_mlm_head), nothing trained or written
    pretrained = _pretrain_all(cfg, backbone, sorted({r.mlm_length for r in rows if r.mlm_length is not None}))
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for row in rows:
        started = time.time()
        res = train(_train_config(cfg, **row.overrides), backbone=backbone)
        adapter = None
        if cfg.save_adapters and res.packed is not None:
            adapter = out / "adapters" / f"{row.slug}.safetensors"
            adapter.parent.mkdir(exist_ok=True)
            adapter.write_bytes(res.packed)
        n = res.log["trainable_params_total"]
        results.append(
            {
                "row": row.name,
                "label": row.label,
                "kind": row.overrides.get("kind"),
                "num_virtual_tokens": res.log["num_virtual_tokens"],
                "train_backbone": bool(row.overrides.get("train_backbone")),
                "init_from": row.overrides.get("init_from"),
                "mlm_pretrained": row.mlm_length is not None,
                "servable": res.packed is not None,
                "adapter": None if adapter is None else str(adapter),
                "accuracy": res.best.get("eval_accuracy"),
                "macro_f1": res.best.get("eval_macro_f1"),
                "best_epoch": res.best["epoch"],
                "epochs_run": len(res.history),
                "train_rows": res.log["train_rows"],
                "eval_rows": res.log["eval_rows"],
                "trainable_params": n,
                "trainable_pct_of_backbone": 100.0 * n / backbone_params,
                "train_time_s": time.time() - started,
                "pretrain_time_s": None if row.mlm_length is None else pretrained[row.mlm_length]["pretrain_time_s"],
                "peak_memory_bytes": res.log["peak_memory_bytes"],
                "history": res.history,
            }
        )
        _write(out, cfg, backbone, backbone_params, results, skipped, list(pretrained.values()))
    return _write(out, cfg, backbone, backbone_params, results, skipped, list(pretrained.values()))


def _write(
    out: Path,
    cfg: ExperimentConfig,
    backbone: Backbone,
    backbone_params: int,
    results: list[dict[str, Any]],
    skipped: list[str],
    pretraining: list[dict[str, Any]],
) -> dict[str, Any]:
    import torch

    from .table1_plot import plot_table1

    report: dict[str, Any] = {
        "config": asdict(cfg),
        "backbone": {"name": cfg.backbone, "fingerprint": backbone.fingerprint, "params": backbone_params},
        "device": str(backbone.device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "rows": results,
        "pretraining": pretraining,
        "skipped": skipped,
    }
    try:
        report["plot"] = {"file": str(out / "table1.png"), "points": plot_table1(report, out / "table1.png")}
    except ImportError:  # matplotlib is an extra (bench/dev), the table is not
        report["plot"] = {"file": None, "points": [], "note": "table1.png not written: pip install matplotlib"}
    (out / "table1.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "table1.md").write_text(markdown(report))
    return report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    with_pretrain = any(r.get("pretrain_time_s") is not None for r in report["rows"])
    extra_head, extra_rule = (" pretrain time (s) |", "---:|") if with_pretrain else ("", "")
    lines = [
        "| row | accuracy | macro-F1 | trainable params | % of backbone | train time (s) |"
        + extra_head
        + " peak mem (MiB) | servable |",
        "|---|---:|---:|---:|---:|---:|" + extra_rule + "---:|:---:|",
    ]
    for r in report["rows"]:
        pre = ""
        if with_pretrain:
            pre = " - |" if r.get("pretrain_time_s") is None else f" {r['pretrain_time_s']:.1f} |"
        lines.append(
            f"| {r['row']} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | {r['trainable_params']:,} "
            f"| {r['trainable_pct_of_backbone']:.3f} | {r['train_time_s']:.1f} |{pre} "
            f"{r['peak_memory_bytes'] / 2**20:.0f} | {'yes' if r['servable'] else 'no'} |"
        )
    if report.get("pretraining"):
        lines += [
            "",
            "MLM pre-training of the prefixes (frozen backbone and MLM head; masked-token loss on a fixed sample):",
            "",
            "| P | steps | corpus lines | MLM loss before | after | pretrain time (s) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p['num_virtual_tokens']} | {p['steps']} | {p['lines']:,} | {p['loss_before']:.3f} "
            f"| {p['loss_after']:.3f} | {p['pretrain_time_s']:.1f} |"
            for p in report["pretraining"]
        ]
    notes = [f"Skipped: {s}" for s in report.get("skipped", [])]
    if not report["config"].get("pretrain_corpus"):
        notes.append(f"No '{MLM_INIT}' rows: no --pretrain-corpus given.")
    if report.get("plot", {}).get("note"):
        notes.append(report["plot"]["note"])
    if notes:
        lines += ["", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"

"""Trainer configs, composed from shared option parts so that every default is written exactly once.

Decisions:
* A part is a small dataclass whose fields each carry their default and ``metadata={"help": ...}`` (as PEFT's
  config dataclasses do). :class:`TrainConfig`, :class:`PretrainConfig` and :class:`ExperimentConfig` inherit
  the parts they need, so they stay flat: ``TrainConfig(backbone=..., train=..., epochs=3)``, ``cfg.epochs``
  and ``asdict(cfg)`` (the ``args`` of a training log) look as they did before the parts existed.
* Bases are listed last part first because a dataclass collects fields along the reversed MRO: ``backbone``
  comes first in ``asdict`` and in the CLI's help.
* All fields are keyword-only: parts with required fields (``backbone``, ``train``) can then be combined in
  any order, and a positional ``TrainConfig("bb", "file")`` - ambiguous once fields come from several
  parts - is refused.
* A config may redeclare a part's field where its meaning differs (``PretrainConfig.epochs`` is 1: MLM on a
  corpus, not a classification task); that is a second default for a second meaning, not a copy.
* ``trainer.cli`` builds its options from these fields (type, default, choices, help), so the command line
  never restates a default. Choices are ``Literal`` types, checked by mypy and offered by argparse.
* This module imports no torch: the CLI imports it to build ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from .data import LABEL_COLUMNS, TEXT_COLUMNS

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

VirtualKind = Literal["prefix", "prompt"]  # virtual tokens (prefixserve.adapters.kinds.VIRTUAL_KINDS)
WeightKind = Literal["lora", "ia3", "bottleneck"]  # the encoder's own computation (kinds.WEIGHT_KINDS)
AdapterKind = Literal[VirtualKind, WeightKind]
BottleneckPreset = Literal["pfeiffer", "houlsby"]
PrefixInit = Literal["random", "tokens"]
DataFormat = Literal["tsv", "csv", "jsonl"]

DEFAULT_NUM_VIRTUAL_TOKENS = 20  # train without --num-virtual-tokens or --init-from, and pretrain
# High for prefix/prompt tuning (P-Tuning v2 uses 5e-3..1e-2): few CPU steps; see train.py's docstring.
VIRTUAL_TOKEN_LR = 3e-2
# Weight kinds: the top of each method's usual range, as CPU budgets allow few steps. LoRA 1e-3 (the LoRA
# paper's RoBERTa-base GLUE runs use 4e-4..5e-4 over many more steps), IA3 1e-2 (its vectors start at 1 and
# move slowly; T-Few uses 3e-3), bottleneck 1e-3 (AdapterHub's 1e-4..1e-3; the adapter starts near 0).
# Checked, not swept: bench/accuracy.py --quick (Rotten Tomatoes, MiniLM), where each beats the prefix row.
KIND_LR: dict[str, float] = {
    "prefix": VIRTUAL_TOKEN_LR,
    "prompt": VIRTUAL_TOKEN_LR,
    "lora": 1e-3,
    "ia3": 1e-2,
    "bottleneck": 1e-3,
}
TABLE1_ROWS = ("probe", "prefix", "ft", "prefix_ft")  # the paper's Table 1: experiment's default rows
EXTRA_ROWS = ("prompt", "lora", "ia3", "bottleneck")  # one row per other servable kind (--rows)


# ---- parts --------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class RunOptions:
    """Which frozen backbone, where, how seeded, how chatty."""

    backbone: str = field(metadata={"help": "hub id or local folder (BERT/RoBERTa/XLM-R)"})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available) | cpu | cuda:N"})
    seed: int = field(default=42, metadata={"help": "random seed: init, shuffling, masking, subsampling, eval split"})
    progress: bool = field(default=True, metadata={"help": "tqdm bars (and per-epoch records) on stderr"})


@dataclass(kw_only=True)
class DataOptions:
    """Labelled text: which files, how to read them, how much of them (see :mod:`.data`)."""

    train: str = field(metadata={"help": "training file (.tsv NSMC, .csv, .jsonl)"})
    eval: str | None = field(default=None, metadata={"help": "eval file (same format)"})
    eval_split: float = field(default=0.1, metadata={"help": "held-out fraction of --train if no --eval"})
    format: DataFormat | None = field(default=None, metadata={"help": "unset: from the extension"})
    text_column: str | None = field(default=None, metadata={"help": "unset: " + " | ".join(TEXT_COLUMNS)})
    label_column: str | None = field(default=None, metadata={"help": "unset: " + " | ".join(LABEL_COLUMNS)})
    text_pair_column: str | None = field(default=None, metadata={"help": "optional second text"})
    label_names: list[str] | None = field(
        default=None,
        metadata={"help": "comma list fixing label set/order; integer raw labels index it; unset: sorted raw values"},
    )
    max_train: int | None = field(default=None, metadata={"help": "seeded subsample of the training rows"})
    max_eval: int | None = field(default=None, metadata={"help": "seeded subsample of the eval rows"})


@dataclass(kw_only=True)
class PrefixOptions:
    """The P-Tuning v2 reparameterisation of a prefix (PEFT's ``prefix_projection``)."""

    prefix_projection: bool = field(default=False, metadata={"help": "train through an MLP; exported materialised"})
    encoder_hidden_size: int = field(default=512, metadata={"help": "projection MLP width"})


@dataclass(kw_only=True)
class ScheduleOptions:
    """How many steps of what size: shared by task training and MLM pre-training."""

    epochs: int = field(default=10, metadata={"help": "passes over the training rows"})
    batch_size: int = field(default=32, metadata={"help": "rows per optimizer step"})
    max_length: int | None = field(default=128, metadata={"help": "real tokens per row, specials included"})
    warmup: float = field(default=0.1, metadata={"help": "< 1: fraction of steps; else steps"})


@dataclass(kw_only=True)
class TuningOptions:
    """Optimisation of a classification task (``train`` and every row of ``experiment table1``)."""

    lr: float | None = field(
        default=None,
        metadata={
            "help": "adapter LR (virtual tokens or weight adapter; no weight decay); unset: by kind, "
            + ", ".join(f"{k} {v:g}" for k, v in KIND_LR.items())
        },
    )
    head_lr: float = field(default=1e-2, metadata={"help": "classification-head LR"})
    backbone_lr: float = field(default=3e-5, metadata={"help": "full fine-tuning only"})
    weight_decay: float = field(default=0.01, metadata={"help": "head/backbone matrices only"})
    patience: int = field(default=3, metadata={"help": "epochs without eval improvement before stopping; 0=off"})
    prefix_init: PrefixInit = field(
        default="tokens",
        metadata={"help": "prefix start: PEFT's N(0,1), or the K/V of random real tokens (Li & Liang)"},
    )


@dataclass(kw_only=True)
class WeightOptions:
    """The weight kinds' settings (``--kind lora|ia3|bottleneck``); each maps onto its package's config."""

    lora_r: int = field(default=8, metadata={"help": "LoRA: rank r of every update B @ A"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA: the update is scaled by alpha / r"})
    lora_targets: list[str] = field(
        default_factory=lambda: ["query", "value"],
        metadata={
            "help": "LoRA: comma list of modules (query,key,value,attention.output.dense,intermediate.dense,"
            "output.dense; 'output.dense' also matches attention's, as in PEFT)"
        },
    )
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA: dropout on the update's input, training only"})
    rslora: bool = field(default=False, metadata={"help": "LoRA: rank-stabilised scale alpha / sqrt(r)"})
    ia3_targets: list[str] | None = field(
        default=None, metadata={"help": "IA3: comma list of scaled modules; unset: PEFT's key,value,output.dense"}
    )
    ia3_feedforward: list[str] | None = field(
        default=None,
        metadata={
            "help": "IA3: targets whose input (not output) is scaled, a subset of the targets; "
            "unset: PEFT's output.dense (with PEFT's targets), else none"
        },
    )
    bottleneck: BottleneckPreset = field(
        default="pfeiffer",
        metadata={"help": "bottleneck: pfeiffer (after the FFN, relu) or houlsby (after attention and FFN, swish)"},
    )
    reduction_factor: float = field(
        default=16, metadata={"help": "bottleneck: adapter width = hidden // reduction factor"}
    )


OPTION_PARTS: tuple[type[DataclassInstance], ...] = (
    RunOptions,
    DataOptions,
    PrefixOptions,
    WeightOptions,
    ScheduleOptions,
    TuningOptions,
)


# ---- configs ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class TrainConfig(TuningOptions, ScheduleOptions, WeightOptions, PrefixOptions, DataOptions, RunOptions):
    """``prefixserve train``: one tenant's adapter + head (see :mod:`.train`)."""

    kind: AdapterKind | None = field(  # None (code only): head only, the linear-probe / fine-tuning rows
        default="prefix",
        metadata={
            "help": "prefix (per-layer K/V, P-Tuning v2), prompt (soft prompt), lora (low-rank updates), "
            "ia3 (learned scaling vectors) or bottleneck (AdapterHub's Pfeiffer/Houlsby adapters)"
        },
    )
    num_virtual_tokens: int | None = field(
        default=None, metadata={"help": f"unset: {DEFAULT_NUM_VIRTUAL_TOKENS}, or --init-from's length"}
    )
    head_dropout: float = field(default=0.1, metadata={"help": "dropout on the head input only"})
    train_backbone: bool = field(
        default=False, metadata={"help": "fine-tune a copy of the backbone too (not servable; Table 1 rows)"}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip; 0=off"})
    init_from: str | None = field(
        default=None, metadata={"help": "pre-trained prefix (prefixserve pretrain) or packed prefix"}
    )
    out: str | None = field(  # None (code only): nothing written, the result is returned
        default=None, metadata={"help": "packed adapter .safetensors (log: <out>.log.json)"}
    )


@dataclass(kw_only=True)
class PretrainConfig(ScheduleOptions, PrefixOptions, RunOptions):
    """``prefixserve pretrain``: a task-agnostic prefix by masked-LM (see :mod:`.pretrain`)."""

    corpus: str = field(metadata={"help": "UTF-8 text file, one passage per line"})
    num_virtual_tokens: int = field(default=DEFAULT_NUM_VIRTUAL_TOKENS, metadata={"help": "prefix length P"})
    mlm_prob: float = field(default=0.15, metadata={"help": "share of non-special tokens masked (BERT's recipe)"})
    epochs: int = field(default=1, metadata={"help": "passes over the corpus"})
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    lr: float = field(default=5e-3, metadata={"help": "prefix LR"})
    out: str | None = field(default=None, metadata={"help": "pre-trained prefix .safetensors"})  # None: returned only


@dataclass(kw_only=True)
class ExperimentConfig(TuningOptions, ScheduleOptions, WeightOptions, PrefixOptions, DataOptions, RunOptions):
    """``prefixserve experiment table1``: one TrainConfig per row (see :mod:`.experiment`)."""

    out: str = field(default="table1", metadata={"help": "output folder"})
    lengths: list[int] = field(
        default_factory=lambda: [10, 50, 100, 200], metadata={"help": "prefix lengths, comma-separated"}
    )
    init_from: str | None = field(default=None, metadata={"help": "pre-trained prefix for an extra row"})
    probe_head_lr: float | None = field(default=None, metadata={"help": "head LR of the probe row; unset: --head-lr"})
    ft_prefix_length: int | None = field(
        default=None, metadata={"help": "P of the prefix+fine-tuning row; unset: the first of --lengths"}
    )
    rows: list[str] = field(
        default_factory=lambda: list(TABLE1_ROWS),
        metadata={"help": "rows, comma-separated: " + ",".join(TABLE1_ROWS + EXTRA_ROWS)},
    )
    # MLM pre-trained prefix rows (the paper's init); batch size, max length, warmup and projection are the rows'
    pretrain_corpus: str | None = field(
        default=None,
        metadata={
            "help": "raw text, one passage per line: first pre-train one MLM prefix per length "
            "(needs an MLM head), then add a 'MLM pre-trained init' row per length"
        },
    )
    pretrain_epochs: int = field(default=PretrainConfig.epochs, metadata={"help": "MLM passes over the corpus"})
    pretrain_steps: int | None = field(default=None, metadata={"help": "MLM optimizer steps (overrides epochs)"})
    pretrain_lr: float = field(default=PretrainConfig.lr, metadata={"help": "MLM prefix LR"})
    save_adapters: bool = field(
        default=False, metadata={"help": "also write each servable row's adapter to <out>/adapters/<row>.safetensors"}
    )


def parts_of(config_cls: type) -> list[type[DataclassInstance]]:
    """The option parts ``config_cls`` is composed of, in :data:`OPTION_PARTS` order."""
    return [part for part in OPTION_PARTS if issubclass(config_cls, part)]


def shared_options(source: Any, target_cls: type) -> dict[str, Any]:
    """``source``'s values for every field of the parts it shares with ``target_cls`` (by part, not by name:
    a field two configs declare separately, like ``out`` or ``init_from``, means different things)."""
    shared = [part for part in parts_of(type(source)) if issubclass(target_cls, part)]
    return {f.name: getattr(source, f.name) for part in shared for f in fields(part)}

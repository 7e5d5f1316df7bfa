"""Labelled text for training: NSMC TSV natively, plus CSV and JSONL.

Decisions:
* Format from the extension (``.tsv``/``.txt`` -> TSV, ``.csv`` -> CSV, ``.jsonl``/``.json`` -> JSONL) unless
  ``fmt`` is given. TSV is read without quoting (NSMC reviews contain bare ``"``).
* Columns: ``text_column`` defaults to the first of ``document`` (NSMC), ``text``, ``sentence`` present;
  ``label_column`` to the first of ``label``, ``category``.
* Labels are kept as **strings**: by default the sorted distinct raw values of the training file (numeric
  order when all are integers, so NSMC gives ``["0", "1"]``). ``label_names`` fixes the label set and order
  instead; a raw value that is not a name but an integer ``i`` maps to ``label_names[i]`` (so NSMC with
  ``--label-names negative,positive`` stores ``negative``/``positive``).
* Bad rows (unparsable line, missing/empty text, missing label, label outside a fixed set) are counted by
  reason and skipped, never fatal. A file with no good row at all is a :class:`BadRequestError`.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prefixserve.adapters.errors import BadRequestError

if TYPE_CHECKING:
    from .config import TrainConfig

TEXT_COLUMNS = ("document", "text", "sentence")
LABEL_COLUMNS = ("label", "category")


@dataclass
class Example:
    text: str
    label: str  # raw label value (string) until labels are resolved; then a label name
    pair: str | None = None


@dataclass
class Dataset:
    examples: list[Example]
    bad: Counter = field(default_factory=Counter)  # reason -> count
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def detect_format(path: str | Path, fmt: str | None = None) -> str:
    if fmt:
        if fmt not in ("tsv", "csv", "jsonl"):
            raise BadRequestError(f"--format must be tsv, csv or jsonl, got {fmt!r}", code="bad_format")
        return fmt
    suffix = Path(path).suffix.lower()
    return {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}.get(suffix, "tsv")


def _pick(columns, wanted: str | None, defaults: tuple[str, ...], what: str, path) -> str:
    if wanted:
        if wanted not in columns:
            raise BadRequestError(f"{path}: no {what} column {wanted!r} (columns: {list(columns)})", code="bad_column")
        return wanted
    for name in defaults:
        if name in columns:
            return name
    raise BadRequestError(
        f"{path}: no {what} column among {list(defaults)}; pass --{what}-column (columns: {list(columns)})",
        code="bad_column",
    )


def _records(path: Path, fmt: str, bad: Counter):
    """Yield dict rows (None for an unparsable line, counted by the caller)."""
    with open(path, encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            for line in f:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                yield obj if isinstance(obj, dict) else None
            return
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv" else csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        for cells in reader:
            if not cells or cells == [""]:
                continue
            yield dict(zip(header, cells)) if len(cells) == len(header) else None


def read_examples(
    path: str | Path,
    *,
    fmt: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    text_pair_column: str | None = None,
) -> Dataset:
    """Read one file into raw examples (labels still raw strings)."""
    path = Path(path)
    if not path.is_file():
        raise BadRequestError(f"data file {str(path)!r} does not exist", code="file_not_found")
    fmt = detect_format(path, fmt)
    bad: Counter = Counter()
    examples: list[Example] = []
    columns: tuple[str, str] | None = None
    for rec in _records(path, fmt, bad):
        if rec is None:
            bad["unparsable"] += 1
            continue
        if columns is None:  # resolved on the first good record (JSONL has no header)
            columns = (
                _pick(rec, text_column, TEXT_COLUMNS, "text", path),
                _pick(rec, label_column, LABEL_COLUMNS, "label", path),
            )
        text, label = rec.get(columns[0]), rec.get(columns[1])
        pair = rec.get(text_pair_column) if text_pair_column else None
        if not isinstance(text, str) or not text.strip():
            bad["missing_text"] += 1
            continue
        if label is None or (isinstance(label, str) and not label.strip()) or isinstance(label, (dict, list)):
            bad["missing_label"] += 1
            continue
        if isinstance(label, bool):
            label = int(label)
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        examples.append(Example(text, str(label).strip(), pair if isinstance(pair, str) else None))
    return Dataset(examples, bad, str(path))


def _sort_key(value: str):
    try:
        return (0, int(value), "")
    except ValueError:
        return (1, 0, value)


def infer_labels(train: Dataset, label_names: list[str] | None = None) -> list[str]:
    """The label list stored in the adapter (``id2label`` order)."""
    if label_names:
        if len(set(label_names)) != len(label_names) or not all(label_names):
            raise BadRequestError(
                f"--label-names must be distinct non-empty names, got {label_names}", code="bad_labels"
            )
        return list(label_names)
    labels = sorted({e.label for e in train.examples}, key=_sort_key)
    if len(labels) < 2:
        raise BadRequestError(f"{train.source}: need at least 2 distinct labels, found {labels}", code="bad_labels")
    return labels


def resolve_labels(ds: Dataset, labels: list[str], by_index: bool = False) -> Dataset:
    """Map raw labels onto ``labels`` by name (and, for explicit names, by integer index); unknown -> bad rows."""
    index = {name: name for name in labels}
    kept = []
    for e in ds.examples:
        name = index.get(e.label)
        if name is None and by_index and e.label.isdigit() and 0 <= int(e.label) < len(labels):
            name = labels[int(e.label)]
        if name is None:
            ds.bad["unknown_label"] += 1
            continue
        kept.append(Example(e.text, name, e.pair))
    return Dataset(kept, ds.bad, ds.source)


def subsample(ds: Dataset, n: int | None, seed: int) -> Dataset:
    """A seeded random subset of ``n`` examples (the same subset for the same seed and input)."""
    if not n or n >= len(ds):
        return ds
    idx = sorted(random.Random(seed).sample(range(len(ds)), n))
    return Dataset([ds.examples[i] for i in idx], ds.bad, ds.source)


def split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded random (train, eval) split; eval gets ``round(fraction * n)`` rows (at least 1)."""
    if not 0 < fraction < 1:
        raise BadRequestError(f"--eval-split must be in (0, 1), got {fraction}", code="bad_split")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(ds)))
    ev, tr = sorted(order[:n_eval]), sorted(order[n_eval:])
    return (
        Dataset([ds.examples[i] for i in tr], ds.bad, ds.source),
        Dataset([ds.examples[i] for i in ev], Counter(), ds.source + f" (split {fraction})"),
    )


def load_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None, list[str]]:
    """Train and eval sets with resolved labels, from a config's data options (and its seed)."""
    kw = dict(
        fmt=cfg.format,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        text_pair_column=cfg.text_pair_column,
    )
    train = read_examples(cfg.train, **kw)
    if not train.examples:
        raise BadRequestError(f"{cfg.train}: no usable rows (bad rows: {dict(train.bad)})", code="empty_dataset")
    ev = None
    if cfg.eval:
        ev = read_examples(cfg.eval, **kw)
    elif cfg.eval_split:
        train, ev = split(train, cfg.eval_split, cfg.seed)
    labels = infer_labels(train, cfg.label_names)
    by_index = bool(cfg.label_names)
    train = subsample(resolve_labels(train, labels, by_index), cfg.max_train, cfg.seed)
    if ev is not None:
        ev = subsample(resolve_labels(ev, labels, by_index), cfg.max_eval, cfg.seed + 1)
    if not train.examples:
        raise BadRequestError(
            f"{cfg.train}: no row has a known label (bad rows: {dict(train.bad)})", code="empty_dataset"
        )
    return train, ev, labels

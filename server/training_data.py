"""A stored dataset's bytes, read by the trainer's own readers (:mod:`prefixserve.trainer.data`), for both sides
of the training service: the Ingress checks an upload and a job's data before anything runs (bad data fails
fast, with bad rows counted by reason, as ``prefixserve train`` counts them), and the runner trains on the
very same file.

Decisions:
* The readers take a path, so the bytes are written to a private temporary folder as ``dataset.<format>``;
  error messages name the dataset (``dataset ds_...`` or its file name), never that temporary path.
* Bytes that are not UTF-8, or that the csv module refuses (a NUL byte, an over-long field), are a 400
  ``bad_dataset``, never a 500.
* No torch here: the Ingress imports this module.
"""

from __future__ import annotations

import contextlib
import csv
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefixserve.adapters.errors import BadRequestError, PrefixServeError
from prefixserve.trainer.data import Dataset, load_datasets, read_examples

from .training_schemas import TrainingOptions

MAX_LABELS_SHOWN = 256


@dataclass(frozen=True)
class DataCheck:
    """What a parse found: usable rows, skipped rows by reason, and the label values."""

    rows: int
    bad: dict[str, int]
    labels: list[str]
    eval_rows: int = 0
    eval_bad: dict[str, int] = field(default_factory=dict)


@contextlib.contextmanager
def dataset_file(data: bytes, fmt: str, shown: str) -> Iterator[Path]:
    """``data`` as a file the trainer can read; errors inside name ``shown`` instead of the file's path."""
    with tempfile.TemporaryDirectory(prefix="prefixserve-dataset-") as folder:
        path = Path(folder) / f"dataset.{fmt}"
        path.write_bytes(data)
        try:
            yield path
        except PrefixServeError as exc:
            exc.message = exc.message.replace(str(path), shown)
            exc.args = (exc.message,)
            raise
        except UnicodeDecodeError:
            raise BadRequestError(f"{shown} is not UTF-8 text", code="bad_dataset") from None
        except csv.Error as exc:
            raise BadRequestError(f"{shown} cannot be read as {fmt}: {exc}", code="bad_dataset") from None


def _counts(ds: Dataset) -> dict[str, int]:
    return {reason: int(n) for reason, n in sorted(ds.bad.items())}


def _no_rows(shown: str, bad: dict[str, int]) -> BadRequestError:
    counted = ", ".join(f"{reason} {n}" for reason, n in bad.items()) or "none"
    return BadRequestError(f"{shown} has no usable row (bad rows: {counted})", code="empty_dataset")


def check_upload(
    data: bytes,
    fmt: str,
    shown: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    text_pair_column: str | None = None,
) -> DataCheck:
    """Parse an uploaded dataset; 400 ``empty_dataset`` (with the bad-row counts) when no row is usable."""
    with dataset_file(data, fmt, shown) as path:
        ds = read_examples(
            path, fmt=fmt, text_column=text_column, label_column=label_column, text_pair_column=text_pair_column
        )
    bad = _counts(ds)
    if not ds.examples:
        raise _no_rows(shown, bad)
    labels = sorted({e.label for e in ds.examples})[:MAX_LABELS_SHOWN]
    return DataCheck(len(ds), bad, labels)


def check_job_data(data: bytes, fmt: str, shown: str, options: TrainingOptions, backbone: str) -> DataCheck:
    """Exactly the train and eval rows the job will use (same split, same labels), or the 400 it would fail with."""
    with dataset_file(data, fmt, shown) as path:
        cfg = options.train_config(backbone=backbone, train=str(path), fmt=fmt)
        train, ev, labels = load_datasets(cfg)  # the trainer's own errors (counts included), path replaced
    if ev is None or not ev.examples:
        raise BadRequestError(
            f"{shown}: no eval row has a known label (eval split {options.eval_split})", code="empty_dataset"
        )
    return DataCheck(len(train), _counts(train), labels, len(ev), _counts(ev))

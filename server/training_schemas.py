"""Pydantic models of the training service: its settings, the HTTP bodies, the options a job runs with, its result.

Decisions:
* :class:`TrainingOptions` is the one schema of a job's options. The store keeps it as the record's
  ``options`` (a JSON object); the Ingress validates the request with it and the runner rebuilds the
  :class:`~prefixserve.trainer.config.TrainConfig` from it (:meth:`TrainingOptions.train_config`). Its
  defaults are read from ``TrainConfig``'s own fields (:func:`_default`), so the service never restates one.
* Caps a shared server needs (``epochs`` <= 50, ``batch_size`` <= 256, ``max_length`` <= 512, ...) are static:
  they bound one job's cost whatever the deployment; what a deployment tunes (concurrent jobs, dataset
  bytes, job time) is :class:`~prefixserve.adapters.store.TrainingLimits` in :class:`TrainingSettings`.
* ``num_virtual_tokens`` is for prefix and prompt jobs, ``lora_r`` for LoRA jobs; naming one for another
  kind is refused (422), never silently ignored.
* Every job needs an eval split (``eval_split`` in (0, 0.5]): publication compares the new adapter with the
  served version on those rows (see :mod:`.training_runner`).
* A job's outcome (:class:`JobResult`) says whether its adapter was published and why, as one of
  :data:`DECISIONS`: ``first_version`` (nothing served yet), ``better`` (higher eval accuracy, or equal
  accuracy and higher macro-F1), ``forced`` (``force``), or not published: ``not_better`` (a tie keeps the
  served version: no churn), ``labels_differ`` (other label set: not comparable), ``baseline_unusable``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefixserve.adapters.store import EpochRecord, JobError, TrainingLimits
from prefixserve.trainer.config import AdapterKind, DataFormat, TrainConfig

if TYPE_CHECKING:
    from prefixserve.adapters.store import DatasetInfo, JobRecord

MiB = 2**20
MAX_EPOCHS = 50
MAX_LABELS = 256
AUTO_GPU_FRACTION = 0.25  # a job's GPU share when the cluster has GPUs and num_gpus is unset
Kind = AdapterKind  # the trainer's: one list of kinds and formats
DatasetFormat = DataFormat
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
Decision = Literal["first_version", "better", "forced", "not_better", "labels_differ", "baseline_unusable"]
DECISIONS: dict[str, bool] = {  # decision -> published
    "first_version": True,
    "better": True,
    "forced": True,
    "not_better": False,
    "labels_differ": False,
    "baseline_unusable": False,
}


def _default(name: str) -> Any:
    """``TrainConfig``'s default for ``name`` (written once, in the trainer's config)."""
    field = TrainConfig.__dataclass_fields__[name]
    assert field.default is not dataclasses.MISSING, name
    return field.default


class TrainingSettings(BaseModel):
    """``AppSettings.training``: the training service (``PREFIXSERVE_TRAINING`` as JSON)."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="serve /v1/datasets and /v1/training-jobs (off: 404 training_disabled)")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each job's runner actor reserves on the Ray cluster")
    num_gpus: float | None = Field(
        None,
        ge=0,
        description=f"GPUs per job's runner; unset: {AUTO_GPU_FRACTION} when the cluster has GPUs, else 0 (CPU)",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per runner; unset: its num_cpus")
    limits: TrainingLimits = Field(
        TrainingLimits(), description="per tenant: active jobs, stored dataset bytes and count, seconds per job"
    )
    max_upload_bytes: int = Field(
        32 * MiB, gt=0, description="body cap of POST /v1/datasets and POST /v1/training-jobs (inline data)"
    )


# ---- a job's options --------------------------------------------------------------------------------
class TrainingOptions(BaseModel):
    """What a job trains; defaults are ``prefixserve train``'s."""

    model_config = ConfigDict(extra="forbid")
    kind: Kind = Field(_default("kind"), description="prefix | prompt | lora | ia3 | bottleneck")
    num_virtual_tokens: int | None = Field(None, ge=1, le=200, description="prefix / prompt length; unset: 20")
    lora_r: int | None = Field(None, ge=1, le=64, description=f"LoRA rank; unset: {_default('lora_r')}")
    epochs: int = Field(_default("epochs"), ge=1, le=MAX_EPOCHS)
    lr: float | None = Field(None, gt=0, le=1, description="adapter learning rate; unset: by kind")
    head_lr: float = Field(_default("head_lr"), gt=0, le=1)
    batch_size: int = Field(_default("batch_size"), ge=1, le=256)
    max_length: int = Field(_default("max_length"), ge=8, le=512, description="tokens per row, specials included")
    eval_split: float = Field(
        _default("eval_split"), gt=0, le=0.5, description="held-out share: per-epoch eval and the publish decision"
    )
    seed: int = Field(_default("seed"), ge=0, le=2**31 - 1)
    patience: int = Field(_default("patience"), ge=0, le=MAX_EPOCHS, description="early stop; 0 = off")
    label_names: list[str] | None = Field(
        None, min_length=2, max_length=MAX_LABELS, description="fix label set and order; integer labels index it"
    )
    text_column: str | None = Field(None, max_length=128, description="CSV/JSONL; unset: document | text | sentence")
    label_column: str | None = Field(None, max_length=128, description="CSV/JSONL; unset: label | category")
    text_pair_column: str | None = Field(None, max_length=128, description="optional second text")
    force: bool = Field(False, description="publish even if the adapter does not beat the served version")

    @model_validator(mode="after")
    def _kind_options(self) -> TrainingOptions:
        if self.num_virtual_tokens is not None and self.kind not in ("prefix", "prompt"):
            raise ValueError(f"num_virtual_tokens is for prefix and prompt jobs, not {self.kind}")
        if self.lora_r is not None and self.kind != "lora":
            raise ValueError(f"lora_r is for lora jobs, not {self.kind}")
        return self

    def train_config(self, *, backbone: str, train: str, fmt: str, device: str = "cpu") -> TrainConfig:
        """The trainer's config for this job: data from ``train`` (a file in format ``fmt``), no output file."""
        optional: dict[str, Any] = {"num_virtual_tokens": self.num_virtual_tokens, "lora_r": self.lora_r, "lr": self.lr}
        return TrainConfig(
            backbone=backbone,
            device=device,
            train=train,
            format=cast(DataFormat, fmt),  # checked when the dataset was stored
            eval_split=self.eval_split,
            text_column=self.text_column,
            label_column=self.label_column,
            text_pair_column=self.text_pair_column,
            label_names=list(self.label_names) if self.label_names else None,
            kind=self.kind,
            epochs=self.epochs,
            head_lr=self.head_lr,
            batch_size=self.batch_size,
            max_length=self.max_length,
            seed=self.seed,
            patience=self.patience,
            progress=False,
            **{k: v for k, v in optional.items() if v is not None},
        )


class InlineDataset(BaseModel):
    """A dataset sent inside the job request (stored like an uploaded one; its id is in the record)."""

    model_config = ConfigDict(extra="forbid")
    format: DatasetFormat
    content: str = Field(..., min_length=1, description="the file's text (UTF-8)")
    name: str = Field("", max_length=200)


class JobCreate(TrainingOptions):
    """``POST /v1/training-jobs``: options, the adapter id to publish to, and a dataset (an id or inline)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prefix_id": "sentiment", "dataset_id": "ds_0123456789abcdef01234567", "kind": "prefix", "epochs": 5},
                {
                    "prefix_id": "sentiment",
                    "kind": "lora",
                    "lora_r": 8,
                    "dataset": {"format": "csv", "content": "text,label\ngreat movie,pos\nboring plot,neg\n"},
                },
            ]
        },
    )
    prefix_id: str = Field(..., description="publish to this adapter id (a new version)")
    dataset_id: str | None = Field(None, description="a dataset from POST /v1/datasets")
    dataset: InlineDataset | None = Field(None, description="or the data itself")

    @model_validator(mode="after")
    def _one_dataset(self) -> JobCreate:
        if (self.dataset_id is None) == (self.dataset is None):
            raise ValueError("give exactly one of dataset_id and dataset")
        return self

    def options(self) -> TrainingOptions:
        return TrainingOptions.model_validate(self.model_dump(include=set(TrainingOptions.model_fields)))


# ---- replies ----------------------------------------------------------------------------------------
class EvalScores(BaseModel):
    """Accuracy and macro-F1 on the job's eval rows, from the serving engine (as the adapter would serve)."""

    accuracy: float
    macro_f1: float
    rows: int


class BaselineScores(EvalScores):
    version: int
    kind: str


class JobResult(BaseModel):
    """A finished job's outcome (the record's ``result``)."""

    published: bool
    version: int | None = Field(None, description="the published version")
    decision: Decision
    reason: str
    new: EvalScores
    baseline: BaselineScores | None = Field(None, description="the version served when the job finished")
    labels: list[str]
    best_epoch: int
    train_rows: int
    eval_rows: int
    bad_rows: dict[str, dict[str, int]] = Field(..., description='{"train": {reason: count}, "eval": {...}}')
    trainable_params: int
    train_time_s: float


class JobOut(BaseModel):
    """A training job as the API shows it (no tenant: the caller is the tenant)."""

    job_id: str
    state: JobState
    prefix_id: str
    dataset_id: str
    options: TrainingOptions
    created: float
    updated: float
    started: float | None = None
    finished: float | None = None
    epoch: int = Field(0, description="epochs done")
    epochs: int = Field(0, description="epochs planned (early stopping may end sooner)")
    history: list[EpochRecord] = []  # the store's records serve as the schema: one definition
    cancel_requested: bool = False
    error: JobError | None = None
    result: JobResult | None = None

    @classmethod
    def of(cls, record: JobRecord) -> JobOut:
        return cls(
            job_id=record.job_id,
            state=record.state,  # type: ignore[arg-type]  # one of JOB_STATES
            prefix_id=record.prefix_id,
            dataset_id=record.dataset_id,
            options=TrainingOptions.model_validate(record.options),
            created=record.created,
            updated=record.updated,
            started=record.started,
            finished=record.finished,
            epoch=record.epoch,
            epochs=record.epochs,
            history=list(record.history),
            cancel_requested=record.cancel_requested,
            error=record.error,
            result=JobResult.model_validate(record.result) if record.result else None,
        )


class JobList(BaseModel):
    jobs: list[JobOut]


class DatasetOut(BaseModel):
    dataset_id: str
    format: DatasetFormat
    name: str
    bytes: int
    sha256: str
    created: float

    @classmethod
    def of(cls, info: DatasetInfo) -> DatasetOut:
        return cls(
            dataset_id=info.dataset_id,
            format=info.format,  # type: ignore[arg-type]  # one of DATASET_FORMATS
            name=info.name,
            bytes=info.size,
            sha256=info.sha256,
            created=info.created,
        )


class DatasetUploaded(DatasetOut):
    """``POST /v1/datasets``: the stored dataset and what its parse found."""

    rows: int = Field(..., description="usable rows")
    bad_rows: dict[str, int] = Field(..., description="skipped rows by reason")
    labels: list[str] = Field(..., description="distinct raw label values (first 256)")


class DatasetList(BaseModel):
    datasets: list[DatasetOut]

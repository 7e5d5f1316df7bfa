"""Pydantic models: the application's settings (``build_app`` args) and the HTTP request/response bodies.

Decisions:
* Static shape checks live here (types, non-empty lists); limits that a deployment tunes
  (``max_inputs``, ``max_text_chars``) are checked by the ingress against :class:`AppSettings`, so the
  same schema serves every deployment and the error names the configured limit.
* ``AppSettings`` is the one place serving defaults are written down: ``prefixserve serve`` takes its
  flag defaults and help from it, and the quickstart, Serve config files (``args:``), the Worker's
  deployment decorator and tests all go through it. :data:`DEFAULTS` is an instance holding every default.
* Names: ``backbone`` is what to load (hub id or folder); ``worker_*`` size the Serve deployment that
  runs it (the older spellings ``backbone_num_cpus`` / ``backbone_num_gpus`` are still accepted).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from prefixserve.adapters.cache import DEFAULT_BUDGET_BYTES
from prefixserve.adapters.ratelimit import RateLimits
from prefixserve.adapters.store import TrainingLimits, VersionHistory, VersionInfo

from .training_schemas import TrainingSettings

MiB = 2**20
ENV_PREFIX = "PREFIXSERVE_"
# older setting names, still accepted in args (a rename, not validation_alias: pydantic-settings would read
# an alias as an unprefixed env var, e.g. NUM_REPLICAS)
LEGACY_NAMES = {
    "num_replicas": "replicas",
    "autoscaling_config": "autoscaling",
    "backbone_num_cpus": "worker_num_cpus",
    "backbone_num_gpus": "worker_num_gpus",
}
_READ_ENV: ContextVar[bool] = ContextVar("prefixserve_read_env", default=True)


class Autoscaling(BaseModel):
    """Ray Serve ``autoscaling_config`` for the Worker deployment (other Ray keys pass through)."""

    model_config = ConfigDict(extra="allow")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float | None = Field(
        None, gt=0, description="default: max_batch_size (one full batch in flight per replica)"
    )
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("autoscaling max_replicas must be >= min_replicas")
        return self


class BatchingConfig(BaseModel):
    """The Worker's live-tunable batching: its Serve ``user_config`` (changed without a restart)."""

    model_config = ConfigDict(extra="ignore")
    max_batch_size: int = Field(32, ge=1, le=4096, description="rows per backbone forward")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="how long a batch waits to fill (s)")
    max_batch_tokens: int = Field(
        8192, ge=1, description="estimated tokens per backbone forward (bounds how long a newcomer waits)"
    )
    target_batch_ms: float = Field(
        50.0, ge=0, le=10_000, description="aim for forwards of about this long (ms; 0: off): a newcomer's wait"
    )
    fair_batching: bool = Field(
        True, description="share batches among tenants (deficit round-robin); False: arrival order (for ablations)"
    )


class AppSettings(BatchingConfig, BaseSettings):
    """Everything ``prefixserve.server.app:build_app`` accepts (Serve config ``args:``).

    Values: given > env ``PREFIXSERVE_<NAME>`` (nested ones as JSON) > default. The env is read where an
    instance is BUILT (the CLI, or the process that runs ``build_app``), never in the replicas: they get the
    built object. :meth:`without_env` builds one from given values and defaults only (:data:`DEFAULTS`).
    """

    model_config = SettingsConfigDict(extra="forbid", env_prefix=ENV_PREFIX)
    backbone: str = Field("klue/roberta-base", description="hub id or local folder of the encoder")
    backbone_fingerprint: str | None = Field(
        None,
        pattern=r"^sha256:[0-9a-f]{64}$",
        description="the fingerprint the loaded backbone must have; a Worker that loads another refuses to start",
    )
    store: str = Field(
        "file://./.prefixserve/store",
        validate_default=True,
        description="file:///path | redis://host:6379/0 | memory://",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto: bf16 on sm80+ GPUs and CPUs with AVX512-BF16/AMX, else float32 (logits are float32)",
    )
    cache_bytes: int = Field(DEFAULT_BUDGET_BYTES, gt=0, description="device adapter cache budget per Worker replica")
    replicas: int = Field(1, ge=1, description="fixed Worker replicas")
    autoscaling: Autoscaling | None = Field(None, description="autoscale Worker replicas (JSON in the env)")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per Worker replica; default 2 x max_batch_size")
    worker_num_cpus: float = Field(1.0, ge=0, description="num_cpus per Worker replica")
    worker_num_gpus: float = Field(0.0, ge=0, description="num_gpus per Worker replica")
    ingress_replicas: int = Field(1, ge=1)
    ingress_num_cpus: float = Field(0.5, ge=0)
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="Serve's default (5) would queue clients")
    max_inputs: int = Field(64, ge=1, description="inputs per classify request")
    max_text_chars: int = Field(20_000, ge=1)
    max_upload_bytes: int = Field(65 * MiB, gt=0, description="PUT body cap (packed adapter or multipart)")
    max_request_bytes: int = Field(2 * MiB, gt=0, description="body cap of every other request")
    max_uploads_per_tenant: int = Field(2, ge=1, description="a tenant's uploads in flight per Ingress replica")
    max_uploads: int = Field(8, ge=1, description="uploads in flight per Ingress replica, all tenants")
    default_limits: RateLimits = Field(
        RateLimits(requests_per_s=100.0, rows_per_s=2000.0, burst_s=2.0, max_concurrent=8),
        description="per-tenant rate limits unless the tenant has its own (admin API / `prefixserve tenant limits`)",
    )
    torch_threads: int | None = Field(None, ge=1, description="torch threads per Worker replica")
    admin_key_file: str | None = Field(
        None, description="admin key file (created 0600 if absent); ignored when PREFIXSERVE_ADMIN_KEY is set"
    )
    training: TrainingSettings = Field(
        TrainingSettings(), description="training jobs on the cluster: on/off, runner resources, per-tenant limits"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Given values, then the process env; no .env file or secrets dir (one place to look)."""
        return (init_settings, env_settings) if _READ_ENV.get() else (init_settings,)

    @classmethod
    def without_env(cls, **values: Any) -> AppSettings:
        """Given values and defaults only, whatever ``PREFIXSERVE_*`` the process has."""
        token = _READ_ENV.set(False)
        try:
            return cls(**values)
        finally:
            _READ_ENV.reset(token)

    @model_validator(mode="before")
    @classmethod
    def _legacy_names(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in LEGACY_NAMES):
            data = {LEGACY_NAMES.get(k, k): v for k, v in data.items()}
        return data

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError("store must be a URL: file:///path or redis://host:port/db")
        if v.startswith("file://") and not v.startswith("file:///"):  # file://./rel -> absolute, here:
            import os  # Ray workers need not share the launcher's working directory

            v = "file://" + os.path.abspath(v[len("file://") :])
        return v

    @model_validator(mode="after")
    def _batching(self) -> AppSettings:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size (else batches never fill)")
        return self

    @property
    def worker_max_ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    def user_config(self) -> dict[str, Any]:
        """Live-tunable Worker settings (``reconfigure``; no replica restart)."""
        return BatchingConfig.model_validate(self.model_dump()).model_dump()


# ---- HTTP bodies ---------------------------------------------------------------------------------
class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"tenant": "acme"}]})
    tenant: str = Field(..., examples=["acme"])


class TenantCreated(BaseModel):
    tenant: str
    api_key: str = Field(..., description="shown once; store it now")


class ClassifyRequest(BaseModel):
    # the docs' request examples (Swagger UI pre-fills the first); tests validate each against this model
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prefix_id": "sentiment", "inputs": ["this movie was great", "the plot was boring"]},
                {"prefix_id": "nli", "inputs": ["A man plays a guitar."], "text_pairs": ["Someone makes music."]},
            ]
        },
    )
    prefix_id: str = Field(..., examples=["sentiment"])
    inputs: list[str] = Field(..., min_length=1, examples=[["this movie was great"]])
    text_pairs: list[str | None] | None = Field(None, description="second segment per input (same length)")
    version: int | None = Field(
        None, ge=1, description="answer with exactly this kept version (404 if missing); default: the served one"
    )

    @model_validator(mode="after")
    def _pairs(self) -> ClassifyRequest:
        if self.text_pairs is not None and len(self.text_pairs) != len(self.inputs):
            raise ValueError(f"text_pairs has {len(self.text_pairs)} items but inputs has {len(self.inputs)}")
        return self


class PredictionOut(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    prefix_id: str
    version: int
    predictions: list[PredictionOut]
    truncated: list[bool]


class LimitsIn(BaseModel):
    """A tenant's rate limits (0 = unlimited), or ``{"default": true}`` for the server's default."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"requests_per_s": 10.0, "rows_per_s": 200.0, "burst_s": 2.0, "max_concurrent": 4},
                {"default": True},
            ]
        },
    )
    default: bool = False
    requests_per_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    rows_per_s: float = Field(0.0, ge=0, allow_inf_nan=False)
    burst_s: float = Field(2.0, ge=0, allow_inf_nan=False)
    max_concurrent: int = Field(0, ge=0)

    def to_limits(self) -> RateLimits | None:
        if self.default:
            return None
        return RateLimits(self.requests_per_s, self.rows_per_s, self.burst_s, self.max_concurrent)


class LimitsOut(BaseModel):
    default: bool
    requests_per_s: float
    rows_per_s: float
    burst_s: float
    max_concurrent: int

    @classmethod
    def of(cls, own: RateLimits | None, default: RateLimits) -> LimitsOut:
        return cls(default=own is None, **(own or default).to_dict())


_TRAINING = TrainingLimits()  # the field defaults of TrainingLimitsIn


class TrainingLimitsIn(BaseModel):
    """A tenant's training limits (0 = unlimited), or ``{"default": true}`` for the server's
    ``training.limits``. Fields left out take :class:`TrainingLimits`' defaults (not the tenant's current
    values: a PUT replaces the whole set, as for rate limits)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"max_active_jobs": 2, "max_dataset_bytes": 128 * MiB, "max_job_s": 7200.0, "max_datasets": 50},
                {"default": True},
            ]
        },
    )
    default: bool = False
    max_active_jobs: int = Field(_TRAINING.max_active_jobs, ge=0, description="queued + running jobs")
    max_dataset_bytes: int = Field(_TRAINING.max_dataset_bytes, ge=0, description="total bytes of stored datasets")
    max_job_s: float = Field(_TRAINING.max_job_s, ge=0, allow_inf_nan=False, description="wall time of one job")
    max_datasets: int = Field(_TRAINING.max_datasets, ge=0, description="stored datasets")

    def to_limits(self) -> TrainingLimits | None:
        if self.default:
            return None
        return TrainingLimits(self.max_active_jobs, self.max_dataset_bytes, self.max_job_s, self.max_datasets)


class TrainingLimitsOut(BaseModel):
    default: bool
    max_active_jobs: int
    max_dataset_bytes: int
    max_job_s: float
    max_datasets: int

    @classmethod
    def of(cls, own: TrainingLimits | None, default: TrainingLimits) -> TrainingLimitsOut:
        return cls(default=own is None, **(own or default).to_dict())


class PrefixMeta(BaseModel):
    prefix_id: str
    version: int
    sha256: str
    kind: str
    num_virtual_tokens: int
    labels: list[str]
    bytes: int
    created: float = 0.0


class PrefixList(BaseModel):
    prefixes: list[PrefixMeta]


class VersionList(BaseModel):
    """An adapter's kept versions, newest first; the served one is ``pinned`` if set, else ``current``."""

    prefix_id: str
    current: int = Field(..., description="the newest version")
    pinned: int | None = Field(None, description="the version rolled back to (served instead of current)")
    versions: list[PrefixMeta]


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(..., ge=1, description="a kept version: served until unpinned or the next upload")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def prefix_meta(info: VersionInfo) -> PrefixMeta:
    """A store ``VersionInfo`` as the API shows it (no tenant: the caller is the tenant)."""
    meta = info.meta or {}
    return PrefixMeta(
        prefix_id=info.prefix_id,
        version=info.version,
        sha256=info.sha256,
        kind=meta.get("kind", ""),
        num_virtual_tokens=int(meta.get("num_virtual_tokens", 0)),
        labels=list(meta.get("labels", [])),
        bytes=info.size,
        created=info.created,
    )


def version_list(history: VersionHistory) -> VersionList:
    """A store ``VersionHistory`` as ``GET /v1/prefixes/{id}/versions`` shows it (newest first)."""
    return VersionList(
        prefix_id=history.current.prefix_id,
        current=history.current.version,
        pinned=history.pinned.version if history.pinned else None,
        versions=[prefix_meta(i) for i in reversed(history.versions)],
    )


DEFAULTS = AppSettings.without_env()  # the defaults as written, whatever the env says

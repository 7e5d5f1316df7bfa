"""Typed results of :mod:`prefixserve.client`: frozen dataclasses mirroring the server's JSON bodies.

Decisions:
* Plain dataclasses, not the server's pydantic models: the client imports nothing from the server (no
  Ray, torch or FastAPI), only :mod:`prefixserve.adapters.errors` for the one error envelope.
* Parsing ignores fields it does not know (a newer server may add some) but a missing required field
  is an error (``bad_response``): a reply of the wrong shape must not turn into half-filled objects.
* ``TenantKey.api_key`` is left out of ``repr`` so a logged result never prints a secret.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefixserve.adapters.errors import PrefixServeError

T = TypeVar("T")


def bad_response(message: str) -> PrefixServeError:
    """The server answered 2xx with a body this client cannot read (a proxy page, another service)."""
    return PrefixServeError(message, code="bad_response", status=502)


def _known(cls: type[Any], data: Any) -> dict[str, Any]:
    """The fields of dataclass ``cls`` present in ``data`` (a JSON object), or ``bad_response``."""
    if not isinstance(data, Mapping):
        raise bad_response(f"expected a JSON object for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


def _build(cls: type[T], values: dict[str, Any]) -> T:
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise bad_response(f"{cls.__name__} reply is missing fields: {exc}") from None


@dataclass(frozen=True)
class TenantKey:
    """``POST /v1/tenants`` and ``POST /v1/tenants/{t}/keys``: the key is shown once, keep it."""

    tenant: str
    api_key: str = field(repr=False)

    @classmethod
    def from_json(cls, data: Any) -> TenantKey:
        return _build(cls, _known(cls, data))


@dataclass(frozen=True)
class Limits:
    """A tenant's rate limits (0 = unlimited); ``default``: the server's default applies."""

    default: bool
    requests_per_s: float
    rows_per_s: float
    burst_s: float
    max_concurrent: int

    @classmethod
    def from_json(cls, data: Any) -> Limits:
        return _build(cls, _known(cls, data))


@dataclass(frozen=True)
class TrainingLimits:
    """A tenant's training limits (0 = unlimited); ``default``: the server's ``training.limits`` apply."""

    default: bool
    max_active_jobs: int
    max_dataset_bytes: int
    max_job_s: float
    max_datasets: int

    @classmethod
    def from_json(cls, data: Any) -> TrainingLimits:
        return _build(cls, _known(cls, data))


@dataclass(frozen=True)
class PrefixMeta:
    """One stored adapter version (any kind), as ``GET /v1/prefixes/{id}`` shows it."""

    prefix_id: str
    version: int
    sha256: str
    kind: str
    labels: tuple[str, ...]
    bytes: int
    num_virtual_tokens: int = 0
    created: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> PrefixMeta:
        values = _known(cls, data)
        if "labels" in values:
            values["labels"] = tuple(values["labels"])
        return _build(cls, values)


@dataclass(frozen=True)
class PrefixVersions:
    """``GET /v1/prefixes/{id}/versions``: the kept versions, the current one and the pinned one (if any)."""

    prefix_id: str
    current: int
    pinned: int | None
    versions: tuple[PrefixMeta, ...]

    @classmethod
    def from_json(cls, data: Any) -> PrefixVersions:
        values = _known(cls, data)
        values.setdefault("pinned", None)
        values["versions"] = tuple(PrefixMeta.from_json(v) for v in values.get("versions") or ())
        return _build(cls, values)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]

    @classmethod
    def from_json(cls, data: Any) -> Prediction:
        return _build(cls, _known(cls, data))


@dataclass(frozen=True)
class Classification:
    """``POST /v1/classify``'s answer; for a chunked call, the chunks joined in input order."""

    prefix_id: str
    version: int
    predictions: tuple[Prediction, ...]
    truncated: tuple[bool, ...]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self.predictions]

    @classmethod
    def from_json(cls, data: Any) -> Classification:
        values = _known(cls, data)
        values["predictions"] = tuple(Prediction.from_json(p) for p in values.get("predictions") or ())
        values["truncated"] = tuple(values.get("truncated") or (False,) * len(values["predictions"]))
        return _build(cls, values)


@dataclass(frozen=True)
class ServerInfo:
    """``GET /info`` as far as the client uses it (``max_inputs``: inputs per classify request, from
    ``max_inputs`` or TEI's ``max_client_batch_size``); ``raw`` keeps the whole body."""

    max_inputs: int | None
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> ServerInfo:
        if not isinstance(data, Mapping):
            raise bad_response("GET /info did not answer a JSON object")
        # prefixserve's /info is TEI's Info: its max_client_batch_size is the server's max_inputs
        value = data.get("max_inputs", data.get("max_client_batch_size"))
        return cls(max_inputs=value if isinstance(value, int) and value > 0 else None, raw=dict(data))

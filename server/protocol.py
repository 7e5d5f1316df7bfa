"""What crosses the Ray boundary between the Ingress and the Worker: frozen, typed values only.

The Ingress sends a :class:`ClassifyCall` naming one exact adapter version (:class:`AdapterRef`); the
Worker answers with a :class:`ClassifyReply`. Nothing is raised through the handle: errors travel as
:class:`~prefixserve.adapters.errors.PrefixServeError` values (they pickle with their code and
status), so a custom exception never depends on Ray's re-raise wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prefixserve.adapters.engine import Prediction
from prefixserve.adapters.errors import PrefixServeError
from prefixserve.adapters.format import BackboneSpec
from prefixserve.adapters.ref import AdapterRef

from .metrics import WorkerSnapshot


@dataclass(frozen=True)
class ClassifyCall:
    """Classify ``inputs`` (and optional second segments) with the adapter ``ref`` names."""

    ref: AdapterRef
    inputs: tuple[str, ...]
    text_pairs: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if self.text_pairs is not None and len(self.text_pairs) != len(self.inputs):
            raise ValueError("text_pairs must be as long as inputs")

    def pairs(self) -> tuple[str | None, ...]:
        return self.text_pairs if self.text_pairs is not None else (None,) * len(self.inputs)


RowResult = Prediction | PrefixServeError


@dataclass(frozen=True)
class ClassifyReply:
    """One result per input (a prediction, or the error of that row alone), or a call-level ``error``
    (the adapter could not be fetched or fit this backbone: no row ran)."""

    ref: AdapterRef
    replica: str
    results: tuple[RowResult, ...] = ()
    error: PrefixServeError | None = None
    stats: WorkerSnapshot | None = field(default=None, compare=False)

    def first_error(self) -> PrefixServeError | None:
        return self.error or next((r for r in self.results if isinstance(r, PrefixServeError)), None)

    def predictions(self) -> list[Prediction]:
        """Every row's prediction; call only when :meth:`first_error` is None."""
        return [r for r in self.results if isinstance(r, Prediction)]


@dataclass(frozen=True)
class WorkerInfo:
    """What the Ingress needs from a Worker to validate uploads: the served backbone, by fingerprint."""

    backbone: str
    fingerprint: str
    spec: BackboneSpec
    device: str
    replica: str
    max_batch_size: int
    batch_wait_timeout_s: float

"""Compatible request/response shapes: Hugging Face TEI's ``POST /predict`` and ``GET /info``, vLLM's
``POST /classify``. Each is a translation to and from our :class:`ClassifyRequest` / :class:`ClassifyResponse`;
the Ingress routes run the ordinary classify path (auth, limits, input checks), so nothing else differs.

Sources (the shapes were copied from these files):

* TEI: ``docs/openapi.json`` (schemas ``PredictRequest``, ``PredictInput``, ``PredictResponse``,
  ``Prediction``, ``Info``, ``ModelType``, ``ClassifierModel``), ``router/src/http/types.rs``
  (``PredictInput``'s deserializer: ``"a"`` and ``["a"]`` are one text, ``["a", "b"]`` a pair, a list of
  1- or 2-item lists a batch, anything else refused), ``router/src/http/server.rs`` (``predict``: every
  label's score, sorted by score descending; batch answers are a list of lists) and ``router/src/lib.rs``
  (``Info``), github.com/huggingface/text-embeddings-inference (1.9).
* vLLM: ``vllm/entrypoints/pooling/classify/protocol.py`` (``ClassificationCompletionRequest``,
  ``ClassificationData``, ``ClassificationResponse``), ``vllm/entrypoints/pooling/base/protocol.py``
  (``PoolingBasicRequestMixin``, ``CompletionRequestMixin``), github.com/vllm-project/vllm.

Decisions:

* Which adapter: vLLM's ``model`` is the prefix id, or ``"id@version"`` for one kept version (our
  classify request's ``version``; ``@`` is never part of an id). TEI has no such field: the route mirror
  ``/v1/prefixes/{id}/predict`` (a TEI client needs only a base URL) or the ``X-Prefix-Id`` header on
  ``/predict``. ``/info`` without an adapter describes the server (no labels).
* Scores are our probabilities (softmax), exactly what ``/v1/classify`` answers. Options that need
  something else are refused with 422 ``unsupported_option``, never silently ignored: TEI
  ``raw_scores: true`` or ``truncation_direction: left``, vLLM ``use_activation``/``softmax``/``activation``
  false, ``truncate_prompt_tokens`` other than -1, ``add_special_tokens: false``, token-id inputs.
* Truncation: we always truncate to the room the adapter leaves (TEI's ``auto_truncate``, its default
  since 1.x); an explicit TEI ``truncate: false`` turns a truncated row into 422 ``input_too_long``.
* Errors keep our envelope ``{"error": {"code", "message"}}`` and statuses: vLLM's clients read
  ``error.message``, which ours has; TEI clients read the status.
* vLLM ``usage`` token counts are 0: tokenizing happens in the Worker, and the Ingress does not count.
"""

from __future__ import annotations

import time
import uuid
from importlib import metadata
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator

from prefixserve.adapters.backbone import MIN_TEXT_TOKENS
from prefixserve.adapters.errors import PrefixServeError

from .protocol import WorkerInfo
from .schemas import AppSettings, ClassifyRequest, ClassifyResponse, PrefixMeta

PREFIX_HEADER = "x-prefix-id"  # names the adapter on TEI's bare /predict and /info


def unsupported(message: str) -> PrefixServeError:
    return PrefixServeError(message, code="unsupported_option", status=422)


def header_prefix(headers: Any) -> str | None:
    """The adapter a bare TEI route names in the ``X-Prefix-Id`` header, if any."""
    return headers.get(PREFIX_HEADER) or None


def required_prefix(headers: Any) -> str:
    """:func:`header_prefix`, 422 when absent (``POST /predict`` needs an adapter)."""
    prefix_id = header_prefix(headers)
    if prefix_id is None:
        raise PrefixServeError(
            "name the adapter: header X-Prefix-Id, or POST /v1/prefixes/{id}/predict",
            code="invalid_request",
            status=422,
        )
    return prefix_id


def classify_request(**fields: Any) -> ClassifyRequest:
    """Our request from translated fields; a shape it refuses is the caller's 422, not a 500."""
    try:
        return ClassifyRequest.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise PrefixServeError(f"{where}: {first.get('msg', 'invalid')}", code="invalid_request", status=422) from None


def _version() -> str:
    try:
        return metadata.version("prefixserve")
    except metadata.PackageNotFoundError:  # a source tree without an install
        return "0.0.0"


# ---- TEI /predict -------------------------------------------------------------------------------
class TeiPrediction(BaseModel):
    score: float
    label: str


class TeiPredictResponse(RootModel[list[TeiPrediction] | list[list[TeiPrediction]]]):
    """One input: every label, best first. A batch: one such list per input."""


class TeiPredictRequest(BaseModel):
    """TEI ``PredictRequest``. Unknown fields are ignored, as TEI's serde does."""

    model_config = ConfigDict(  # examples: TEI's docs/source/en/quick_tour.md
        extra="ignore",
        json_schema_extra={
            "examples": [{"inputs": "I like you."}, {"inputs": [["I like you."], ["I hate pineapples"]]}]
        },
    )
    inputs: str | list[str] | list[list[str]] = Field(
        ..., description='"text", ["text", "pair"], or a batch [["text"], ["text", "pair"], ...]'
    )
    truncate: bool | None = Field(None, description="null or true: truncate (auto_truncate); false: 422 if too long")
    truncation_direction: str = Field("right", description="right only")
    raw_scores: bool = Field(False, description="false only (probabilities)")

    @field_validator("inputs")
    @classmethod
    def _shape(cls, v: str | list[str] | list[list[str]]) -> str | list[str] | list[list[str]]:
        if isinstance(v, str):
            return v
        if not v:
            raise ValueError("inputs must not be empty")
        if isinstance(v[0], str) and len(v) > 2:
            raise ValueError(f"a list of strings is one text or a [text, pair]; got {len(v)} strings")
        if isinstance(v[0], list):
            for i, seq in enumerate(v):
                if len(seq) not in (1, 2):
                    raise ValueError(f"inputs[{i}] must be [text] or [text, pair]; got {len(seq)} strings")
        return v

    @property
    def is_batch(self) -> bool:
        return isinstance(self.inputs, list) and isinstance(self.inputs[0], list)

    def sequences(self) -> list[list[str]]:
        """Every input as [text] or [text, pair]."""
        v = self.inputs
        if isinstance(v, str):
            return [[v]]
        return [list(seq) for seq in v] if self.is_batch else [list(v)]  # type: ignore[arg-type]

    def to_classify(self, prefix_id: str) -> ClassifyRequest:
        if self.raw_scores:
            raise unsupported("raw_scores: true is not supported; scores are probabilities")
        if self.truncation_direction.lower() != "right":
            raise unsupported("truncation_direction must be right")
        seqs = self.sequences()
        pairs = [s[1] if len(s) == 2 else None for s in seqs]
        text_pairs = pairs if any(p is not None for p in pairs) else None
        return classify_request(prefix_id=prefix_id, inputs=[s[0] for s in seqs], text_pairs=text_pairs)

    def answer(self, out: ClassifyResponse) -> TeiPredictResponse:
        if self.truncate is False and any(out.truncated):
            i = out.truncated.index(True)
            raise PrefixServeError(
                f"inputs[{i}] is longer than the adapter's room and truncate is false",
                code="input_too_long",
                status=422,
            )
        rows = [tei_ranked(p.scores) for p in out.predictions]
        return TeiPredictResponse(rows if self.is_batch else rows[0])


def tei_ranked(scores: dict[str, float]) -> list[TeiPrediction]:
    """Every label with its score, best first, ties ordered as TEI orders them (stable ascending sort, reversed)."""
    ranked = sorted(scores.items(), key=lambda kv: kv[1])
    return [TeiPrediction(score=s, label=lab) for lab, s in reversed(ranked)]


# ---- TEI /info ----------------------------------------------------------------------------------
class TeiClassifier(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class TeiModelType(BaseModel):
    classifier: TeiClassifier


class TeiInfo(BaseModel):
    """TEI ``Info``. ``model_type`` is always a classifier: with an adapter, its labels; else none."""

    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: TeiModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


def tei_info(settings: AppSettings, worker: WorkerInfo, meta: PrefixMeta | None) -> TeiInfo:
    """The server (``meta`` None: the backbone, its fingerprint) or one adapter (its id, sha256, labels)."""
    labels = meta.labels if meta is not None else []
    room = worker.spec.max_virtual_tokens + MIN_TEXT_TOKENS  # real tokens a row without virtual tokens may have
    return TeiInfo(
        model_id=worker.backbone,
        model_sha=meta.sha256 if meta is not None else worker.fingerprint,
        model_dtype=settings.dtype,
        served_model_name=meta.prefix_id if meta is not None else worker.backbone,
        model_type=TeiModelType(
            classifier=TeiClassifier(
                id2label={str(i): lab for i, lab in enumerate(labels)},
                label2id={lab: i for i, lab in enumerate(labels)},
            )
        ),
        max_concurrent_requests=settings.ingress_max_ongoing_requests,
        max_input_length=room - (meta.num_virtual_tokens if meta is not None else 0),
        max_batch_tokens=settings.max_batch_tokens,
        max_batch_requests=settings.max_batch_size,
        max_client_batch_size=settings.max_inputs,
        auto_truncate=True,
        tokenization_workers=settings.replicas,
        version=_version(),
    )


# ---- vLLM /classify -----------------------------------------------------------------------------
class VllmClassifyRequest(BaseModel):
    """vLLM ``ClassificationCompletionRequest`` (text input). Unknown fields are ignored, as vLLM does."""

    model_config = ConfigDict(  # example: vLLM's examples/online_serving/openai_classification_client.py
        extra="ignore",
        json_schema_extra={"examples": [{"model": "sentiment", "input": ["Hello, my name is", "The future of AI is"]}]},
    )
    model: str = Field(..., description='the prefix id, or "id@version"', examples=["sentiment"])
    input: str | list[str] | list[int] | list[list[int]] = Field(..., description="text or texts (token ids: 422)")
    truncate_prompt_tokens: int | None = Field(None, description="null or -1 only (truncate to the adapter's room)")
    add_special_tokens: bool = True
    use_activation: bool | None = None
    softmax: bool | None = None  # vLLM's deprecated spellings of use_activation
    activation: bool | None = None
    user: str | None = None
    priority: int = 0  # ignored: fairness is per tenant (the Worker's batcher), not per request

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v

    def prefix_and_version(self) -> tuple[str, int | None]:
        prefix_id, sep, version = self.model.partition("@")  # "@" is never part of an id (store/ids.py)
        if not sep:
            return prefix_id, None
        if not version.isdigit():
            raise PrefixServeError(
                f"model {self.model[:80]!r}: expected id@version", code="invalid_request", status=422
            )
        return prefix_id, int(version)

    def to_classify(self) -> ClassifyRequest:
        if False in (self.use_activation, self.softmax, self.activation):
            raise unsupported("use_activation: false is not supported; probs are probabilities")
        if self.truncate_prompt_tokens not in (None, -1):
            raise unsupported("truncate_prompt_tokens is not supported; inputs are truncated to the adapter's room")
        if not self.add_special_tokens:
            raise unsupported("add_special_tokens: false is not supported")
        texts = [self.input] if isinstance(self.input, str) else self.input
        if not all(isinstance(t, str) for t in texts):  # the Ingress has no tokenizer to check ids against
            raise unsupported("token-id input is not supported; send text")
        prefix_id, version = self.prefix_and_version()
        return classify_request(prefix_id=prefix_id, inputs=texts, version=version)

    def answer(self, out: ClassifyResponse) -> VllmClassifyResponse:
        data = [
            VllmClassificationData(index=i, label=p.label, probs=list(p.scores.values()), num_classes=len(p.scores))
            for i, p in enumerate(out.predictions)
        ]
        return VllmClassifyResponse(model=self.model, data=data, usage=VllmUsage())


class VllmClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float] = Field(..., description="in the adapter's label order")
    num_classes: int


class VllmUsage(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: None = None


class VllmClassifyResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"classify-{uuid.uuid4().hex}")
    object: str = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[VllmClassificationData]
    usage: VllmUsage

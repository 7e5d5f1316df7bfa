"""TEI and vLLM request/response shapes (server/compat.py): parsing, translation, refusals. No model, no Ray.

Request examples are copied from each project:
* TEI ``docs/source/en/quick_tour.md`` (``{"inputs":"I like you."}`` and the batch
  ``{"inputs":[["I like you."], ["I hate pineapples"]]}``) and ``docs/openapi.json`` (``PredictInput``: a string,
  a pair of strings, a batch of mixed singles and pairs; example ``"What is Deep Learning?"``).
* vLLM ``tests/entrypoints/pooling/classify/test_online.py`` (``input_text``, ``[input_text] * N``,
  ``input_tokens``, ``truncate_prompt_tokens: 5``, ``use_activation``) and
  ``examples/online_serving/openai_classification_client.py`` (``prompts``).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from prefixserve.adapters.errors import PrefixServeError
from prefixserve.adapters.format import BackboneSpec
from prefixserve.server import compat
from prefixserve.server.protocol import WorkerInfo
from prefixserve.server.schemas import DEFAULTS, ClassifyResponse, PredictionOut, PrefixMeta

VLLM_TEXT = "This product was excellent and exceeded my expectations"
VLLM_TOKENS = [1986, 1985, 572, 9073, 323, 33808, 847, 16665]
VLLM_PROMPTS = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def response(*rows: dict[str, float], truncated: list[bool] | None = None) -> ClassifyResponse:
    preds = [PredictionOut(label=max(r, key=r.__getitem__), score=max(r.values()), scores=r) for r in rows]
    return ClassifyResponse(prefix_id="p", version=1, predictions=preds, truncated=truncated or [False] * len(rows))


# ---- TEI /predict ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "inputs, texts, pairs, batch",
    [
        ("I like you.", ["I like you."], None, False),  # quick_tour.md
        ("What is Deep Learning?", ["What is Deep Learning?"], None, False),  # openapi.json example
        (["I like you."], ["I like you."], None, False),  # types.rs: a 1-item list is one text
        (
            ["What is Deep Learning?", "Deep Learning is ..."],
            ["What is Deep Learning?"],
            ["Deep Learning is ..."],
            False,
        ),
        ([["I like you."], ["I hate pineapples"]], ["I like you.", "I hate pineapples"], None, True),  # quick_tour.md
        ([["a"], ["b", "c"]], ["a", "b"], [None, "c"], True),  # a batch of mixed singles and pairs
    ],
)
def test_tei_inputs_translate(inputs, texts, pairs, batch):
    body = compat.TeiPredictRequest.model_validate({"inputs": inputs})
    req = body.to_classify("sentiment")
    assert (req.prefix_id, req.inputs, req.text_pairs, body.is_batch) == ("sentiment", texts, pairs, batch)


@pytest.mark.parametrize("inputs", [[], ["a", "b", "c"], [["a", "b", "c"]], [[]], ["a", ["b"]], [["a"], "b"], 3])
def test_tei_bad_inputs_are_validation_errors(inputs):
    with pytest.raises(ValidationError):
        compat.TeiPredictRequest.model_validate({"inputs": inputs})


def test_tei_options():
    ok = compat.TeiPredictRequest.model_validate(
        {"inputs": "x", "truncate": True, "truncation_direction": "Right", "raw_scores": False, "unknown": 1}
    )
    ok.to_classify("p")
    for extra in ({"raw_scores": True}, {"truncation_direction": "left"}):
        body = compat.TeiPredictRequest.model_validate({"inputs": "x", **extra})
        with pytest.raises(PrefixServeError) as err:
            body.to_classify("p")
        assert (err.value.status, err.value.code) == (422, "unsupported_option")


def test_tei_answer_single_sorted_desc():
    body = compat.TeiPredictRequest.model_validate({"inputs": "I like you."})
    out = body.answer(response({"neg": 0.2, "pos": 0.7, "mid": 0.1})).model_dump()
    assert out == [{"score": 0.7, "label": "pos"}, {"score": 0.2, "label": "neg"}, {"score": 0.1, "label": "mid"}]


def test_tei_answer_batch_and_ties():
    body = compat.TeiPredictRequest.model_validate({"inputs": [["a"], ["b"]]})
    out = body.answer(response({"x": 0.5, "y": 0.5}, {"x": 0.9, "y": 0.1})).model_dump()
    # TEI sorts ascending (stable) and reverses: equal scores come out in reverse label order
    assert out == [
        [{"score": 0.5, "label": "y"}, {"score": 0.5, "label": "x"}],
        [{"score": 0.9, "label": "x"}, {"score": 0.1, "label": "y"}],
    ]


def test_tei_truncate_false_refuses_a_truncated_row():
    rows = ({"a": 0.6, "b": 0.4}, {"a": 0.3, "b": 0.7})
    compat.TeiPredictRequest.model_validate({"inputs": [["x"], ["y"]]}).answer(response(*rows, truncated=[False, True]))
    body = compat.TeiPredictRequest.model_validate({"inputs": [["x"], ["y"]], "truncate": False})
    with pytest.raises(PrefixServeError) as err:
        body.answer(response(*rows, truncated=[False, True]))
    assert (err.value.status, err.value.code) == (422, "input_too_long") and "inputs[1]" in str(err.value)


def test_required_prefix_header():
    assert compat.required_prefix({"x-prefix-id": "sentiment"}) == "sentiment"
    assert compat.header_prefix({}) is None
    with pytest.raises(PrefixServeError) as err:
        compat.required_prefix({})
    assert err.value.status == 422


# ---- TEI /info ---------------------------------------------------------------------------------
def test_tei_info_server_and_adapter():
    spec = BackboneSpec("sha256:ab", 2, 4, 32, "roberta", max_virtual_tokens=56)
    worker = WorkerInfo("tiny-roberta", "sha256:ab", spec, "cpu", "r1", 32, 0.005)
    server = compat.tei_info(DEFAULTS, worker, None).model_dump()
    assert server["model_id"] == "tiny-roberta" and server["served_model_name"] == "tiny-roberta"
    assert server["model_type"] == {"classifier": {"id2label": {}, "label2id": {}}}
    assert server["max_input_length"] == 56 + 8 and server["max_client_batch_size"] == DEFAULTS.max_inputs
    assert server["auto_truncate"] is True and server["max_batch_requests"] == DEFAULTS.max_batch_size
    meta = PrefixMeta(
        prefix_id="sentiment",
        version=3,
        sha256="f" * 64,
        kind="prefix",
        num_virtual_tokens=5,
        labels=["neg", "pos"],
        bytes=1,
    )
    one = compat.tei_info(DEFAULTS, worker, meta).model_dump()
    assert one["model_type"] == {"classifier": {"id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1}}}
    assert (one["served_model_name"], one["model_sha"], one["max_input_length"]) == ("sentiment", "f" * 64, 64 - 5)
    # every field TEI's openapi.json marks required for Info
    required = {"model_id", "model_dtype", "model_type", "max_concurrent_requests", "max_input_length"}
    required |= {"max_batch_tokens", "max_client_batch_size", "auto_truncate", "tokenization_workers", "version"}
    assert required <= one.keys()


# ---- vLLM /classify ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, texts",
    [
        ({"model": "sentiment", "input": VLLM_TEXT}, [VLLM_TEXT]),  # test_online.py: input: str
        ({"model": "sentiment", "input": [VLLM_TEXT] * 10}, [VLLM_TEXT] * 10),  # input: list[str]
        ({"model": "sentiment", "input": VLLM_PROMPTS}, VLLM_PROMPTS),  # openai_classification_client.py
        ({"model": "sentiment", "input": VLLM_TEXT, "add_special_tokens": True, "use_activation": True}, [VLLM_TEXT]),
        ({"model": "sentiment", "input": "x", "truncate_prompt_tokens": -1, "user": "u", "priority": 0}, ["x"]),
    ],
)
def test_vllm_request_translates(body, texts):
    req = compat.VllmClassifyRequest.model_validate(body).to_classify()
    assert (req.prefix_id, req.inputs, req.text_pairs) == ("sentiment", texts, None)


@pytest.mark.parametrize(
    "extra",
    [
        {"input": VLLM_TOKENS},  # test_online.py: input: list[int]
        {"input": [VLLM_TOKENS] * 2},  # input: list[list[int]]
        {"truncate_prompt_tokens": 5},
        {"use_activation": False},
        {"softmax": False},
        {"add_special_tokens": False},
    ],
)
def test_vllm_unsupported_options(extra):
    body = compat.VllmClassifyRequest.model_validate({"model": "sentiment", "input": VLLM_TEXT, **extra})
    with pytest.raises(PrefixServeError) as err:
        body.to_classify()
    assert (err.value.status, err.value.code) == (422, "unsupported_option")


def test_vllm_bad_requests():
    with pytest.raises(ValidationError):  # test_online.py test_empty_input_error: input []
        compat.VllmClassifyRequest.model_validate({"model": "m", "input": []})
    with pytest.raises(ValidationError):  # no adapter named
        compat.VllmClassifyRequest.model_validate({"input": "x"})
    with pytest.raises(PrefixServeError) as err:
        compat.VllmClassifyRequest.model_validate({"model": "m@latest", "input": "x"}).to_classify()
    assert err.value.status == 422


def test_vllm_model_version():
    body = compat.VllmClassifyRequest.model_validate({"model": "sentiment@3", "input": "x"})
    req = body.to_classify()
    assert (req.prefix_id, req.version, req.inputs) == ("sentiment", 3, ["x"])
    assert compat.VllmClassifyRequest.model_validate({"model": "sentiment", "input": "x"}).to_classify().version is None
    with pytest.raises(PrefixServeError):  # versions start at 1 (ClassifyRequest's own check, as a 422)
        compat.VllmClassifyRequest.model_validate({"model": "sentiment@0", "input": "x"}).to_classify()


def test_vllm_answer_shape():
    body = compat.VllmClassifyRequest.model_validate({"model": "sentiment", "input": ["a", "b"]})
    out = body.answer(response({"neg": 0.25, "pos": 0.75}, {"neg": 0.6, "pos": 0.4})).model_dump()
    assert out["id"].startswith("classify-") and out["object"] == "list" and isinstance(out["created"], int)
    assert out["model"] == "sentiment"
    assert out["data"] == [
        {"index": 0, "label": "pos", "probs": [0.25, 0.75], "num_classes": 2},  # probs in label order
        {"index": 1, "label": "neg", "probs": [0.6, 0.4], "num_classes": 2},
    ]
    assert out["usage"]["prompt_tokens"] == 0 and out["usage"]["total_tokens"] == 0

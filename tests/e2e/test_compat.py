"""End-to-end: TEI's /predict and /info and vLLM's /classify over real HTTP on a light Ray Serve app
(1 Worker replica, file store, tiny RoBERTa). Each project's own request examples must answer exactly what
/v1/classify answers for the same texts (labels, scores to 1e-6); 401 without a key; 404 for another tenant's
adapter on every compatible route.

Examples: TEI ``docs/source/en/quick_tour.md`` and ``docs/openapi.json`` (``PredictInput``); vLLM
``tests/entrypoints/pooling/classify/test_online.py`` and ``examples/online_serving/openai_classification_client.py``.
"""

from __future__ import annotations

import pytest

from tests.fixtures.backbones import make_peft_adapter
from tests.fixtures.served_app import served_app

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.ray]

LABELS = ["negative", "neutral", "positive"]
TEI_SINGLE = {"inputs": "I like you."}  # quick_tour.md
TEI_BATCH = {"inputs": [["I like you."], ["I hate pineapples"]]}  # quick_tour.md "Batching"
TEI_PAIR = {"inputs": ["What is Deep Learning?", "Deep Learning is ..."]}  # openapi.json PredictInput / Rank examples
VLLM_TEXT = "This product was excellent and exceeded my expectations"  # test_online.py input_text
VLLM_PROMPTS = [  # openai_classification_client.py
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def app(ray_serve, tiny_backbones, tmp_path_factory):
    from prefixserve.adapters.peft_io import pack_folder

    root = tmp_path_factory.mktemp("compat")
    with served_app(ray_serve, "prefixserve-compat", tiny_backbones["roberta"], f"file://{root / 'store'}", root) as a:
        client, keys = a.client, {}
        for tenant, prefix_id, seed in (("compat-a", "sentiment", 1), ("compat-b", "secret", 2)):
            r = client.post("/v1/tenants", json={"tenant": tenant}, headers=bearer(a.admin_key))
            assert r.status_code == 201, r.text
            keys[tenant] = r.json()["api_key"]
            folder = make_peft_adapter(tiny_backbones["roberta"], root / prefix_id, "prefix", 4, len(LABELS), seed=seed)
            data = pack_folder(folder, labels=LABELS, fingerprint=a.fingerprint)
            headers = {**bearer(keys[tenant]), "Content-Type": "application/octet-stream"}
            assert client.put(f"/v1/prefixes/{prefix_id}", content=data, headers=headers).status_code == 201
        yield {"client": client, "key": keys["compat-a"], "backbone": tiny_backbones["roberta"]}


def ours(app, inputs, pairs=None):
    """Our own /v1/classify answer: per input, {label: score}."""
    body = {"prefix_id": "sentiment", "inputs": inputs}
    if pairs is not None:
        body["text_pairs"] = pairs
    r = app["client"].post("/v1/classify", json=body, headers=bearer(app["key"]))
    assert r.status_code == 200, r.text
    return [p["scores"] for p in r.json()["predictions"]]


def assert_tei_row(row, scores):
    assert [p["label"] for p in row] == sorted(scores, key=scores.__getitem__, reverse=True)  # best first
    assert [p["score"] for p in row] == sorted((p["score"] for p in row), reverse=True)
    for p in row:
        assert abs(p["score"] - scores[p["label"]]) <= 1e-6


def test_tei_predict_examples(app):
    c, key = app["client"], app["key"]
    mirror, header = "/v1/prefixes/sentiment/predict", {**bearer(key), "X-Prefix-Id": "sentiment"}
    for path, headers in ((mirror, bearer(key)), ("/predict", header)):
        r = c.post(path, json=TEI_SINGLE, headers=headers)
        assert r.status_code == 200, r.text
        assert_tei_row(r.json(), ours(app, ["I like you."])[0])
    r = c.post(mirror, json=TEI_BATCH, headers=bearer(key))
    assert r.status_code == 200, r.text
    for row, scores in zip(r.json(), ours(app, ["I like you.", "I hate pineapples"]), strict=True):
        assert_tei_row(row, scores)
    r = c.post(mirror, json=TEI_PAIR, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert_tei_row(r.json(), ours(app, [TEI_PAIR["inputs"][0]], [TEI_PAIR["inputs"][1]])[0])
    r = c.post(mirror, json={**TEI_SINGLE, "raw_scores": True}, headers=bearer(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_option"  # our envelope
    r = c.post("/predict", json=TEI_SINGLE, headers=bearer(key))  # no adapter named
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


def test_tei_info(app):
    c, key = app["client"], app["key"]
    server = c.get("/info", headers=bearer(key))
    assert server.status_code == 200, server.text
    assert server.json()["model_id"] == app["backbone"]
    assert server.json()["model_type"] == {"classifier": {"id2label": {}, "label2id": {}}}
    for r in (
        c.get("/v1/prefixes/sentiment/info", headers=bearer(key)),
        c.get("/info", headers={**bearer(key), "X-Prefix-Id": "sentiment"}),
    ):
        assert r.status_code == 200, r.text
        classifier = r.json()["model_type"]["classifier"]
        assert classifier["id2label"] == {str(i): lab for i, lab in enumerate(LABELS)}
        assert classifier["label2id"] == {lab: i for i, lab in enumerate(LABELS)}
        assert r.json()["served_model_name"] == "sentiment"


def test_vllm_classify_examples(app):
    c, key = app["client"], app["key"]
    for inputs in (VLLM_TEXT, [VLLM_TEXT] * 3, VLLM_PROMPTS):
        r = c.post("/classify", json={"model": "sentiment", "input": inputs}, headers=bearer(key))
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["object"] == "list" and out["model"] == "sentiment" and out["id"].startswith("classify-")
        texts = [inputs] if isinstance(inputs, str) else inputs
        expected = ours(app, texts)
        assert [d["index"] for d in out["data"]] == list(range(len(texts)))
        for d, scores in zip(out["data"], expected, strict=True):
            assert d["num_classes"] == len(LABELS) == len(d["probs"])
            assert d["label"] == max(scores, key=scores.__getitem__)
            for lab, p in zip(LABELS, d["probs"], strict=True):  # probs in the adapter's label order
                assert abs(p - scores[lab]) <= 1e-6
    r = c.post("/classify", json={"model": "sentiment@1", "input": VLLM_TEXT}, headers=bearer(key))  # pinned
    assert r.status_code == 200 and r.json()["data"][0]["probs"] == [ours(app, [VLLM_TEXT])[0][lab] for lab in LABELS]
    r = c.post("/classify", json={"model": "sentiment@99", "input": VLLM_TEXT}, headers=bearer(key))
    assert r.status_code == 404, r.text
    r = c.post("/classify", json={"model": "sentiment", "input": [1986, 1985]}, headers=bearer(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_option"


def test_401_without_a_key(app):
    c = app["client"]
    for method, path, body in (
        ("POST", "/predict", TEI_SINGLE),
        ("POST", "/v1/prefixes/sentiment/predict", TEI_SINGLE),
        ("GET", "/info", None),
        ("GET", "/v1/prefixes/sentiment/info", None),
        ("POST", "/classify", {"model": "sentiment", "input": "x"}),
    ):
        r = c.request(method, path, json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.text)


def test_404_for_a_foreign_prefix(app):
    c, key = app["client"], app["key"]  # compat-b's "secret" exists; compat-a must not learn that
    for r in (
        c.post("/v1/prefixes/secret/predict", json=TEI_SINGLE, headers=bearer(key)),
        c.post("/predict", json=TEI_SINGLE, headers={**bearer(key), "X-Prefix-Id": "secret"}),
        c.get("/v1/prefixes/secret/info", headers=bearer(key)),
        c.get("/info", headers={**bearer(key), "X-Prefix-Id": "secret"}),
        c.post("/classify", json={"model": "secret", "input": "x"}, headers=bearer(key)),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found" and "compat-b" not in r.text

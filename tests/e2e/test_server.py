"""End-to-end: real HTTP (httpx) against a real Ray Serve app (Ingress -> 2 Worker replicas) on a
tiny synthetic RoBERTa, with a real redis-server store. One app for the whole module (Ray start and
replica start-up dominate the cost)."""

from __future__ import annotations

import functools
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.backbones import make_peft_adapter, peft_logits

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.ray, pytest.mark.redis]

UPLOAD_CAP = 256 * 1024
TEXTS = [
    "this movie was really great",
    "the plot was boring and bad",
    "i love the actors",
    "not good , not terrible",
    "영화 정말 최고",
    "the worst film ever made by anyone at all",
]


@pytest.fixture(scope="module")
def server(ray_serve, redis_server, tiny_backbones, tmp_path_factory):
    from ray import serve

    from prefixserve.server.app import build_app
    from prefixserve.server.auth import resolve_admin_key

    key_file = tmp_path_factory.mktemp("admin") / "admin_key"
    admin_key, _ = resolve_admin_key(key_file)
    settings = dict(
        backbone=tiny_backbones["roberta"],
        store=redis_server.url + "?prefix=srvtest:",
        device="cpu",
        dtype="float32",  # compared with PEFT at 1e-5: "auto" would be bf16 on an AMX / AVX512-BF16 CPU
        replicas=2,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=1,
        max_batch_size=16,
        batch_wait_timeout_s=0.01,
        max_inputs=8,
        max_upload_bytes=UPLOAD_CAP,
        admin_key_file=str(key_file),
        default_limits={"requests_per_s": 1000.0, "rows_per_s": 0.0, "burst_s": 5.0, "max_concurrent": 64},
    )
    serve.run(build_app(settings), name="prefixserve-test", route_prefix="/")
    client = httpx.Client(base_url=ray_serve.url, timeout=60.0)
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    yield {
        "client": client,
        "admin": admin_key,
        "fingerprint": ready.json()["fingerprint"],
        "backbone": tiny_backbones["roberta"],
        "settings": settings,
    }
    client.close()
    serve.delete("prefixserve-test")


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def new_tenant(server, name):
    r = server["client"].post("/v1/tenants", json={"tenant": name}, headers=bearer(server["admin"]))
    assert r.status_code == 201, r.text
    assert r.json()["tenant"] == name
    return r.json()["api_key"]


def packed_adapter(server, tmp_path, seed, labels=("neg", "pos"), p=5, method="prefix"):
    from prefixserve.adapters.peft_io import pack_folder

    folder = make_peft_adapter(server["backbone"], tmp_path / f"peft{seed}", method, p, len(labels), seed=seed)
    return pack_folder(folder, labels=list(labels), fingerprint=server["fingerprint"])


def put_packed(server, key, prefix_id, data):
    return server["client"].put(
        f"/v1/prefixes/{prefix_id}", content=data, headers={**bearer(key), "Content-Type": "application/octet-stream"}
    )


def classify(client, key, prefix_id, inputs, pairs=None):
    body = {"prefix_id": prefix_id, "inputs": inputs}
    if pairs is not None:
        body["text_pairs"] = pairs
    return client.post("/v1/classify", json=body, headers=bearer(key))


def assert_scores_close(a, b, tol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# ---- tests --------------------------------------------------------------------------------------
def test_health_ready_docs(server):
    c = server["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").json()["fingerprint"].startswith("sha256:")
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/prefixes/{prefix_id}", "/v1/tenants"} <= set(paths)
    r = c.get("/nope")  # unknown paths reveal nothing without a key
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = c.get("/nope", headers=bearer(server["admin"]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_auth_401_and_403(server):
    c = server["client"]
    key = new_tenant(server, "authco")
    for headers in (
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic abc"},
        bearer("psk_0123456789abcdef_" + "x" * 43),
    ):
        r = c.get("/v1/prefixes", headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
    r = c.post("/v1/tenants", json={"tenant": "x"}, headers=bearer(key))  # a tenant key on an admin route
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert c.get("/v1/prefixes", headers=bearer(server["admin"])).status_code == 403  # admin is not a tenant
    for headers in ({}, {"Authorization": "Bearer nope"}):  # no key: 401 before the body is looked at
        r = c.post("/v1/classify", content=b"{not json", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert c.get("/metrics").status_code == 401 and c.get("/metrics", headers=bearer(key)).status_code == 403
    assert c.post("/v1/tenants", json={"tenant": "authco"}, headers=bearer(server["admin"])).status_code == 409


def test_peft_multipart_matches_peft(server, tmp_path):
    from transformers import AutoTokenizer

    c, key = server["client"], new_tenant(server, "peftco")
    folder = make_peft_adapter(server["backbone"], tmp_path / "peft", "prefix", 5, 2, seed=7)
    files: dict[str, Any] = {
        "adapter_config": ("adapter_config.json", Path(f"{folder}/adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", Path(f"{folder}/adapter_model.safetensors").read_bytes()),
    }
    r = c.put("/v1/prefixes/sentiment", files=files, data={"labels": '["negative", "positive"]'}, headers=bearer(key))
    assert r.status_code == 201, r.text
    meta = r.json()
    assert meta["version"] == 1 and meta["kind"] == "prefix" and meta["num_virtual_tokens"] == 5
    assert meta["labels"] == ["negative", "positive"] and meta["bytes"] > 0 and len(meta["sha256"]) >= 64

    r = classify(c, key, "sentiment", TEXTS)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["prefix_id"] == "sentiment" and out["version"] == 1 and out["truncated"] == [False] * len(TEXTS)
    tok = AutoTokenizer.from_pretrained(server["backbone"])
    want, _ = peft_logits(server["backbone"], folder, 2, tok, TEXTS)
    for pred, logits in zip(out["predictions"], want):
        probs = torch.softmax(logits, -1).tolist()
        assert_scores_close(pred["scores"], {"negative": probs[0], "positive": probs[1]})
        assert pred["label"] == ["negative", "positive"][int(torch.argmax(logits))]

    # re-upload (multipart without labels -> LABEL_i): a new version, 200
    files = {
        "adapter_config": Path(f"{folder}/adapter_config.json").read_bytes(),
        "adapter_model": Path(f"{folder}/adapter_model.safetensors").read_bytes(),
    }
    r = c.put("/v1/prefixes/sentiment", files=files, headers=bearer(key))
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["labels"] == ["LABEL_0", "LABEL_1"]


def test_concurrent_mixed_equals_single(server, tmp_path):
    c = server["client"]
    jobs = []
    for t in ("mixa", "mixb"):
        key = new_tenant(server, t)
        for j, (p, labels, method) in enumerate(
            [(3, ("a", "b"), "prefix"), (7, ("x", "y", "z"), "prefix"), (4, ("n", "p"), "prompt")]
        ):
            data = packed_adapter(
                server, tmp_path, seed=100 + 10 * j + len(t) + ord(t[-1]), labels=labels, p=p, method=method
            )
            assert put_packed(server, key, f"p{j}", data).status_code == 201
            for text in TEXTS[:4]:
                jobs.append((key, f"p{j}", [text, TEXTS[-1]]))
    single = {}
    for key, pid, inputs in jobs:  # sequential: each request alone in its batch
        r = classify(c, key, pid, inputs)
        assert r.status_code == 200, r.text
        single[(key, pid, inputs[0])] = r.json()["predictions"]

    def call(job):
        key, pid, inputs = job
        with httpx.Client(base_url=str(c.base_url), timeout=60.0) as cc:
            return job, classify(cc, key, pid, inputs)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, jobs * 2))
    for (key, pid, inputs), r in results:
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["predictions"], single[(key, pid, inputs[0])]):
            assert got["label"] == want["label"]
            assert_scores_close(got["scores"], want["scores"])
    metrics = c.get("/metrics", headers=bearer(server["admin"])).text
    assert "prefixserve_batch_rows_bucket" in metrics and "prefixserve_requests_total" in metrics
    rows = [line for line in metrics.splitlines() if line.startswith("prefixserve_batch_adapters_sum")]
    assert rows, metrics[:2000]


def test_every_kind_uploads_lists_and_classifies(server, tmp_path):
    """LoRA (PEFT multipart), IA3 and a bottleneck adapter (packed) beside a prefix: each upload reports its
    kind, ``?kind=`` filters the list, each classifies like PEFT (or the engine for bottleneck), and the
    Worker counts rows by kind."""
    from transformers import AutoTokenizer

    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.adapters.synthetic import random_adapter

    c, key = server["client"], new_tenant(server, "kindsco")
    tok = AutoTokenizer.from_pretrained(server["backbone"])
    folder = make_peft_adapter(server["backbone"], tmp_path / "lora", "lora", 0, 2, seed=3, scale=0.3)
    files = {
        "adapter_config": Path(f"{folder}/adapter_config.json").read_bytes(),
        "adapter_model": Path(f"{folder}/adapter_model.safetensors").read_bytes(),
    }
    r = c.put("/v1/prefixes/lora-sent", files=files, headers=bearer(key))
    assert r.status_code == 201 and r.json()["kind"] == "lora" and r.json()["num_virtual_tokens"] == 0, r.text
    bb = load_backbone(server["backbone"], device="cpu")
    kinds = {"ia3": "ia3-one", "bottleneck": "bn-one", "prefix": "pre-one"}
    packed = {}
    for i, (kind, pid) in enumerate(kinds.items()):
        packed[pid] = random_adapter(bb.config, server["fingerprint"], kind=kind, num_virtual_tokens=4, seed=40 + i)
        r = put_packed(server, key, pid, packed[pid])
        assert r.status_code == 201 and r.json()["kind"] == kind, r.text
    listed = c.get("/v1/prefixes", headers=bearer(key)).json()["prefixes"]
    assert {(m["prefix_id"], m["kind"]) for m in listed} == {("lora-sent", "lora"), *((v, k) for k, v in kinds.items())}
    only = c.get("/v1/prefixes", params={"kind": "bottleneck"}, headers=bearer(key)).json()["prefixes"]
    assert [m["prefix_id"] for m in only] == ["bn-one"]
    r = c.get("/v1/prefixes", params={"kind": "bogus"}, headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    assert c.get("/v1/prefixes", params={"kind": "bogus"}).status_code == 401  # auth first

    want, _ = peft_logits(server["backbone"], folder, 2, tok, TEXTS)
    r = classify(c, key, "lora-sent", TEXTS)
    assert r.status_code == 200, r.text
    for pred, logits in zip(r.json()["predictions"], want):
        probs = torch.softmax(logits, -1).tolist()
        assert_scores_close(pred["scores"], {"LABEL_0": probs[0], "LABEL_1": probs[1]})
    engine = Engine(bb)
    for pid, data in packed.items():
        a = engine.adapter(pid, functools.partial(bytes, data))
        r = classify(c, key, pid, TEXTS)
        assert r.status_code == 200, r.text
        for pred, ref in zip(r.json()["predictions"], engine.predict([Row(a, t) for t in TEXTS])):
            assert pred["label"] == ref.label
            assert_scores_close(pred["scores"], ref.scores)
    metrics = c.get("/metrics", headers=bearer(server["admin"])).text
    for kind in ("lora", "ia3", "bottleneck", "prefix"):
        assert f'kind="{kind}"' in metrics and "prefixserve_rows_by_kind_total" in metrics, kind


def test_isolation(server, tmp_path):
    c = server["client"]
    a, b = new_tenant(server, "isoa"), new_tenant(server, "isob")
    assert put_packed(server, a, "secret", packed_adapter(server, tmp_path, 1)).status_code == 201
    assert put_packed(server, b, "mine", packed_adapter(server, tmp_path, 2)).status_code == 201
    for r in (
        classify(c, b, "secret", ["hi"]),
        c.get("/v1/prefixes/secret", headers=bearer(b)),
        c.delete("/v1/prefixes/secret", headers=bearer(b)),
        classify(c, b, "missing", ["hi"]),
    ):
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
    assert [p["prefix_id"] for p in c.get("/v1/prefixes", headers=bearer(b)).json()["prefixes"]] == ["mine"]
    assert [p["prefix_id"] for p in c.get("/v1/prefixes", headers=bearer(a)).json()["prefixes"]] == ["secret"]
    assert classify(c, a, "secret", ["hi"]).status_code == 200
    assert c.get("/v1/prefixes/secret", headers=bearer(a)).json()["version"] == 1
    # delete is immediate; deleting a tenant revokes its key
    assert c.delete("/v1/prefixes/secret", headers=bearer(a)).status_code == 204
    assert classify(c, a, "secret", ["hi"]).status_code == 404
    assert c.delete("/v1/tenants/isoa", headers=bearer(server["admin"])).status_code == 204
    assert c.get("/v1/prefixes", headers=bearer(a)).status_code == 401


def test_overwrite_visible_on_both_replicas_within_1s(server, tmp_path):
    c, key = server["client"], new_tenant(server, "coherent")
    v1, v2 = packed_adapter(server, tmp_path, 11), packed_adapter(server, tmp_path, 12)
    first = put_packed(server, key, "live", v1)
    assert first.status_code == 201
    v = first.json()["version"]  # not always 1: numbers never restart after another tenant's deletion

    def sweep(t0, want, max_calls=200):
        """Classify (4 at a time) until both Worker replicas answered; {replica: (sent - t0, json)}."""
        seen: dict[str, tuple[float, Any]] = {}

        def one(_):
            sent = time.monotonic()
            return sent - t0, classify(c, key, "live", [TEXTS[0]])

        with ThreadPoolExecutor(4) as pool:
            for _ in range(max_calls // 4):
                for at, r in pool.map(one, range(4)):
                    assert r.status_code == 200 and r.json()["version"] == want, r.text
                    seen.setdefault(r.headers["x-prefixserve-replica"], (at, r.json()))
                if len(seen) >= 2:
                    return seen
        return seen

    old = sweep(time.monotonic(), v)
    assert len(old) == 2, "requests did not reach both Worker replicas"
    assert {o["version"] for _, o in old.values()} == {v}
    t0 = time.monotonic()
    r = put_packed(server, key, "live", v2)
    assert r.status_code == 200 and r.json()["version"] == v + 1
    new = sweep(t0, v + 1)
    # every request sent after the PUT returned is answered by v2, on both replicas
    assert len(new) == 2 and {n["version"] for _, n in new.values()} == {v + 1}
    old_scores = next(iter(old.values()))[1]["predictions"][0]["scores"]
    assert all(n["predictions"][0]["scores"] != old_scores for _, n in new.values())
    visible_after = max(at for at, _ in new.values())  # from the PUT's start to the request that saw v2
    assert visible_after < 1.0, f"new version visible everywhere only after {visible_after:.2f}s"


def test_rejected_upload_keeps_old_version(server, tmp_path):
    c, key = server["client"], new_tenant(server, "corrupt")
    good = packed_adapter(server, tmp_path, 21)
    created = put_packed(server, key, "keep", good)
    assert created.status_code == 201
    v = created.json()["version"]
    before = classify(c, key, "keep", TEXTS[:2]).json()
    bad_fp = packed_adapter(server, tmp_path, 22)
    other = bad_fp.replace(server["fingerprint"].encode(), b"sha256:" + b"0" * 64)
    flipped = bytearray(good)
    flipped[20:40] = b"\xff" * 20  # header garbage
    cases = {b"not a safetensors file": 422, good[: len(good) // 2]: 422, bytes(flipped): 422, other: 422}
    for data, status in cases.items():
        r = put_packed(server, key, "keep", data)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"code", "message"}
    assert put_packed(server, key, "keep", b"").status_code == 400
    r = c.put("/v1/prefixes/keep", files={"adapter_config": io.BytesIO(b"{not json")}, headers=bearer(key))
    assert r.status_code == 422, r.text
    assert put_packed(server, key, "keep", other).json()["error"]["code"] == "backbone_mismatch"
    assert c.get("/v1/prefixes/keep", headers=bearer(key)).json()["version"] == v
    after = classify(c, key, "keep", TEXTS[:2]).json()
    assert after["version"] == v and after["predictions"] == before["predictions"]


def test_limits_413_422_429(server, tmp_path):
    from prefixserve.adapters.store import Quota, open_store

    c, key = server["client"], new_tenant(server, "limits")
    big = b"\0" * (UPLOAD_CAP + 1)
    r = put_packed(server, key, "big", big)  # Content-Length says too big
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunks():  # no Content-Length: the streamed size must be counted
        for _ in range(8):
            yield b"\0" * (UPLOAD_CAP // 4)

    r = c.put("/v1/prefixes/big", content=chunks(), headers={**bearer(key), "Content-Type": "application/octet-stream"})
    assert r.status_code == 413, r.text
    assert c.get("/v1/prefixes/big", headers=bearer(key)).status_code == 404

    one = put_packed(server, key, "one", packed_adapter(server, tmp_path, 31))
    assert one.status_code == 201
    r = classify(c, key, "one", ["x"] * 9)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_inputs"
    r = c.post("/v1/classify", json={"prefix_id": "one", "inputs": []}, headers=bearer(key))
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = c.post("/v1/classify", content=b"{nope", headers={**bearer(key), "Content-Type": "application/json"})
    assert r.status_code == 422 and "error" in r.json()
    r = classify(c, key, "one", ["a", "b"], pairs=["x"])
    assert r.status_code == 422
    r = classify(c, key, "one", ["a", "b"], pairs=["x", None])
    assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    r = c.put("/v1/prefixes/-bad", content=b"x", headers=bearer(key))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_id"
    assert c.put("/v1/prefixes/a%2Fb", content=b"x", headers=bearer(key)).status_code == 404

    store = open_store(server["settings"]["store"])
    try:
        store.set_quota("limits", Quota(max_adapters=1, max_bytes=0))
    finally:
        store.close()
    r = put_packed(server, key, "two", packed_adapter(server, tmp_path, 32))
    assert r.status_code == 429 and r.json()["error"]["code"].startswith("quota")
    replaced = put_packed(server, key, "one", packed_adapter(server, tmp_path, 33))
    assert replaced.json()["version"] == one.json()["version"] + 1  # replace ok

    metrics = c.get("/metrics", headers=bearer(server["admin"])).text
    assert 'code="body_too_large"' in metrics and 'tenant="limits"' in metrics
    assert "prefixserve_adapter_cache_misses" in metrics


def test_rate_limits_and_bad_text(server, tmp_path):
    c, key = server["client"], new_tenant(server, "ratelimited")
    admin = bearer(server["admin"])
    assert put_packed(server, key, "m", packed_adapter(server, tmp_path, 41)).status_code == 201
    r = c.get("/v1/tenants/ratelimited/limits", headers=admin)
    assert r.status_code == 200 and r.json()["default"] is True and r.json()["max_concurrent"] == 64
    assert c.get("/v1/tenants/ratelimited/limits", headers=bearer(key)).status_code == 403
    limits = {"requests_per_s": 0.5, "rows_per_s": 0.0, "burst_s": 4.0, "max_concurrent": 4}
    r = c.put("/v1/tenants/ratelimited/limits", json=limits, headers=admin)
    assert r.status_code == 200 and r.json()["default"] is False and r.json()["requests_per_s"] == 0.5
    statuses = [classify(c, key, "m", ["x"]) for _ in range(4)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]  # the burst: 0.5/s x 4 s = 2 requests
    limited = statuses[-1]
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["Retry-After"]) >= 1
    other = new_tenant(server, "unaffected")  # one tenant's limit is not another's
    assert put_packed(server, other, "m", packed_adapter(server, tmp_path, 42)).status_code == 201
    assert all(classify(c, other, "m", ["x"]).status_code == 200 for _ in range(4))
    assert c.put("/v1/tenants/ratelimited/limits", json={"default": True}, headers=admin).json()["default"]

    body = json.dumps({"prefix_id": "m", "inputs": ["fine", "x \ud800 y"]})  # JSON may carry a lone surrogate
    r = c.post("/v1/classify", content=body, headers={**bearer(other), "Content-Type": "application/json"})
    assert (
        r.status_code == 422 and r.json()["error"]["code"] == "bad_text" and "inputs[1]" in r.json()["error"]["message"]
    )


def ingress_process():
    """The Ingress replica's process (this session's Ray cluster, found by its process title)."""
    psutil = pytest.importorskip("psutil")
    for proc in psutil.process_iter(["cmdline"]):
        if any("ServeReplica:prefixserve-test:Ingress" in part for part in proc.info["cmdline"] or ()):
            return proc
    pytest.fail("Ingress replica process not found")


def test_unauthenticated_uploads_cost_nothing(server):
    """8 concurrent unauthenticated 60 MiB uploads: all 401, answered before their bodies are sent, and the
    Ingress grows by far less than one body (it buffered up to 64 MiB each before the key was checked)."""
    import socket
    import threading

    port = int(str(server["client"].base_url).rsplit(":", 1)[1].strip("/"))
    ingress = ingress_process()
    before = ingress.memory_info().rss
    statuses: list[bytes] = []
    size = 60 * 2**20

    def upload(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = (
                f"PUT /v1/prefixes/big{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: {size}\r\n\r\n"
            )
            sock.sendall(head.encode())  # the headers only: the answer must not wait for the body
            statuses.append(sock.recv(64).split(b" ")[1])
            try:  # then push (part of) the body anyway, as an attacker would
                for _ in range(16):
                    sock.sendall(b"\0" * 2**20)
            except OSError:
                pass  # the server closed the connection: good

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    grown = ingress.memory_info().rss - before
    assert statuses == [b"401"] * 8
    print(f"ingress RSS grew by {grown / 2**20:.1f} MiB")
    assert grown <= 64 * 2**20, f"the Ingress grew by {grown / 2**20:.0f} MiB"

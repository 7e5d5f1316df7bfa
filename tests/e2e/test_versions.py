"""End-to-end: versions, rollback (pin) and unpin over HTTP on a real Ray Serve app with two Ingress
and two Worker replicas sharing a real redis-server store. One app for the module.

What it shows: after ``POST .../rollback`` returns, every classify on either replica answers the
pinned version (and its logits); an explicit ``version`` answers that version; unpin and a new upload
serve the newest again; another tenant gets 404 for all of it."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.e2e.test_server import bearer, new_tenant, packed_adapter, put_packed
from tests.fixtures.served_app import GENEROUS_LIMITS, served_app

httpx = pytest.importorskip("httpx")
pytestmark = [pytest.mark.ray, pytest.mark.redis]

TEXTS = ["this movie was really great", "the plot was boring and bad"]
WINDOW_S = 1.0  # how long after a change every answer is checked (the claim: within 1 s)
THREADS = 4


@pytest.fixture(scope="module")
def app(ray_serve, redis_server, tiny_backbones, tmp_path_factory):
    store = redis_server.url + "?prefix=vertest:"
    tmp = tmp_path_factory.mktemp("admin")
    # two Workers and two Ingresses: a pin must reach every one of them
    two = dict(replicas=2, ingress_replicas=2, max_batch_size=8, default_limits=GENEROUS_LIMITS)
    backbone = tiny_backbones["roberta"]
    with served_app(ray_serve, "prefixserve-versions", backbone, store, tmp, **two) as a:
        yield {"client": a.client, "admin": a.admin_key, "fingerprint": a.fingerprint, "backbone": backbone}


def classify(app, key, prefix_id, version=None):
    body: dict = {"prefix_id": prefix_id, "inputs": TEXTS}
    if version is not None:
        body["version"] = version
    return app["client"].post("/v1/classify", json=body, headers=bearer(key))


def scores(response) -> list[dict[str, float]]:
    return [p["scores"] for p in response.json()["predictions"]]


def assert_close(a: list[dict[str, float]], b: list[dict[str, float]], tol: float = 1e-5) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(abs(x[k] - y[k]) <= tol for k in x), (x, y)


def answers_after(app, key, prefix_id, t0: float) -> list[tuple[float, int, str, list]]:
    """Classify from THREADS threads for WINDOW_S: (sent after t0, version, worker replica, scores)."""

    def loop() -> list[tuple[float, int, str, list]]:
        out = []
        while (sent := time.monotonic()) - t0 < WINDOW_S:
            r = classify(app, key, prefix_id)
            assert r.status_code == 200, r.text
            out.append((sent - t0, r.json()["version"], r.headers["x-prefixserve-replica"], scores(r)))
        return out

    with ThreadPoolExecutor(THREADS) as pool:
        return [a for part in pool.map(lambda _: loop(), range(THREADS)) for a in part]


def check_every_answer(app, key, prefix_id, t0: float, want: int, want_scores: list, what: str) -> None:
    """Every classify sent after ``t0`` answers ``want`` with its logits, on both Worker replicas; prints
    the latest send time of a stale answer (the max delay; 0 when none) and when each replica first answered."""
    answers = answers_after(app, key, prefix_id, t0)
    stale = [a for a in answers if a[1] != want]
    first: dict[str, float] = {}
    for sent, version, replica, _ in sorted(answers):
        if version == want:
            first.setdefault(replica, sent)
    max_delay = max((a[0] for a in stale), default=0.0)
    print(
        f"{what}: {len(answers)} classifies in {WINDOW_S} s, {len(stale)} stale; max delay {max_delay:.3f} s; "
        f"first v{want} answer per replica: " + ", ".join(f"{r[-6:]} +{t:.3f} s" for r, t in sorted(first.items()))
    )
    assert not stale, f"{len(stale)} answers after {what} named another version: {[a[:3] for a in stale[:5]]}"
    assert len(first) == 2, f"only {len(first)} Worker replica answered"
    for _, _, _, got in answers:
        assert_close(got, want_scores)


def test_rollback_unpin_and_upload_reach_every_replica(app, tmp_path):
    c, key = app["client"], new_tenant(app, "verco")
    blobs = [packed_adapter(app, tmp_path, seed) for seed in (1, 2, 3)]
    assert put_packed(app, key, "sent", blobs[0]).status_code == 201
    v1_scores = scores(classify(app, key, "sent"))
    assert put_packed(app, key, "sent", blobs[1]).json()["version"] == 2
    v2_scores = scores(classify(app, key, "sent"))
    assert v1_scores != v2_scores
    listing = c.get("/v1/prefixes/sent/versions", headers=bearer(key)).json()
    assert (listing["prefix_id"], listing["current"], listing["pinned"]) == ("sent", 2, None)
    assert [m["version"] for m in listing["versions"]] == [2, 1]  # newest first, PrefixMeta each

    r = c.post("/v1/prefixes/sent/rollback", json={"version": 1}, headers=bearer(key))
    t0 = time.monotonic()
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["prefix_id"] == "sent", r.text
    check_every_answer(app, key, "sent", t0, 1, v1_scores, "rollback to v1")
    r = classify(app, key, "sent", version=2)  # an explicit version while pinned
    assert r.status_code == 200 and r.json()["version"] == 2
    assert_close(scores(r), v2_scores)
    listing = c.get("/v1/prefixes/sent/versions", headers=bearer(key)).json()
    assert (listing["current"], listing["pinned"]) == (2, 1)
    assert c.get("/v1/prefixes/sent", headers=bearer(key)).json()["version"] == 1  # the served one
    assert [p["version"] for p in c.get("/v1/prefixes", headers=bearer(key)).json()["prefixes"]] == [1]

    r = c.delete("/v1/prefixes/sent/pin", headers=bearer(key))
    t0 = time.monotonic()
    assert r.status_code == 200 and r.json()["version"] == 2, r.text
    check_every_answer(app, key, "sent", t0, 2, v2_scores, "unpin")

    assert c.post("/v1/prefixes/sent/rollback", json={"version": 1}, headers=bearer(key)).status_code == 200
    r = put_packed(app, key, "sent", blobs[2])  # a new upload serves, and clears the pin
    t0 = time.monotonic()
    assert r.status_code == 200 and r.json()["version"] == 3, r.text
    v3_scores = scores(classify(app, key, "sent"))
    check_every_answer(app, key, "sent", t0, 3, v3_scores, "upload v3 over the pin")
    listing = c.get("/v1/prefixes/sent/versions", headers=bearer(key)).json()
    assert (listing["current"], listing["pinned"]) == (3, None)
    assert [m["version"] for m in listing["versions"]] == [3, 2, 1]

    for version, status in ((99, 404), (0, 422)):
        r = classify(app, key, "sent", version=version)
        assert r.status_code == status, r.text
    assert classify(app, key, "sent", version=99).json()["error"]["code"] == "not_found"
    r = c.post("/v1/prefixes/sent/rollback", json={"version": 99}, headers=bearer(key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    for body in ({}, {"version": "x"}, {"version": 1, "extra": 1}):
        assert c.post("/v1/prefixes/sent/rollback", json=body, headers=bearer(key)).status_code == 422


def test_another_tenant_gets_404_for_everything(app, tmp_path):
    c = app["client"]
    key_a, key_b = new_tenant(app, "vera"), new_tenant(app, "verb")
    for seed in (4, 5):
        assert put_packed(app, key_a, "mine", packed_adapter(app, tmp_path, seed)).status_code in (200, 201)
    calls = (
        lambda key: c.get("/v1/prefixes/mine/versions", headers=bearer(key)),
        lambda key: c.post("/v1/prefixes/mine/rollback", json={"version": 1}, headers=bearer(key)),
        lambda key: c.delete("/v1/prefixes/mine/pin", headers=bearer(key)),
        lambda key: classify(app, key, "mine", version=1),
    )
    for call in calls:
        r = call(key_b)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
    listing = c.get("/v1/prefixes/mine/versions", headers=bearer(key_a)).json()
    assert (listing["current"], listing["pinned"]) == (2, None)  # B moved nothing
    for call in calls:  # no key: 401 before anything is looked up (or any body read)
        assert call("nope").status_code == 401
    r = c.post("/v1/prefixes/mine/rollback", content=b"{not json", headers=bearer("nope"))
    assert r.status_code == 401

"""Browser: ``/docs`` (Swagger UI) and ``/redoc`` of a deployed app render in a real headless Chromium, offline.

Chromium (Debian's package, ``/usr/bin/chromium``) loads each page with ``--dump-dom``, which runs the
page's JS for up to ``--virtual-time-budget`` ms and prints the resulting DOM: a blank page (assets that
did not load) has no operations in it. ``--host-resolver-rules`` resolves every host but 127.0.0.1 to
nothing, so the browser cannot leave loopback, and its NetLog (``--log-net-log``) lists every request it
started: the page's own requests (those the page initiated) must all go to the server. Chromium's own
background requests (update checks, accounts) are not the page's; they are refused by the resolver rule.

The app is deployed under a route prefix (``/api``), so the asset and OpenAPI URLs must honour
``root_path`` too. Skips only when the binary is missing and ``CI`` is unset (``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# a marker, not a skip in a fixture: the session's Ray cluster would start before the fixture ran
pytestmark = [
    pytest.mark.ray,
    pytest.mark.skipif(
        CHROMIUM is None and not os.environ.get("CI"), reason="no chromium (apt-get install -y chromium)"
    ),
]

PREFIX = "/api"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")


def chromium_binary() -> str:
    if CHROMIUM is None:  # CI is set: the test must run, never skip
        pytest.fail("chromium is missing on CI: .ci/run installs it (apt-get install -y chromium)")
    return CHROMIUM


@pytest.fixture(scope="module")
def docs_app(ray_serve, tiny_backbones, tmp_path_factory):
    from ray import serve

    from prefixserve.server.app import build_app

    chromium = chromium_binary()  # before deploying: fail fast on CI
    root = tmp_path_factory.mktemp("docs")
    settings = dict(
        backbone=tiny_backbones["roberta"],
        store=f"file://{root / 'store'}",
        device="cpu",
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=1,
        admin_key_file=str(root / "admin_key"),
    )
    serve.run(build_app(settings), name="prefixserve-docs", route_prefix=PREFIX)
    try:
        yield {"chromium": chromium, "base": ray_serve.url + PREFIX, "origin": ray_serve.url}
    finally:
        serve.delete("prefixserve-docs")


def render(chromium: str, url: str, workdir: Path) -> tuple[str, list[tuple[str, str | None]]]:
    """The DOM after the page's JS ran, and every request Chromium started as (url, initiator)."""
    workdir.mkdir()
    netlog = workdir / "netlog.json"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={workdir / 'profile'}",  # fresh: no cache, nothing from another run
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",  # nothing can leave loopback
        f"--log-net-log={netlog}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, started_requests(netlog)


def started_requests(netlog: Path) -> list[tuple[str, str | None]]:
    text = netlog.read_text()
    try:
        log = json.loads(text)
    except json.JSONDecodeError:  # a log cut short at exit lacks its closing brackets
        log = json.loads(text.rstrip().rstrip(",") + "]}")
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    params: list[dict[str, Any]] = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    return [(p["url"], p.get("initiator")) for p in params if "url" in p]


def page_requests(requests: list[tuple[str, str | None]], page: str, origin: str) -> list[str]:
    """The page's own requests: the navigation and everything the page initiated."""
    return [url.split("#")[0] for url, initiator in requests if url.split("#")[0] == page or initiator == origin]


def assert_offline(requests: list[tuple[str, str | None]], page: str, origin: str) -> list[str]:
    mine = page_requests(requests, page, origin)
    assert page in mine
    outside = [url for url in mine if not url.startswith(origin + "/")]
    assert not outside, f"the page requested URLs off the server: {outside}"
    return mine


def test_swagger_ui_renders_from_local_assets(docs_app, tmp_path):
    base, origin = docs_app["base"], docs_app["origin"]
    page = f"{base}/docs#/inference/classify_v1_classify_post"  # deep link: classify's panel opens
    dom, requests = render(docs_app["chromium"], page, tmp_path / "swagger")
    mine = assert_offline(requests, page.split("#")[0], origin)
    for asset in ASSETS:
        assert f"{base}/docs/assets/{asset}" in mine, mine
    assert f"{base}/openapi.json" in mine, mine
    # Swagger UI fetched the schema and rendered the operations (a blank page has none)
    assert 'id="operations-inference-classify_v1_classify_post"' in dom
    assert dom.count('class="opblock opblock-') >= 10
    assert "btn authorize" in dom  # the bearer scheme: an "Authorize" button and per-operation locks
    assert "authorization__btn" in dom
    assert "this movie was great" in dom  # classify's open panel shows the request example


def test_redoc_renders_from_local_assets(docs_app, tmp_path):
    base, origin = docs_app["base"], docs_app["origin"]
    page = f"{base}/redoc"
    dom, requests = render(docs_app["chromium"], page, tmp_path / "redoc")
    mine = assert_offline(requests, page, origin)
    assert f"{base}/docs/assets/redoc.standalone.js" in mine, mine
    assert f"{base}/openapi.json" in mine, mine
    assert 'id="operation/classify_v1_classify_post"' in dom
    assert "Authorizations:" in dom  # ReDoc lists the bearer scheme on secured operations
    assert "Something went wrong" not in dom


def test_docs_assets_need_no_key_but_the_api_does(docs_app):
    with httpx.Client(base_url=docs_app["base"], timeout=30.0) as c:
        r = c.get("/docs/assets/swagger-ui-bundle.js")
        assert r.status_code == 200 and "javascript" in r.headers["content-type"]
        assert c.get("/docs/assets/nope.js").status_code == 404
        assert c.get("/v1/prefixes").status_code == 401
        schema = c.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

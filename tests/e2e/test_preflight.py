"""``prefixserve serve`` preflight (busy port, unusable store, unloadable backbone: each one line, exit 2, in
seconds, measured and printed), 415s after authentication, and the quickstart's printed commands run twice
against one served app (the second run finds tenant ``acme`` and the demo from the first)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
PYTHON = sys.executable
LIMIT_S = 10.0  # the brief: an unloadable backbone fails within 10 s


def serve(*argv: str, env: dict[str, str] | None = None) -> tuple[int, list[str], float]:
    """Run ``prefixserve serve`` in a subprocess: (exit status, non-empty stderr lines, seconds to fail)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXSERVE_", "HF_"))}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", "prefixserve.server.main", "serve", *argv],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - t0
    return proc.returncode, [x for x in proc.stderr.splitlines() if x.strip()], elapsed


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error(code: int, lines: list[str], elapsed: float, what: str) -> dict[str, str]:
    print(f"\npreflight {what}: exit {code} after {elapsed:.2f} s: {lines}")
    assert code == 2 and len(lines) == 1, lines
    return json.loads(lines[0])["error"]


def test_busy_port_names_port_and_process(tiny_backbones, tmp_path):
    with socket.socket() as taken:  # no SO_REUSEPORT: what a plain server holds
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, lines, elapsed = serve(
            "--backbone", tiny_backbones["roberta"], "--store", "memory://", "--port", str(port)
        )
    error = one_error(code, lines, elapsed, "busy port")
    assert error["code"] == "port_in_use" and f"port {port}" in error["message"]
    assert f"pid {os.getpid()} (" in error["message"], error  # this test process holds it
    assert elapsed < LIMIT_S and not (tmp_path / "admin_key").exists()


def test_unreachable_redis_store(tiny_backbones):
    port = closed_port()
    code, lines, elapsed = serve(
        "--backbone", tiny_backbones["roberta"], "--store", f"redis://127.0.0.1:{port}/0", "--port", str(closed_port())
    )
    error = one_error(code, lines, elapsed, "unreachable store")
    assert error["code"] == "store_unavailable" and f"127.0.0.1:{port}" in error["message"]
    assert elapsed < LIMIT_S


def test_unwritable_file_store(tiny_backbones, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # the store root would be under a regular file: cannot be made
    code, lines, elapsed = serve(
        "--backbone", tiny_backbones["roberta"], "--store", f"file://{blocker}/store", "--port", str(closed_port())
    )
    error = one_error(code, lines, elapsed, "unwritable file store")
    assert error["code"] == "store_unavailable" and elapsed < LIMIT_S


@pytest.fixture
def silent_hub():
    """A loopback 'hub' that accepts connections and never answers (what a black-holed network does)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("case", ["offline", "silent hub", "refused hub", "missing folder"])
def test_unloadable_backbone_fails_fast(case, silent_hub, tmp_path):
    name, env = "nonexistent-org/nonexistent-model", {"HF_HOME": str(tmp_path / "hf")}
    if case == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    elif case == "silent hub":
        env["HF_ENDPOINT"] = silent_hub
    elif case == "refused hub":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{closed_port()}"
    else:
        name = str(tmp_path / "no-such-folder")
    code, lines, elapsed = serve("--backbone", name, "--store", "memory://", "--port", str(closed_port()), env=env)
    error = one_error(code, lines, elapsed, f"backbone ({case})")
    assert error["code"] == "backbone_unavailable" and name in error["message"]
    assert elapsed < LIMIT_S


# ---- one served app: 415s and the quickstart's commands ----------------------------------------------
@pytest.fixture(scope="module")
def app(ray_serve, tiny_backbones, tmp_path_factory):
    from ray import serve as ray_serve_api

    from prefixserve.server.app import build_app
    from prefixserve.server.auth import resolve_admin_key

    home = tmp_path_factory.mktemp("quickstart")
    admin_key, admin_file = resolve_admin_key(home / "admin_key")
    settings = dict(
        backbone=tiny_backbones["roberta"],
        store=f"file://{home / 'store'}",
        device="cpu",
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=1,
        admin_key_file=str(home / "admin_key"),
    )
    ray_serve_api.run(build_app(settings), name="prefixserve-preflight", route_prefix="/")
    client = httpx.Client(base_url=ray_serve.url, timeout=60.0)
    assert client.get("/readyz").status_code == 200
    yield {"url": ray_serve.url, "client": client, "admin": admin_key, "admin_file": admin_file, "home": home}
    client.close()
    ray_serve_api.delete("prefixserve-preflight")


def test_wrong_content_type_is_415_after_auth(app):
    c, admin = app["client"], {"Authorization": f"Bearer {app['admin']}"}
    r = c.post("/v1/tenants", json={"tenant": "mediaco"}, headers=admin)
    key = {"Authorization": f"Bearer {r.json()['api_key']}"}
    for path, method in (("/v1/prefixes/p", "PUT"), ("/v1/classify", "POST")):
        r = c.request(method, path, content=b"x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 401, r.text  # strangers learn nothing, not even the media type
        for bad in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
            r = c.request(method, path, content=b"x", headers={**key, "Content-Type": bad})
            assert r.status_code == 415, (path, bad, r.text)
            assert r.json()["error"]["code"] == "unsupported_media_type"
    r = c.post("/v1/classify", json={"prefix_id": "none", "inputs": ["a"]}, headers=key)
    assert r.status_code == 404  # the right type passes on to the route


def printed_commands(text: str) -> str:
    """The shell lines of ``howto()``: comments dropped, continuation lines kept."""
    body = text.split("copy-paste into another terminal):", 1)[1].split("API docs:", 1)[0]
    return "\n".join(line for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_quickstart_commands_work_twice(app, monkeypatch):
    from prefixserve.server import quickstart

    monkeypatch.setattr(quickstart, "HOME", Path(app["home"]))
    backbone = httpx.get(f"{app['url']}/readyz").json()["backbone"]
    for run in (1, 2):
        key_file = quickstart.install_demo(app["url"], app["admin"], backbone)
        script = printed_commands(quickstart.howto(app["url"], app["admin_file"], key_file))
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-eu", "-c", script], capture_output=True, text=True, timeout=120)
        print(f"\nquickstart run {run}: commands took {time.perf_counter() - t0:.2f} s")
        assert proc.returncode == 0, proc.stderr
        decoder, out, replies = json.JSONDecoder(), proc.stdout.strip(), []
        while out:
            reply, end = decoder.raw_decode(out)
            replies.append(reply)
            out = out[end:].strip()
        assert len(replies) == 4, replies  # classify demo, PUT PEFT folder, PUT packed, classify
        assert not [r for r in replies if "error" in r], replies
        assert [r["prefix_id"] for r in replies] == ["demo-sentiment", "sentiment", "sentiment-packed", "sentiment"]
        assert replies[1]["version"] == run and len(replies[3]["predictions"]) == 2

"""Local mode (``prefixserve serve``, ``make run``, the test cluster) keeps Ray to this machine.

* Every socket that a process of the local Ray cluster listens on (GCS, raylet, agents, dashboard
  head, autoscaler monitor, core workers, the Serve proxy, each replica's inter-deployment gRPC
  server) is bound to loopback. The cluster is the session one (``ray_serve``), started by
  ``server.app.start_ray`` as ``prefixserve serve`` starts it, with the real app deployed on it; its
  processes are the pytest process and its descendants. Only loopback is ever contacted.
* ``prefixserve serve`` on a taken port refuses (``port_in_use``, exit 2) before it starts Ray or
  writes the admin key: Serve's proxy binds with SO_REUSEPORT and would otherwise share the port.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any

import psutil
import pytest

httpx = pytest.importorskip("httpx")

APP = "prefixserve-local-mode"
ROUTE = "/"  # the Ingress's public paths (/readyz) are matched without a route prefix


@dataclass(frozen=True)
class Listener:
    ip: str
    port: int
    kind: str  # tcp (listening) | udp (bound)
    pid: int
    process: str  # Ray sets the title of its workers: ray::ServeReplica:<app>:<deployment>, ray::ProxyActor

    def __str__(self) -> str:
        return f"{self.kind} {self.ip}:{self.port} pid {self.pid} {self.process}"


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback  # ::ffff:127.0.0.1: a dual-stack socket on IPv4 loopback
    return addr.is_loopback


def local_listeners() -> list[Listener]:
    """Listening TCP and bound UDP sockets of this process and all its descendants (the local Ray)."""
    me = psutil.Process()
    found: set[Listener] = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            title = " ".join(proc.cmdline())[:100]
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):  # an idle worker that just exited
            continue
        for c in conns:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                found.add(Listener(c.laddr.ip, c.laddr.port, "tcp", proc.pid, title))
            elif c.type == socket.SOCK_DGRAM and not c.raddr:
                found.add(Listener(c.laddr.ip, c.laddr.port, "udp", proc.pid, title))
    return sorted(found, key=lambda x: (x.process, x.port))


def test_is_loopback():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5", "fe80::1%eth0"]))


def test_loopback_bind_address():
    from prefixserve.server.app import loopback_bind_address

    assert loopback_bind_address("[::]:0") == "127.0.0.1:0"
    assert loopback_bind_address("0.0.0.0:9000") == "127.0.0.1:9000"
    assert loopback_bind_address(":9000") == "127.0.0.1:9000"
    for kept in ("127.0.0.1:0", "[::1]:0", "10.1.2.3:9000", "unix:/tmp/sock"):
        assert loopback_bind_address(kept) == kept


@pytest.fixture(scope="module")
def local_app(ray_serve, tiny_backbones, tmp_path_factory):
    """The real app (Ingress -> Worker on a tiny RoBERTa, memory:// store) on the session cluster."""
    from ray import serve

    from prefixserve.server.app import build_app

    settings = dict(
        backbone=tiny_backbones["roberta"],
        store="memory://",
        device="cpu",
        replicas=1,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=1,
        admin_key_file=str(tmp_path_factory.mktemp("admin") / "admin_key"),
    )
    serve.run(build_app(settings), name=APP, route_prefix=ROUTE)
    with httpx.Client(base_url=ray_serve.url, timeout=60.0) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
    yield ray_serve
    serve.delete(APP)


@pytest.mark.ray
def test_every_ray_listener_is_on_loopback(local_app):
    listeners = local_listeners()
    shown = "\n  ".join(map(str, listeners))
    # the walk found the cluster: the HTTP proxy, and a listener (inter-deployment gRPC) in each replica
    assert any(x.port == local_app.port and "ProxyActor" in x.process for x in listeners), shown
    for deployment in ("Ingress", "Worker"):
        assert any(f"ServeReplica:{APP}:{deployment}" in x.process for x in listeners), shown
    exposed = [x for x in listeners if not is_loopback(x.ip)]
    assert not exposed, "Ray listens beyond loopback:\n  " + "\n  ".join(map(str, exposed))


@pytest.fixture()
def no_ray(monkeypatch) -> list[Any]:
    """Replaces ``start_ray`` where ``run_local`` calls it: a call is recorded and fails the test."""
    from prefixserve.server import app

    calls: list[Any] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))
        raise AssertionError("Ray was started although the port is taken")

    monkeypatch.setattr(app, "start_ray", refuse)
    return calls


def occupy(reuse_port: bool) -> socket.socket:
    """A listener on a free loopback port; ``reuse_port`` as Serve's proxy binds (another prefixserve)."""
    sock = socket.socket()
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_serve_refuses_a_port_in_use(reuse_port, no_ray, tmp_path, monkeypatch, capsys):
    from prefixserve.server.auth import ADMIN_KEY_ENV
    from prefixserve.server.main import main

    monkeypatch.delenv(ADMIN_KEY_ENV, raising=False)
    key_file = tmp_path / "admin_key"
    with occupy(reuse_port) as taken:
        port = taken.getsockname()[1]
        argv = ["serve", "--backbone", str(tmp_path / "no-such-backbone"), "--store", "memory://"]
        code = main([*argv, "--port", str(port), "--admin-key-file", str(key_file)])
    error = json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]
    assert code == 2
    assert error["code"] == "port_in_use", error
    assert f"port {port} on 127.0.0.1 is already in use" in error["message"]
    assert no_ray == [] and not key_file.exists()  # refused before Ray or the admin key


def test_port_check_covers_wildcard_and_lets_time_wait_pass():
    from prefixserve.adapters.errors import PrefixServeError
    from prefixserve.server.app import ensure_port_free

    with occupy(reuse_port=True) as taken:
        port = taken.getsockname()[1]
        for host in ("127.0.0.1", "0.0.0.0", "localhost"):
            with pytest.raises(PrefixServeError) as info:
                ensure_port_free(host, port)
            assert (info.value.code, info.value.status) == ("port_in_use", 409)
    # a Serve proxy that just stopped (SO_REUSEADDR, as Ray binds it) leaves TIME_WAIT: the port is free again
    with occupy(reuse_port=True) as server:
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
        time.sleep(0.05)
        client.close()
    ensure_port_free("127.0.0.1", port)


def test_run_local_checks_the_port_before_ray(no_ray):
    from prefixserve.adapters.errors import PrefixServeError
    from prefixserve.server.app import run_local
    from prefixserve.server.schemas import AppSettings

    with occupy(reuse_port=True) as taken, pytest.raises(PrefixServeError, match="already in use"):
        run_local(AppSettings(backbone="no-such-backbone"), port=taken.getsockname()[1])
    assert no_ray == []

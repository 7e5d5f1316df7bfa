"""What deploy/ relies on at run time, exercised for real on this machine (loopback only, no cluster):

* a Worker whose backbone is not the pinned ``backbone_fingerprint`` refuses to start (and one that is starts);
* secrets as files: the Redis password and the metrics token from ``*_FILE`` (the env still wins);
* deploy/base/redis-start.sh + redis.conf run a real redis-server: TLS only when a certificate is mounted,
  the password from the mounted file, the exporter's password map; the store connects with exactly the
  gpu-prod URL form (``rediss://...?ssl_cert_reqs=required&ssl_ca_certs=...``) and nothing weaker works.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, cast

import pytest

from prefixserve.server.app import free_port

BASE = Path(__file__).resolve().parents[2] / "deploy" / "base"


# ---------------------------------------------------------------------------------------- fingerprint pin
def test_worker_refuses_a_backbone_other_than_the_pinned_one(tiny_backbones, tmp_path):
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.errors import FingerprintMismatchError
    from prefixserve.server.schemas import AppSettings
    from prefixserve.server.worker import Worker

    roberta = load_backbone(tiny_backbones["roberta"], device="cpu").fingerprint
    bert = load_backbone(tiny_backbones["bert"], device="cpu").fingerprint
    assert roberta != bert
    store = f"file://{tmp_path / 'store'}"
    common = dict(store=store, device="cpu", torch_threads=1)
    replica = cast(Any, Worker).func_or_class(
        AppSettings.without_env(backbone=tiny_backbones["roberta"], backbone_fingerprint=roberta, **common)
    )
    assert replica.info().fingerprint == roberta
    with pytest.raises(FingerprintMismatchError, match="refuses to serve") as err:
        cast(Any, Worker).func_or_class(
            AppSettings.without_env(backbone=tiny_backbones["bert"], backbone_fingerprint=roberta, **common)
        )
    assert bert in str(err.value) and err.value.code == "backbone_mismatch"
    unpinned = AppSettings.without_env(backbone=tiny_backbones["bert"], **common)  # None: no pin (local use)
    assert cast(Any, Worker).func_or_class(unpinned).info().fingerprint == bert


# ------------------------------------------------------------------------------------------ secret files
def test_secrets_from_files(tmp_path, monkeypatch):
    from prefixserve.adapters.store.keys import resolve_pepper
    from prefixserve.adapters.store.redis_common import parse_redis_url
    from prefixserve.server.auth import resolve_metrics_token

    for name in ("PREFIXSERVE_REDIS_PASSWORD", "PREFIXSERVE_METRICS_TOKEN", "PREFIXSERVE_KEY_PEPPER"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"{name}_FILE", raising=False)
    assert parse_redis_url("redis://h:6379/0")[2] is None and resolve_metrics_token() is None
    assert resolve_pepper() == b""
    (tmp_path / "pepper").write_text("pepper-from-file\n")
    monkeypatch.setenv("PREFIXSERVE_KEY_PEPPER_FILE", str(tmp_path / "pepper"))
    assert resolve_pepper() == b"pepper-from-file"
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "token").write_text("  tok \n")
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD_FILE", str(tmp_path / "pw"))
    monkeypatch.setenv("PREFIXSERVE_METRICS_TOKEN_FILE", str(tmp_path / "token"))
    assert parse_redis_url("redis://h:6379/0")[2] == "from-file"
    assert resolve_metrics_token() == "tok"
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "from-env")  # the env value still wins
    assert parse_redis_url("redis://h:6379/0")[2] == "from-env"
    assert parse_redis_url("redis://:in-url@h:6379/0")[2] == "in-url"  # and the URL over both
    monkeypatch.setenv("PREFIXSERVE_METRICS_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):  # a named file that is not there is an error, not "no token"
        resolve_metrics_token()


# --------------------------------------------------------------------------------- Redis, as deployed
def make_certificates(folder: Path) -> None:
    """A CA and a server certificate for 127.0.0.1 / localhost / prefixserve-redis (the layout cert-manager writes)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key, issuer: str, issuer_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("prefixserve-redis"), x509.DNSName("localhost")]
            builder = builder.add_extension(
                x509.SubjectAlternativeName([*names, x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(cert("test-ca", ca_key, "test-ca", ca_key, True).public_bytes(pem))
    (folder / "tls.crt").write_bytes(cert("prefixserve-redis", key, "test-ca", ca_key, False).public_bytes(pem))
    no_encryption = serialization.NoEncryption()
    (folder / "tls.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, no_encryption))


def start_deployed_redis(tmp_path: Path, tls: bool) -> tuple[subprocess.Popen, dict[str, str]]:
    """deploy/base/redis-start.sh with deploy/base/redis.conf, paths moved under tmp_path, bound to loopback."""
    run, data, certs = tmp_path / "run", tmp_path / "data", tmp_path / "tls"
    for folder in (run, data, certs):
        folder.mkdir(parents=True)
    if tls:
        make_certificates(certs)
    conf = (BASE / "redis.conf").read_text()
    conf = conf.replace("dir /data", f"dir {data}").replace("bind 0.0.0.0", "bind 127.0.0.1")
    conf = conf.replace("include /run/redis/runtime.conf", f"include {run}/runtime.conf")
    (tmp_path / "redis.conf").write_text(conf)
    (tmp_path / "password").write_text("s3cretpassword0\n")
    env = {
        **os.environ,
        "REDIS_PASSWORD_FILE": str(tmp_path / "password"),
        "REDIS_MAXMEMORY": "64mb",
        "REDIS_RUN_DIR": str(run),
        "REDIS_TLS_DIR": str(certs),
        "REDIS_PORT": str(free_port()),
        "REDIS_CONF": str(tmp_path / "redis.conf"),
    }
    proc = subprocess.Popen(["sh", str(BASE / "redis-start.sh")], env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the pod's readiness probe, verbatim
        ping = subprocess.run(["sh", str(BASE / "redis-cli.sh"), "ping"], env=env, capture_output=True, text=True)
        if ping.stdout.strip() == "PONG":
            return proc, env
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"redis-start.sh did not bring Redis up: {ping.stderr}")


@pytest.fixture
def deployed_redis(tmp_path):
    procs = []

    def start(tls: bool):
        proc, env = start_deployed_redis(tmp_path / ("tls" if tls else "plain"), tls)
        procs.append(proc)
        return env

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_deployed_redis_speaks_tls_only_and_the_store_connects(deployed_redis, monkeypatch):
    from prefixserve.adapters.errors import StoreUnavailableError
    from prefixserve.adapters.store import open_store

    env = deployed_redis(tls=True)
    port, certs, run = env["REDIS_PORT"], Path(env["REDIS_TLS_DIR"]), Path(env["REDIS_RUN_DIR"])
    assert oct((run / "runtime.conf").stat().st_mode & 0o777) == "0o600"
    assert json.loads((run / "exporter-passwords.json").read_text()) == {
        f"rediss://localhost:{port}": "s3cretpassword0"
    }
    monkeypatch.delenv("PREFIXSERVE_REDIS_PASSWORD", raising=False)
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD_FILE", env["REDIS_PASSWORD_FILE"])
    # gpu-prod's store URL form (deploy/overlays/gpu-prod/serve_config.yaml), pointed at this server
    url = f"rediss://127.0.0.1:{port}/0?prefix=t:&ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}"
    store = open_store(url, retries=0)
    store.create_tenant("acme")
    assert store.tenant_info("acme") is not None
    store.close()
    for weaker in (
        f"redis://127.0.0.1:{port}/0",  # plaintext: no such listener
        f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required",  # a CA the server's certificate is not from
    ):
        with pytest.raises(StoreUnavailableError):
            open_store(weaker, retries=0).tenant_info("acme")
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "wrong")  # the right TLS, the wrong password
    with pytest.raises(Exception, match="(?i)invalid|auth|WRONGPASS"):
        open_store(url, retries=0).tenant_info("acme")


def test_the_deployed_redis_without_a_certificate_is_plaintext_with_a_password(deployed_redis):
    import redis

    env = deployed_redis(tls=False)
    client = redis.Redis(host="127.0.0.1", port=int(env["REDIS_PORT"]), password="s3cretpassword0")
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    client.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=int(env["REDIS_PORT"])).get("x")

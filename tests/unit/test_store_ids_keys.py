"""Id rules, path-traversal guards, API-key hashing, URL parsing, and atomic quotas under concurrency."""

from __future__ import annotations

import os

import pytest

from prefixserve.adapters.errors import BadRequestError, InvalidIdError
from prefixserve.adapters.store import open_store
from prefixserve.adapters.store.ids import check_id, check_version, safe_join
from prefixserve.adapters.store.keys import hash_secret, new_key, parse_api_key, verify
from prefixserve.adapters.store.redis_store import parse_redis_url


def ok(data: bytes) -> dict:
    return {"kind": "prefix", "num_virtual_tokens": 1, "labels": ["a"], "fingerprint": "fp"}


@pytest.mark.parametrize("good", ["a", "A9", "sentiment", "klue.roberta_v2-final", "0" * 128])
def test_valid_ids(good):
    assert check_id(good) == good


@pytest.mark.parametrize(
    "bad",
    ["", ".", "..", "../x", "x/..", "/abs", "a/b", "-lead", "_lead", "x" * 129, "a b", "a:b", "a\nb", "ü", "a%2fb"],
)
def test_invalid_ids(bad):
    with pytest.raises(InvalidIdError):
        check_id(bad)


@pytest.mark.parametrize("bad", [0, -1, "1.5", "x", None, True, "01a"])
def test_invalid_versions(bad):
    with pytest.raises(InvalidIdError):
        check_version(bad)


def test_resolved_paths_stay_under_the_root_even_through_symlinks(tmp_path):
    store = open_store(f"file://{tmp_path}/root", validator=ok)
    outside = tmp_path / "outside"
    (outside / "adapters").mkdir(parents=True)
    os.symlink(outside, tmp_path / "root" / "tenants" / "evil")  # planted by someone with disk access
    with pytest.raises(InvalidIdError):
        store.put("evil", "x", b"data")
    with pytest.raises(InvalidIdError):
        store.get("evil", "x")
    assert list(outside.rglob("*")) == [outside / "adapters"]
    with pytest.raises(InvalidIdError):
        safe_join(tmp_path, "..", "etc")


def test_api_keys_are_hashed_with_salt_and_pepper():
    key, rec = new_key("acme", b"pepper")
    parsed = parse_api_key(key)
    assert parsed is not None
    key_id, secret = parsed
    assert rec["key_id"] == key_id and secret not in str(rec) and rec["tenant"] == "acme"
    assert verify(secret, rec, b"pepper") == "acme"
    assert verify(secret, rec, b"other pepper") is None  # the pepper is needed to check a key
    assert hash_secret(secret, "salt1", b"p") != hash_secret(secret, "salt2", b"p")
    for bad in ("", "psk_", "psk_zz_secret", f"psk_{key_id}_short", "nope", 5, None):
        assert parse_api_key(bad) is None


def test_pepper_from_env_must_match(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_KEY_PEPPER", "one")
    key = open_store(f"file://{tmp_path}", validator=ok).create_tenant("acme")
    assert open_store(f"file://{tmp_path}", validator=ok).authenticate(key) == "acme"
    monkeypatch.setenv("PREFIXSERVE_KEY_PEPPER", "two")
    assert open_store(f"file://{tmp_path}", validator=ok).authenticate(key) is None


def test_store_urls(tmp_path, monkeypatch):
    assert parse_redis_url("redis://:pw@h:1/2?prefix=x:") == ("redis://:pw@h:1/2", "x:", "pw")
    monkeypatch.setenv("PREFIXSERVE_REDIS_PASSWORD", "envpw")
    assert parse_redis_url("rediss://h/0")[1:] == ("ps:", "envpw")
    mem = open_store("memory://", validator=ok)
    mem.create_tenant("acme")
    assert mem.put("acme", "x", b"1").version == 1
    for bad in ("ftp://x", "file://", "nothing"):
        with pytest.raises(BadRequestError):
            open_store(bad)
    monkeypatch.setenv("PREFIXSERVE_STORE", f"file://{tmp_path}/env")
    assert open_store(validator=ok).url == f"file://{tmp_path}/env"


def test_redis_replies_that_refuse_writes_are_recognised():
    import redis.exceptions as rex

    from prefixserve.adapters.store.redis_common import refusal

    assert refusal(rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")) is not None
    assert refusal(rex.ReadOnlyError("You can't write against a read only replica. script: ab, on @user_script:1."))
    assert refusal(rex.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."))
    assert refusal(rex.ResponseError("BUSY Redis is busy running a script.")) is not None
    in_multi = rex.ResponseError("Command # 1 (SET ps:b:acme:x:2 ...) of pipeline caused error: MISCONF Redis is ...")
    assert refusal(in_multi) is not None  # how redis-py reports a refusal inside MULTI/EXEC
    for other in (rex.ResponseError("ERR unknown command"), rex.ResponseError("WRONGTYPE Operation"), ValueError("x")):
        assert refusal(other) is None  # a real bug stays a 500


def test_os_errors_are_named_without_their_path():
    import errno

    from prefixserve.adapters.store.file_base import os_reason

    exc = OSError(errno.EROFS, os.strerror(errno.EROFS), "/secret/store/tenants/acme/tenant.json")
    assert os_reason(exc) == "EROFS: Read-only file system" and "secret" not in os_reason(exc)
    assert os_reason(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))).startswith("ENOSPC")


def test_version_info_matches_only_its_own_bytes_and_tenant_info_carries_limits():
    import hashlib

    from prefixserve.adapters.ratelimit import RateLimits
    from prefixserve.adapters.store import Quota, TenantInfo, VersionInfo

    info = VersionInfo("acme", "m", 1, hashlib.sha256(b"abc").hexdigest(), 3)
    assert info.matches(b"abc") and not info.matches(b"abd") and not info.matches(b"abcd")
    assert TenantInfo("acme", Quota()).to_dict()["limits"] is None
    limits = RateLimits(requests_per_s=2, max_concurrent=3)
    assert TenantInfo("acme", Quota(), limits=limits).to_dict()["limits"] == limits.to_dict()

"""API keys: ``psk_<key id>_<secret>``, shown once, stored only as a salted, peppered HMAC.

Decision: HMAC-SHA256(pepper, salt || secret), not scrypt. The secret is 256 random bits
(``secrets.token_urlsafe(32)``), so a slow hash buys nothing against brute force, while
``authenticate`` runs on every request and must stay in the microseconds. The per-key salt makes
equal secrets hash differently; the pepper (env ``PREFIXSERVE_KEY_PEPPER``, a file named by
``PREFIXSERVE_KEY_PEPPER_FILE``, or the ``pepper=`` store
option) lives outside the store, so a leaked store dump alone cannot even confirm a guessed key.
Changing the pepper invalidates every key (rotate them all). Without a pepper the store still
works (salted HMAC with an empty key) and logs a warning once.

The key id (16 hex chars) is a public handle embedded in the key: lookup is one GET by id, never
a scan, and the comparison is ``hmac.compare_digest`` (constant time).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import time

KEY_PREFIX = "psk_"
PEPPER_ENV = "PREFIXSERVE_KEY_PEPPER"
_KEY_RE = re.compile(r"psk_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})")
_log = logging.getLogger(__name__)
_warned = False


def env_secret(name: str) -> str | None:
    """A secret from env ``name``, else from the file env ``<name>_FILE`` names (a mounted Kubernetes Secret:
    the value stays out of the process environment); None when neither is set. Surrounding whitespace is
    dropped (``echo`` and editors add a newline). A named file that cannot be read is an error, not None."""
    value = os.environ.get(name, "").strip()
    if value:
        return value
    path = os.environ.get(f"{name}_FILE", "").strip()
    if not path:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


def resolve_pepper(pepper: str | bytes | None = None) -> bytes:
    """The server pepper: explicit option, else env ``PREFIXSERVE_KEY_PEPPER`` or the file
    ``PREFIXSERVE_KEY_PEPPER_FILE`` names (:func:`env_secret`), else empty (warned)."""
    global _warned
    if pepper is None:
        pepper = env_secret(PEPPER_ENV) or ""
    if isinstance(pepper, str):
        pepper = pepper.encode()
    if not pepper and not _warned:
        _warned = True
        _log.warning("%s is not set: API key hashes are salted but not peppered", PEPPER_ENV)
    return pepper


def hash_secret(secret: str, salt: str, pepper: bytes) -> str:
    return hmac.new(pepper, salt.encode() + b"\x00" + secret.encode(), hashlib.sha256).hexdigest()


def parse_api_key(api_key) -> tuple[str, str] | None:
    """(key id, secret), or None for anything that is not shaped like one of our keys."""
    if not isinstance(api_key, str):
        return None
    m = _KEY_RE.fullmatch(api_key.strip())
    return (m.group(1), m.group(2)) if m else None


def new_key(tenant: str, pepper: bytes) -> tuple[str, dict]:
    """A fresh API key (returned once) and the record to store for it (no secret inside)."""
    key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
    record = {
        "key_id": key_id,
        "tenant": tenant,
        "salt": salt,
        "hash": hash_secret(secret, salt, pepper),
        "created": time.time(),
    }
    return f"{KEY_PREFIX}{key_id}_{secret}", record


def verify(secret: str, record: dict | None, pepper: bytes) -> str | None:
    """The record's tenant if ``secret`` matches it (constant-time), else None."""
    if not record or "hash" not in record or "salt" not in record:
        return None
    want = str(record["hash"]).encode()
    got = hash_secret(secret, str(record["salt"]), pepper).encode()
    return str(record["tenant"]) if hmac.compare_digest(want, got) else None

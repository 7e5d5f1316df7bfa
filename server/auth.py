"""Bearer-key authentication: one admin key (env or a 0600 file) and tenant keys from the store.

Decisions:
* Admin key source, in order: env ``PREFIXSERVE_ADMIN_KEY``; else the key file (``admin_key_file``
  setting, default ``~/.prefixserve/admin_key``), created with mode 0600 and ``O_EXCL`` when absent,
  so the launcher and every Ingress replica on that machine agree on one key without passing the
  secret through Ray (its GCS and dashboard would show actor arguments). On Kubernetes, set the env
  var from a Secret.
* The admin key is kept only as a sha256 digest and compared with ``hmac.compare_digest``.
* Tenant keys go to ``store.authenticate`` (salted, peppered HMAC; constant time there).
* A missing or malformed header and a wrong key get the same 401: no hint which part was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from prefixserve.adapters.errors import AuthError

ADMIN_KEY_ENV = "PREFIXSERVE_ADMIN_KEY"
DEFAULT_ADMIN_KEY_FILE = Path.home() / ".prefixserve" / "admin_key"
ADMIN_PREFIX = "psa_"


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def resolve_admin_key(key_file: str | os.PathLike | None = None) -> tuple[str, Path | None]:
    """(admin key, the file it lives in or None when it came from the env)."""
    env = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if env:
        return env, None
    path = Path(key_file).expanduser() if key_file else DEFAULT_ADMIN_KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise AuthError(f"admin key file {path} is empty; delete it or set {ADMIN_KEY_ENV}") from None
        return key, path
    key = ADMIN_PREFIX + secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key, path


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, else ``AuthError``."""
    if not authorization:
        raise AuthError("missing Authorization: Bearer <api key>")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing Authorization: Bearer <api key>")
    return token.strip()


class Authenticator:
    """Resolves a bearer token to ``"admin"`` or a tenant name (``store.authenticate``)."""

    def __init__(self, store, admin_key: str):
        self.store = store
        self._admin = _digest(admin_key)

    def is_admin(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._admin)

    def admin(self, authorization: str | None) -> None:
        if not self.is_admin(bearer(authorization)):
            raise AuthError("this endpoint needs the admin key")

    def tenant(self, authorization: str | None) -> str:
        """Blocking (one store lookup): call from a worker thread in async code."""
        token = bearer(authorization)
        tenant = None if self.is_admin(token) else self.store.authenticate(token)
        if not tenant:
            raise AuthError("invalid API key")
        return tenant

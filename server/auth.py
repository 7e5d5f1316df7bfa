"""Bearer-key authentication: one admin key (env or a 0600 file) and tenant keys from the store.

Decisions:
* Admin key source, in order: env ``PREFIXSERVE_ADMIN_KEY``; else the key file (``admin_key_file``
  setting, default ``~/.prefixserve/admin_key``), created with mode 0600 and ``O_EXCL`` when absent,
  so the launcher and every Ingress replica on that machine agree on one key without passing the
  secret through Ray (its GCS and dashboard would show actor arguments). On Kubernetes, point
  ``admin_key_file`` at a mounted Secret (deploy/): a file, not an env var, so it is in no process
  environment that Ray copies into its workers or shows on its dashboard.
* The admin key is kept only as a sha256 digest and compared with ``hmac.compare_digest``.
* Tenant keys go to ``store.authenticate`` (salted, peppered HMAC; constant time there).
* A missing or malformed header and a wrong key get the same 401: no hint which part was wrong. A valid
  key on a route of another role (a tenant key on an admin route) gets 403.
* ``/metrics`` wants the admin key or the metrics token (env ``PREFIXSERVE_METRICS_TOKEN``, or a file that
  ``PREFIXSERVE_METRICS_TOKEN_FILE`` names): its series are labelled by tenant name, which no tenant may read.
* Every request is authenticated from its headers (:mod:`.middleware`) before any byte of its body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefixserve.adapters.errors import AuthError
from prefixserve.adapters.store import AdapterStore
from prefixserve.adapters.store.keys import env_secret

ADMIN_KEY_ENV = "PREFIXSERVE_ADMIN_KEY"
METRICS_TOKEN_ENV = "PREFIXSERVE_METRICS_TOKEN"
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


def resolve_metrics_token() -> str | None:
    """The metrics token: env ``PREFIXSERVE_METRICS_TOKEN``, else the file ``PREFIXSERVE_METRICS_TOKEN_FILE`` names."""
    return env_secret(METRICS_TOKEN_ENV)


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, else ``AuthError``."""
    if not authorization:
        raise AuthError("missing Authorization: Bearer <api key>")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing Authorization: Bearer <api key>")
    return token.strip()


@dataclass(frozen=True)
class Principal:
    """Who a request is: the admin, a tenant (``name``), or the metrics scraper."""

    role: Literal["admin", "tenant", "metrics"]
    name: str


class Authenticator:
    """Resolves a bearer token to a :class:`Principal` (admin key, metrics token, or ``store.authenticate``)."""

    def __init__(self, store: AdapterStore, admin_key: str, metrics_token: str | None = None):
        self.store = store
        self._admin = _digest(admin_key)
        self._metrics = _digest(metrics_token) if metrics_token else None

    def is_admin(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._admin)

    def principal(self, authorization: str | None) -> Principal:
        """Blocking (at most one store lookup): call from a worker thread in async code. 401 if unknown."""
        token = bearer(authorization)
        if self.is_admin(token):
            return Principal("admin", "admin")
        if self._metrics is not None and hmac.compare_digest(_digest(token), self._metrics):
            return Principal("metrics", "metrics")
        tenant = self.store.authenticate(token)
        if not tenant:
            raise AuthError("invalid API key")
        return Principal("tenant", tenant)

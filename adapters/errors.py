"""The one error envelope: a stable machine ``code``, an HTTP ``status`` and a human ``message``.

Every layer (format, store, engine, server, CLI) raises these. The HTTP form is always
``{"error": {"code": ..., "message": ...}}`` (:meth:`PrefixServeError.to_dict`); the batch job writes the
same on a failing line and the CLI prints it on stderr. :meth:`PrefixServeError.from_dict` turns an
envelope back into the matching subclass (the Python client and tests read responses with it).

Errors cross the Ray boundary as values inside typed replies, never raised through the handle:
:meth:`__reduce__` keeps ``code`` and ``status`` through pickling (``Exception``'s default pickling
would call ``cls(message)`` and lose both). Unexpected exceptions become :class:`InternalError`, whose
message never carries internal text (logs do).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

# code -> the class that owns it (first definition wins); filled by __init_subclass__
_BY_CODE: dict[str, type[PrefixServeError]] = {}


class PrefixServeError(Exception):
    """Base error. ``code`` is stable and documented; ``message`` is for humans."""

    code: str = "internal"
    status: int = 500

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_CODE.setdefault(cls.code, cls)

    def __init__(
        self, message: str, *, code: str | None = None, status: int | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.message = message
        if code is not None:  # an instance attribute shadows the class default only when given
            self.code = code
        if status is not None:
            self.status = status
        self.retry_after = retry_after  # seconds; sent as ``Retry-After`` (429, 503)

    def to_dict(self) -> dict[str, dict[str, str]]:
        """The envelope every HTTP error body and batch-job error line uses."""
        return {"error": {"code": self.code, "message": self.message}}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any], *, status: int | None = None) -> PrefixServeError:
        """Inverse of :meth:`to_dict` (also takes the inner ``{"code", "message"}``); ``status`` from HTTP."""
        body = payload.get("error", payload)
        if not isinstance(body, Mapping):
            body = {}
        code = str(body.get("code") or "internal")
        klass = _BY_CODE.get(code, PrefixServeError)
        return klass(str(body.get("message") or code), code=code, status=status or klass.status)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.code, self.status, self.retry_after))

    def __eq__(self, other: object) -> bool:
        return (
            type(other) is type(self)
            and isinstance(other, PrefixServeError)
            and (self.code, self.status, self.message) == (other.code, other.status, other.message)
        )

    def __hash__(self) -> int:
        return hash((type(self), self.code, self.status, self.message))


def _rebuild(
    klass: type[PrefixServeError], message: str, code: str, status: int, retry_after: float | None = None
) -> PrefixServeError:
    return klass(message, code=code, status=status, retry_after=retry_after)


class InternalError(PrefixServeError):
    """Something we did not expect. The message stays generic: internal text goes to the log only."""

    code = "internal"
    status = 500

    def __init__(
        self,
        message: str = "internal error",
        *,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, code=code, status=status, retry_after=retry_after)


def as_error(exc: BaseException, log: logging.Logger | None = None) -> PrefixServeError:
    """``exc`` itself when it is ours, else an :class:`InternalError` that hides its text.

    The traceback goes to ``log`` under a short incident id, which the message names so an operator
    can find it; the caller learns nothing else.
    """
    if isinstance(exc, PrefixServeError):
        return exc
    incident = secrets.token_hex(4)
    (log or logging.getLogger("prefixserve")).error("incident %s", incident, exc_info=exc)
    return InternalError(f"internal error (incident {incident}); the server log has the details")


class InvalidAdapterError(PrefixServeError):
    """A packed file or PEFT folder is malformed or does not fit the backbone."""

    code = "invalid_adapter"
    status = 422


class FingerprintMismatchError(InvalidAdapterError):
    code = "backbone_mismatch"
    status = 422


class AdapterTooLargeError(InvalidAdapterError):
    code = "adapter_too_large"
    status = 413


class InvalidIdError(PrefixServeError):
    code = "invalid_id"
    status = 400


class NotFoundError(PrefixServeError):
    """Missing, or owned by another tenant: callers cannot tell the two apart (no existence leak)."""

    code = "not_found"
    status = 404


class QuotaExceededError(PrefixServeError):
    code = "quota_exceeded"
    status = 429


class ConflictError(PrefixServeError):
    code = "conflict"
    status = 409


class AuthError(PrefixServeError):
    code = "unauthorized"
    status = 401


class ForbiddenError(PrefixServeError):
    """A valid key for the wrong role (a tenant key on an admin route)."""

    code = "forbidden"
    status = 403


class RateLimitedError(PrefixServeError):
    """Over a per-tenant rate or concurrency limit; ``retry_after`` says when to come back."""

    code = "rate_limited"
    status = 429


class BadRequestError(PrefixServeError):
    code = "bad_request"
    status = 400


class StoreUnavailableError(PrefixServeError):
    code = "store_unavailable"
    status = 503

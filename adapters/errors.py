"""Errors with a stable machine code, an HTTP status and a human message.

Every layer (format, store, engine, server, CLI) raises these; the server turns them into
``{"error": {"code": ..., "message": ...}}`` and the batch job writes them on the failing line.
"""

from __future__ import annotations


class PrefixServeError(Exception):
    """Base error. ``code`` is stable and documented; ``message`` is for humans."""

    code = "internal"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


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


class BadRequestError(PrefixServeError):
    code = "bad_request"
    status = 400


class StoreUnavailableError(PrefixServeError):
    code = "store_unavailable"
    status = 503

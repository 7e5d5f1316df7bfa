"""Every HTTP error is ``{"error": {"code", "message"}}`` (:class:`PrefixServeError`'s envelope).

:func:`install` registers the handlers on the Ingress's FastAPI app: our own errors keep their code
and status; FastAPI's validation errors become ``422 invalid_request``; Starlette's routing errors
(404/405) keep their status; anything unexpected is a ``500 internal`` whose message names only an
incident id (the traceback goes to the log).
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixserve.adapters.errors import PrefixServeError, as_error

log = logging.getLogger("prefixserve.ingress")
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def retry_after(seconds: float) -> str:
    """``Retry-After`` in whole seconds, never 0 (a client would retry at once)."""
    return str(max(1, math.ceil(seconds)))


def error_response(request: Request, exc: PrefixServeError) -> JSONResponse:
    request.state.error_code = exc.code  # read by the metrics middleware
    headers = {"Retry-After": retry_after(exc.retry_after)} if exc.retry_after is not None else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def _on_ours(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, as_error(exc, log))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "invalid request"
    return error_response(request, PrefixServeError(message, code="invalid_request", status=422))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request, PrefixServeError(str(exc.detail), code=code, status=exc.status_code))


def install(app: FastAPI) -> None:
    app.add_exception_handler(PrefixServeError, _on_ours)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_ours)  # InternalError: no internal text in the body

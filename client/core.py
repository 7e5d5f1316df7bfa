"""The client's one implementation, free of I/O: what to send, when to retry, how to read the answer.

Every API call is written once, as a generator that yields :class:`Call` values and receives the
``httpx.Response`` for each (see :mod:`.ops`); :class:`~.http.Client` and :class:`~.http.AsyncClient` only
drive those generators, sending with ``httpx.Client`` or ``httpx.AsyncClient`` and sleeping with
``time.sleep`` or ``asyncio.sleep``. Request building, retry decisions and response parsing live here, so
the two clients cannot drift apart.

Retry decisions (:meth:`RetryPolicy.wait`):
* Retried: 429 (except ``quota_*``: waiting does not free quota) and 503, and transport errors
  (refused connection, timeouts, a dropped connection), at most ``max_retries`` times, waiting
  exponential backoff with jitter (``backoff_s * 2**attempt``, capped, the second half random), or the
  server's ``Retry-After`` when it says more. A ``Retry-After`` above ``max_retry_after_s`` is not waited out:
  the error is raised at once, so a CLI never hangs for minutes.
* Non-idempotent calls (uploads, tenant creation, key rotation) are never retried on a 4xx,
  nor after a transport error that may have reached the server (a read timeout could hide a published
  version); only a failed connect, or a 503 (the server did nothing), is retried.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from prefixserve.adapters.errors import PrefixServeError

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "PREFIXSERVE_URL"
API_KEY_ENV = "PREFIXSERVE_API_KEY"
DEFAULT_MAX_INPUTS = 64  # used when the server's GET /info does not name its max_inputs
USER_AGENT = "prefixserve-client/0.1"
# transport errors raised before any byte of the request left: safe to retry even an upload
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def resolve_url(base_url: str | None) -> str:
    """The argument, else ``$PREFIXSERVE_URL``, else ``http://127.0.0.1:8000``."""
    return (base_url or os.environ.get(URL_ENV, "").strip() or DEFAULT_URL).rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """The argument, else ``$PREFIXSERVE_API_KEY`` (None: requests go without a key and get 401)."""
    return api_key or os.environ.get(API_KEY_ENV, "").strip() or None


@dataclass(frozen=True)
class Call:
    """One HTTP request of an operation, before a client sends it."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    params: dict[str, str] | None = None
    idempotent: bool = True
    ok: tuple[int, ...] = ()  # non-2xx statuses the operation reads itself instead of raising

    def request_kwargs(self) -> dict[str, Any]:
        """Arguments of ``httpx.Client.build_request`` (the same on ``httpx.AsyncClient``)."""
        kwargs: dict[str, Any] = {"method": self.method, "url": self.path}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
            kwargs["headers"] = {"Content-Type": "application/octet-stream"}
        if self.files is not None:
            kwargs["files"] = self.files
        if self.params:
            kwargs["params"] = self.params
        return kwargs


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number (fractions accepted) or an HTTP date; None when absent or bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_from(response: httpx.Response) -> PrefixServeError:
    """The server's ``{"error": {"code", "message"}}`` as the matching :class:`PrefixServeError` subclass
    (``NotFoundError`` for ``not_found``...), with ``status`` and ``retry_after`` from the response."""
    try:
        payload = response.json()
    except ValueError:
        payload = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        error = PrefixServeError.from_dict(payload, status=response.status_code)
    else:  # not our envelope: a proxy or load balancer answered
        text = response.text[:200].strip()
        error = PrefixServeError(
            f"HTTP {response.status_code} from {response.request.url}: {text}",
            code="http_error",
            status=response.status_code,
        )
    error.retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return error


def unreachable(call: Call, base_url: str, exc: Exception) -> PrefixServeError:
    return PrefixServeError(
        f"{call.method} {base_url}{call.path} failed: {type(exc).__name__}: {exc}", code="unreachable", status=503
    )


@dataclass
class RetryPolicy:
    """When and how long to wait before sending a call again (see the module docstring)."""

    max_retries: int = 3
    backoff_s: float = 0.25
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def backoff(self, attempt: int) -> float:
        """Exponential, capped, half of it random: clients that failed together do not retry together."""
        cap = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return cap / 2 + self.rng.uniform(0, cap / 2)

    def wait(
        self, call: Call, attempt: int, *, error: PrefixServeError | None = None, exc: Exception | None = None
    ) -> float | None:
        """Seconds to wait before retry ``attempt + 1``, or None: give up and raise."""
        if attempt >= self.max_retries:
            return None
        if exc is not None:  # a transport error
            return self.backoff(attempt) if call.idempotent or isinstance(exc, _NOT_SENT) else None
        assert error is not None
        if error.status == 503 or (error.status == 429 and call.idempotent and not error.code.startswith("quota")):
            delay = self.backoff(attempt)
            if error.retry_after is not None:
                if error.retry_after > self.max_retry_after_s:
                    return None
                # honour Retry-After; up to 10% later so a crowd told the same second spreads out
                delay = max(delay, error.retry_after * (1 + 0.1 * self.rng.random()))
            return delay
        return None


def outcome(
    policy: RetryPolicy, call: Call, attempt: int, base_url: str, response: httpx.Response | None, exc: Exception | None
) -> float | None:
    """What a client does after one send: None = return ``response``; a float = sleep, then send again;
    raises the final :class:`PrefixServeError` when the call failed for good."""
    if exc is not None:
        wait = policy.wait(call, attempt, exc=exc)
        if wait is None:
            raise unreachable(call, base_url, exc) from exc
        return wait
    assert response is not None
    if response.is_success or response.status_code in call.ok:
        return None
    error = error_from(response)
    wait = policy.wait(call, attempt, error=error)
    if wait is None:
        raise error
    return wait


def json_body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise PrefixServeError(
            f"{response.request.method} {response.request.url} answered {response.status_code} without JSON",
            code="bad_response",
            status=502,
        ) from None

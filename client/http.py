"""``Client`` (sync, ``httpx.Client``) and ``AsyncClient`` (``httpx.AsyncClient``) for prefixserve's HTTP API.

```python
from prefixserve.client import Client

with Client("http://127.0.0.1:8000", api_key=admin_key) as admin:
    key = admin.create_tenant("acme").api_key
with Client(api_key=key) as c:                        # URL: $PREFIXSERVE_URL, else http://127.0.0.1:8000
    c.upload("sentiment", "adapter.safetensors")       # or a PEFT folder, or bytes
    c.classify("sentiment", texts).labels              # any number of texts: chunked by the server's max_inputs
    job = c.submit_training("sentiment", data="train.tsv", kind="prefix", epochs=5)  # training: .training
    for record in c.watch_training(job.job_id): ...    # until it is finished
```

Both classes only send and sleep: the operations (:mod:`.ops`) and the retry policy (:mod:`.core`) are one
implementation. Every failure raises :class:`~prefixserve.adapters.errors.PrefixServeError` (the subclass the
server's error code names: ``NotFoundError`` for ``not_found``, ...) with ``status``, ``code``, ``message``
and ``retry_after``; a server that cannot be reached after the retries is ``code="unreachable"``.
"""

from __future__ import annotations

import asyncio
import builtins
import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from .core import USER_AGENT, Call, RetryPolicy, outcome, resolve_api_key, resolve_url
from .models import Classification, Limits, PrefixMeta, PrefixVersions, ServerInfo, TenantKey, TrainingLimits
from .ops import Op, Session
from .training import AsyncTrainingMethods, TrainingMethods

T = TypeVar("T")
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # an upload of a large adapter takes a while on a slow link


class _Config:
    """What both clients are built from (resolved once: argument, else environment, else default)."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        max_retries: int,
        retry: RetryPolicy | None,
        max_inputs: int,
    ):
        self.base_url = resolve_url(base_url)
        key = resolve_api_key(api_key)
        self.headers = {"User-Agent": USER_AGENT, **({"Authorization": f"Bearer {key}"} if key else {})}
        self.retry = retry or RetryPolicy(max_retries=max_retries)
        self.session = Session(max_inputs)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}({self.base_url!r})"


def _limits_body(default: bool, given: dict[str, Any]) -> dict[str, Any]:
    return {"default": True} if default else {k: v for k, v in given.items() if v is not None}


class Client(_Config, TrainingMethods):
    """Synchronous client. ``api_key``: a tenant's key for adapter and classify calls, the admin key for
    tenant calls; default ``$PREFIXSERVE_API_KEY``. ``max_inputs``: chunk size when the server's ``GET /info``
    does not name one. ``transport``/``timeout`` go to ``httpx.Client``."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        max_inputs: int = 64,
        transport: httpx.BaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, max_retries, retry, max_inputs)
        self._http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport)

    def _send(self, call: Call) -> httpx.Response:
        for attempt in itertools.count():
            response: httpx.Response | None = None
            try:
                response = self._http.send(self._http.build_request(**call.request_kwargs()))
                wait = outcome(self.retry, call, attempt, self.base_url, response, None)
            except httpx.TransportError as exc:
                wait = outcome(self.retry, call, attempt, self.base_url, None, exc)
            if wait is None and response is not None:
                return response
            time.sleep(wait or 0.0)
        raise AssertionError("unreachable")

    def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(self._send(call))
        except StopIteration as done:
            return done.value

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # ---- admin (the admin key) --------------------------------------------------------------------
    def create_tenant(self, tenant: str) -> TenantKey:
        """A new tenant and its API key (shown once)."""
        return self._run(Session.create_tenant(tenant))

    def delete_tenant(self, tenant: str) -> None:
        return self._run(Session.delete_tenant(tenant))

    def rotate_key(self, tenant: str) -> TenantKey:
        """A new key for ``tenant``; its old keys stop working."""
        return self._run(Session.rotate_key(tenant))

    def get_limits(self, tenant: str) -> Limits:
        return self._run(Session.get_limits(tenant))

    def set_limits(
        self,
        tenant: str,
        *,
        requests_per_s: float | None = None,
        rows_per_s: float | None = None,
        burst_s: float | None = None,
        max_concurrent: int | None = None,
        default: bool = False,
    ) -> Limits:
        """The tenant's own rate limits (0 = unlimited; unnamed ones take the server's field defaults), or
        ``default=True``: back to the server's default."""
        given = dict(
            requests_per_s=requests_per_s, rows_per_s=rows_per_s, burst_s=burst_s, max_concurrent=max_concurrent
        )
        return self._run(Session.set_limits(tenant, _limits_body(default, given)))

    def get_training_limits(self, tenant: str) -> TrainingLimits:
        return self._run(Session.get_training_limits(tenant))

    def set_training_limits(
        self,
        tenant: str,
        *,
        max_active_jobs: int | None = None,
        max_dataset_bytes: int | None = None,
        max_job_s: float | None = None,
        max_datasets: int | None = None,
        default: bool = False,
    ) -> TrainingLimits:
        """The tenant's own training limits (0 = unlimited; unnamed ones take the server's field defaults), or
        ``default=True``: back to the server's ``training.limits``."""
        given = dict(
            max_active_jobs=max_active_jobs,
            max_dataset_bytes=max_dataset_bytes,
            max_job_s=max_job_s,
            max_datasets=max_datasets,
        )
        return self._run(Session.set_training_limits(tenant, _limits_body(default, given)))

    # ---- adapters (a tenant key) ------------------------------------------------------------------
    def upload(self, prefix_id: str, source: str | Path | bytes, *, labels: Sequence[str] | None = None) -> PrefixMeta:
        """Upload a packed ``.safetensors`` (path or bytes) or a PEFT folder (multipart; ``labels`` names its
        classes). Never retried after a 4xx or once the request may have reached the server."""
        return self._run(Session.upload(prefix_id, source, labels))

    def list(self, kind: str | None = None) -> builtins.list[PrefixMeta]:
        """Your adapters (latest versions), all or one ``kind``."""
        return self._run(Session.list(kind))

    def get(self, prefix_id: str) -> PrefixMeta:
        return self._run(Session.get(prefix_id))

    def delete(self, prefix_id: str) -> None:
        return self._run(Session.delete(prefix_id))

    def versions(self, prefix_id: str) -> PrefixVersions:
        return self._run(Session.versions(prefix_id))

    def rollback(self, prefix_id: str, version: int) -> PrefixMeta:
        """Serve kept ``version`` (a pin) until :meth:`unpin` or the next upload; returns it."""
        return self._run(Session.rollback(prefix_id, version))

    def unpin(self, prefix_id: str) -> PrefixMeta:
        """Serve the newest version again (after a rollback); returns it."""
        return self._run(Session.unpin(prefix_id))

    def info(self) -> ServerInfo:
        """``GET /info`` (cached per client; empty when the server has no such route)."""
        return self._run(self.session.server_info())

    def classify(
        self,
        prefix_id: str,
        texts: Sequence[str],
        text_pairs: Sequence[str | None] | None = None,
        version: int | None = None,
    ) -> Classification:
        """Classify ``texts`` (any number: split into requests of the server's ``max_inputs``, joined in
        order, all answered by one adapter version: ``version``, else the first chunk's)."""
        return self._run(self.session.classify(prefix_id, texts, text_pairs, version))


class AsyncClient(_Config, AsyncTrainingMethods):
    """The same API as :class:`Client`, awaitable (``httpx.AsyncClient``); see :class:`Client`'s methods."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        retry: RetryPolicy | None = None,
        max_inputs: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        super().__init__(base_url, api_key, max_retries, retry, max_inputs)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self.headers, timeout=timeout, transport=transport
        )

    async def _send(self, call: Call) -> httpx.Response:
        for attempt in itertools.count():
            response: httpx.Response | None = None
            try:
                response = await self._http.send(self._http.build_request(**call.request_kwargs()))
                wait = outcome(self.retry, call, attempt, self.base_url, response, None)
            except httpx.TransportError as exc:
                wait = outcome(self.retry, call, attempt, self.base_url, None, exc)
            if wait is None and response is not None:
                return response
            await asyncio.sleep(wait or 0.0)
        raise AssertionError("unreachable")

    async def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                call = op.send(await self._send(call))
        except StopIteration as done:
            return done.value

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        await self.aclose()

    async def create_tenant(self, tenant: str) -> TenantKey:
        return await self._run(Session.create_tenant(tenant))

    async def delete_tenant(self, tenant: str) -> None:
        return await self._run(Session.delete_tenant(tenant))

    async def rotate_key(self, tenant: str) -> TenantKey:
        return await self._run(Session.rotate_key(tenant))

    async def get_limits(self, tenant: str) -> Limits:
        return await self._run(Session.get_limits(tenant))

    async def set_limits(
        self,
        tenant: str,
        *,
        requests_per_s: float | None = None,
        rows_per_s: float | None = None,
        burst_s: float | None = None,
        max_concurrent: int | None = None,
        default: bool = False,
    ) -> Limits:
        given = dict(
            requests_per_s=requests_per_s, rows_per_s=rows_per_s, burst_s=burst_s, max_concurrent=max_concurrent
        )
        return await self._run(Session.set_limits(tenant, _limits_body(default, given)))

    async def get_training_limits(self, tenant: str) -> TrainingLimits:
        return await self._run(Session.get_training_limits(tenant))

    async def set_training_limits(
        self,
        tenant: str,
        *,
        max_active_jobs: int | None = None,
        max_dataset_bytes: int | None = None,
        max_job_s: float | None = None,
        max_datasets: int | None = None,
        default: bool = False,
    ) -> TrainingLimits:
        given = dict(
            max_active_jobs=max_active_jobs,
            max_dataset_bytes=max_dataset_bytes,
            max_job_s=max_job_s,
            max_datasets=max_datasets,
        )
        return await self._run(Session.set_training_limits(tenant, _limits_body(default, given)))

    async def upload(
        self, prefix_id: str, source: str | Path | bytes, *, labels: Sequence[str] | None = None
    ) -> PrefixMeta:
        return await self._run(Session.upload(prefix_id, source, labels))

    async def list(self, kind: str | None = None) -> builtins.list[PrefixMeta]:
        return await self._run(Session.list(kind))

    async def get(self, prefix_id: str) -> PrefixMeta:
        return await self._run(Session.get(prefix_id))

    async def delete(self, prefix_id: str) -> None:
        return await self._run(Session.delete(prefix_id))

    async def versions(self, prefix_id: str) -> PrefixVersions:
        return await self._run(Session.versions(prefix_id))

    async def rollback(self, prefix_id: str, version: int) -> PrefixMeta:
        return await self._run(Session.rollback(prefix_id, version))

    async def unpin(self, prefix_id: str) -> PrefixMeta:
        return await self._run(Session.unpin(prefix_id))

    async def info(self) -> ServerInfo:
        return await self._run(self.session.server_info())

    async def classify(
        self,
        prefix_id: str,
        texts: Sequence[str],
        text_pairs: Sequence[str | None] | None = None,
        version: int | None = None,
    ) -> Classification:
        return await self._run(self.session.classify(prefix_id, texts, text_pairs, version))

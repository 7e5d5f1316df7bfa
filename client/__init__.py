"""prefixserve's Python client, sync and async (see :mod:`.http` for an example).

Errors are :class:`~prefixserve.adapters.errors.PrefixServeError` (re-exported here) with ``status``,
``code``, ``message`` and ``retry_after``, as the server's error envelope names them.
"""

from prefixserve.adapters.errors import PrefixServeError

from .core import API_KEY_ENV, DEFAULT_URL, URL_ENV, RetryPolicy
from .http import AsyncClient, Client
from .models import (
    Classification,
    Limits,
    Prediction,
    PrefixMeta,
    PrefixVersions,
    ServerInfo,
    TenantKey,
    TrainingLimits,
)
from .training import Dataset, EpochProgress, TrainingJob

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "URL_ENV",
    "AsyncClient",
    "Classification",
    "Client",
    "Dataset",
    "EpochProgress",
    "Limits",
    "Prediction",
    "PrefixMeta",
    "PrefixServeError",
    "PrefixVersions",
    "RetryPolicy",
    "ServerInfo",
    "TenantKey",
    "TrainingJob",
    "TrainingLimits",
]

"""Per-process Ingress state (settings, authenticator, metrics registry) that the FastAPI middleware and the
``Ingress`` methods must share.

Why a module of its own: Serve pickles the ingress class and the FastAPI app by value, so a dict
defined in ``ingress.py`` would arrive as separate copies. The Ingress module refers to this one as
a *module* (``from . import state``), which pickles by reference: both sides then use the one
imported in the replica process.
"""

from __future__ import annotations

from .auth import Authenticator
from .metrics import IngressMetrics
from .schemas import AppSettings

settings: AppSettings = AppSettings()
auth: Authenticator | None = None  # set by the Ingress once its store is open
_metrics: IngressMetrics | None = None


def metrics() -> IngressMetrics:
    global _metrics
    if _metrics is None:
        _metrics = IngressMetrics()
    return _metrics

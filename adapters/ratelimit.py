"""Per-tenant rate limits: what a tenant may send (``RateLimits``), enforced by token buckets.

(Skeleton: the limiter implementations are being written; ``RateLimits`` is the agreed record.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class RateLimits:
    """Token-bucket limits for one tenant; 0 = unlimited.

    ``requests_per_s`` / ``rows_per_s`` refill their buckets; a bucket holds ``burst_s`` seconds of its
    rate (at least one request / one request's rows), so short bursts pass and floods get 429.
    ``max_concurrent`` caps a tenant's classify calls in flight at once (0 = unlimited).
    """

    requests_per_s: float = 0.0
    rows_per_s: float = 0.0
    burst_s: float = 2.0
    max_concurrent: int = 0

    def __post_init__(self) -> None:
        for name in ("requests_per_s", "rows_per_s", "burst_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"rate limit {name} must be a number >= 0, got {value!r}")
        if isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 0:
            raise ValueError(f"rate limit max_concurrent must be an int >= 0, got {self.max_concurrent!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RateLimits:
        known = {k: data[k] for k in ("requests_per_s", "rows_per_s", "burst_s", "max_concurrent") if k in data}
        return cls(**known)

"""``AdapterRef``: the name of exactly one immutable adapter version.

It is what crosses the Ray boundary (Ingress -> Worker) and what keys the device adapter cache; it
replaces the ``"tenant/prefix@version"`` strings that were built in several places (vLLM's frozen
``LoRARequest`` is the model). Store versions are immutable and never reused for a prefix id, so one
ref always names the same bytes: a new upload is a new ref, and a cache keyed by refs needs no
invalidation for correctness (the change feed only frees memory early).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterRef:
    tenant: str
    prefix_id: str
    version: int

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ValueError(f"adapter version must be an int >= 1, got {self.version!r}")

    def __str__(self) -> str:  # logs and metrics only; never parsed back
        return f"{self.tenant}/{self.prefix_id}@{self.version}"

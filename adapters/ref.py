"""``AdapterRef``: the name of exactly one immutable adapter version.

It is what crosses the Ray boundary (Ingress -> Worker) and what keys the device adapter cache; it
replaces the ``"tenant/prefix@version"`` strings that were built in several places (vLLM's frozen
``LoRARequest`` is the model).

A ref carries the sha256 of the adapter's bytes, so it can never name two different adapters, even when a
tenant or prefix is deleted and re-created under the same name and its version numbers start over: the
Worker checks the fetched bytes against ``sha256`` and a cache keyed by refs needs no invalidation for
correctness (the change feed only frees memory early). ``version`` is what the answer reports.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterRef:
    tenant: str
    prefix_id: str
    version: int
    sha256: str  # hex digest of the packed bytes: the identity; the other fields say where to fetch them

    def __post_init__(self) -> None:
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise ValueError(f"adapter version must be an int >= 1, got {self.version!r}")
        if not isinstance(self.sha256, str) or len(self.sha256) != 64:
            raise ValueError(f"adapter sha256 must be 64 hex digits, got {self.sha256!r}")

    def __str__(self) -> str:  # logs and metrics only; never parsed back
        return f"{self.tenant}/{self.prefix_id}@{self.version}#{self.sha256[:12]}"

"""What an adapter file says about itself (:class:`AdapterMeta`) and what a backbone offers (:class:`BackboneSpec`).

:mod:`.format` reads the first from a file, :mod:`.backbone` builds the second, :mod:`.fit` checks one against the
other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .kinds import VIRTUAL_KINDS


@dataclass(frozen=True)
class BackboneSpec:
    """What an adapter must agree with to run on a backbone."""

    fingerprint: str
    num_layers: int
    num_heads: int
    hidden: int
    head_style: str  # "bert" | "roberta"
    max_virtual_tokens: int  # positions left for a prefix/prompt with at least a few real tokens
    # The backbone has a pooler from its checkpoint. Without one, a "bert" head must bring its own.
    has_pooler: bool = False
    intermediate: int = 0  # feed-forward width (weight kinds on the feed-forward must match it); 0: unknown


@dataclass(frozen=True)
class AdapterMeta:
    kind: str
    peft_type: str
    num_virtual_tokens: int
    labels: tuple[str, ...]
    fingerprint: str
    format_version: str
    nbytes: int
    num_layers: int
    num_heads: int
    hidden: int
    head_style: str
    has_pooler: bool = False  # the (bert-style) head carries its own pooler
    intermediate: int = 0  # weight kinds: the feed-forward width they need (0: none)

    @property
    def is_weight_kind(self) -> bool:
        """LoRA, IA3, bottleneck: no virtual tokens; ``num_layers`` is the layers it needs, ``num_heads`` 0."""
        return self.kind not in VIRTUAL_KINDS

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d

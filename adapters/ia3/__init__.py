"""IA3 (PEFT ``IA3``): learned vectors that rescale the outputs (or feed-forward inputs) of encoder modules."""

from .config import KIND, PEFT_TYPE, IA3Config, check
from .model import IA3Adapter, build

Adapter = IA3Adapter  # the kind's RowKind module, under the name every weight kind exports (see ..kinds)

__all__ = ["Adapter", "KIND", "PEFT_TYPE", "IA3Adapter", "IA3Config", "build", "check"]

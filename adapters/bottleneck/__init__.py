"""Bottleneck adapters (AdapterHub's Pfeiffer ``SeqBnConfig`` / Houlsby ``DoubleSeqBnConfig``): ``BOTTLENECK``."""

from .config import PEFT_TYPE, BottleneckConfig
from .hub_io import from_hub_folder, hub_labels, to_hub_folder
from .model import BottleneckAdapter, build, check

KIND = "bottleneck"

Adapter = BottleneckAdapter  # the kind's RowKind module, under the name every weight kind exports (see ..kinds)

__all__ = [
    "Adapter",
    "KIND",
    "PEFT_TYPE",
    "BottleneckAdapter",
    "BottleneckConfig",
    "build",
    "check",
    "from_hub_folder",
    "hub_labels",
    "to_hub_folder",
]

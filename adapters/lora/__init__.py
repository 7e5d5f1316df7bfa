"""LoRA (PEFT ``LORA``): low-rank updates on any of the six linear modules of each encoder layer."""

from .config import KIND, MAX_RANK, PEFT_TYPE, LoraConfig, check
from .model import LoraAdapter, build

Adapter = LoraAdapter  # the kind's RowKind module, under the name every weight kind exports (see ..kinds)

__all__ = ["Adapter", "KIND", "MAX_RANK", "PEFT_TYPE", "LoraAdapter", "LoraConfig", "build", "check"]

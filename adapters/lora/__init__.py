"""LoRA (PEFT ``LORA``): low-rank updates on any of the six linear modules of each encoder layer."""

from .config import KIND, MAX_RANK, PEFT_TYPE, LoraConfig, check
from .model import LoraAdapter, build

__all__ = ["KIND", "MAX_RANK", "PEFT_TYPE", "LoraAdapter", "LoraConfig", "build", "check"]

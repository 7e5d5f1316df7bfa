"""IA3 (PEFT ``IA3``): learned vectors that rescale the outputs (or feed-forward inputs) of encoder modules."""

from .config import KIND, PEFT_TYPE, IA3Config, check
from .model import IA3Adapter, build

__all__ = ["KIND", "PEFT_TYPE", "IA3Adapter", "IA3Config", "build", "check"]

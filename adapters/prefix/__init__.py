"""Prefix-Tuning / P-Tuning v2: per-layer key/value virtual tokens (PEFT ``PREFIX_TUNING``)."""

from .config import PrefixConfig
from .model import PrefixEncoder

__all__ = ["PrefixConfig", "PrefixEncoder"]

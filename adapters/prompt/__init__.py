"""Prompt tuning (PEFT ``PROMPT_TUNING``) and P-Tuning (``P_TUNING``): input soft prompts."""

from .config import PromptConfig
from .model import PromptEncoder

__all__ = ["PromptConfig", "PromptEncoder"]

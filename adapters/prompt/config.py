from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PromptConfig:
    """Soft prompt settings, mirroring PEFT's ``PromptTuningConfig`` (same JSON keys)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Soft prompt length (Q)."})
    token_dim: int = field(default=768, metadata={"help": "Hidden size of the backbone."})
    num_layers: int = field(default=12, metadata={"help": "Encoder layers (recorded for PEFT)."})
    num_attention_heads: int = field(default=12, metadata={"help": "Attention heads (recorded for PEFT)."})

    @property
    def width(self) -> int:
        return self.token_dim

    def to_peft_dict(self, base_model: str = "", task_type: str = "SEQ_CLS") -> dict:
        return {
            "peft_type": "PROMPT_TUNING",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": self.token_dim,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_transformer_submodules": 1,
            "prompt_tuning_init": "RANDOM",
            "inference_mode": True,
            "modules_to_save": ["classifier", "score"],
        }

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefixConfig:
    """Prefix tuning settings, mirroring PEFT's ``PrefixTuningConfig`` (same JSON keys)."""

    num_virtual_tokens: int = field(default=20, metadata={"help": "Virtual K/V tokens per layer (P)."})
    num_layers: int = field(default=12, metadata={"help": "Encoder layers of the backbone."})
    num_attention_heads: int = field(default=12, metadata={"help": "Attention heads of the backbone."})
    token_dim: int = field(default=768, metadata={"help": "Hidden size of the backbone."})
    prefix_projection: bool = field(
        default=False,
        metadata={
            "help": "Train through a 2-layer MLP (P-Tuning v2 reparameterisation); the file "
            "always holds the materialised K/V."
        },
    )
    encoder_hidden_size: int = field(default=512, metadata={"help": "Hidden size of the projection MLP."})

    @property
    def width(self) -> int:
        """Flat prefix width: layers * 2 (key, value) * hidden."""
        return self.num_layers * 2 * self.token_dim

    def to_peft_dict(self, base_model: str = "", task_type: str = "SEQ_CLS") -> dict:
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "num_virtual_tokens": self.num_virtual_tokens,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "token_dim": self.token_dim,
            "encoder_hidden_size": self.encoder_hidden_size if self.prefix_projection else self.token_dim,
            "prefix_projection": self.prefix_projection,
            "num_transformer_submodules": 1,
            "inference_mode": True,
            "modules_to_save": ["classifier", "score"],
        }

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PromptConfig


class PromptEncoder(nn.Module):
    """Trainable soft prompt. ``forward() -> (Q, hidden)``, PEFT's ``prompt_embeddings``."""

    def __init__(self, config: PromptConfig, init: Tensor | None = None):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> Tensor:
        return self.embedding.weight  # (Q, hidden)

    @torch.no_grad()
    def materialise(self) -> Tensor:
        return self.forward().detach().clone().contiguous()  # (Q, hidden)

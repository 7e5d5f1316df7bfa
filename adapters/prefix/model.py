from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PrefixConfig


class PrefixEncoder(nn.Module):
    """Trainable prefix. ``forward() -> (P, layers*2*hidden)``, PEFT's flat ``prompt_embeddings``.

    With ``prefix_projection`` the prefix is an embedding passed through Linear-Tanh-Linear
    (P-Tuning v2); :meth:`materialise` gives the K/V that the file stores and the server serves.
    """

    def __init__(self, config: PrefixConfig, init: Tensor | None = None):
        super().__init__()
        self.config = config
        p = config.num_virtual_tokens
        self.transform: nn.Sequential | None  # the P-Tuning v2 reparametrisation, if any
        if config.prefix_projection:
            self.embedding = nn.Embedding(p, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, config.width),
            )
        else:
            self.embedding = nn.Embedding(p, config.width)
            self.transform = None
        if init is not None:  # e.g. a pre-trained prefix: always the materialised (P, width) tensor
            if self.transform is not None:
                raise ValueError("--init-from needs a direct prefix (no projection)")
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> Tensor:
        x = self.embedding.weight  # (P, hidden) or (P, width)
        return self.transform(x) if self.transform is not None else x  # (P, layers*2*hidden)

    @torch.no_grad()
    def materialise(self) -> Tensor:
        return self.forward().detach().clone().contiguous()  # (P, layers*2*hidden)

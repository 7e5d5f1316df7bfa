"""Sequence-classification heads exactly as PEFT saves them for ``task_type=SEQ_CLS``.

* RoBERTa / XLM-R: ``classifier.dense`` (H->H, tanh) then ``classifier.out_proj`` (H->C) on token 0.
* BERT: the backbone's own (frozen, shared) pooler on token 0, then ``classifier`` (H->C).

Token 0 is [CLS] for a prefix row and the first virtual token for a prompt row, as in PEFT.
Key names keep PEFT's ``base_model.classifier.`` prefix in files; here they are stripped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PEFT_HEAD_PREFIX = "base_model.classifier."
ROBERTA_KEYS = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")
BERT_KEYS = ("weight", "bias")


def head_style(tensors: dict[str, Tensor]) -> str:
    """'roberta' (dense + out_proj) or 'bert' (pooler + linear) from a head's (stripped) key names."""
    keys = set(tensors)
    if keys == set(ROBERTA_KEYS):
        return "roberta"
    if keys == set(BERT_KEYS):
        return "bert"
    raise KeyError(f"unknown classification head layout: {sorted(keys)}")


def expected_head_style(backbone) -> str:
    """The head PEFT builds on this backbone: BERT uses the pooler, RoBERTa-likes a 2-layer head."""
    return "bert" if getattr(backbone, "pooler", None) is not None else "roberta"


class ClassificationHead(nn.Module):
    """One tenant's head. ``forward(hidden (N, S, H), pooler) -> logits (N, C)``."""

    def __init__(self, hidden: int, num_labels: int, style: str):
        super().__init__()
        self.style = style
        if style == "roberta":
            self.dense = nn.Linear(hidden, hidden)
            self.out_proj = nn.Linear(hidden, num_labels)
        elif style == "bert":
            self.linear = nn.Linear(hidden, num_labels)
        else:
            raise ValueError(f"style must be 'roberta' or 'bert', got {style!r}")

    @property
    def num_labels(self) -> int:
        return (self.out_proj if self.style == "roberta" else self.linear).out_features

    def forward(self, hidden: Tensor, pooler: nn.Module | None = None) -> Tensor:
        if self.style == "roberta":
            x = torch.tanh(self.dense(hidden[:, 0]))  # (N, H)
            return self.out_proj(x)  # (N, C)
        if pooler is None:  # a BERT-style head on a backbone loaded without its pooler
            raise ValueError("a 'bert' head needs the backbone's pooler, got None")
        pooled = pooler(hidden)  # (N, H): tanh(dense(hidden[:, 0]))
        return self.linear(pooled)  # (N, C)

    # PEFT key names <-> module parameters
    def peft_state(self) -> dict[str, Tensor]:
        if self.style == "roberta":
            own = {
                "dense.weight": self.dense.weight,
                "dense.bias": self.dense.bias,
                "out_proj.weight": self.out_proj.weight,
                "out_proj.bias": self.out_proj.bias,
            }
        else:
            own = {"weight": self.linear.weight, "bias": self.linear.bias}
        return {PEFT_HEAD_PREFIX + k: v.detach().clone().contiguous() for k, v in own.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, copy: bool = True) -> ClassificationHead:
        """Build from stripped head tensors (``dense.weight`` ... or ``weight``/``bias``).

        ``copy=False`` adopts the tensors (the engine does, with tensors freshly read from a file).
        """
        style = head_style(tensors)
        w = tensors["out_proj.weight"] if style == "roberta" else tensors["weight"]  # (C, H)
        with torch.device("meta"):  # skip the random init that the load overwrites (~4x cheaper miss)
            head = cls(w.shape[1], w.shape[0], style)
        own = {"linear." + k: v for k, v in tensors.items()} if style == "bert" else dict(tensors)
        head.load_state_dict({k: (v.detach().clone() if copy else v.detach()) for k, v in own.items()}, assign=True)
        return head


def split_head(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The head's tensors of a PEFT state dict, with ``base_model.classifier.`` stripped."""
    return {k[len(PEFT_HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(PEFT_HEAD_PREFIX)}

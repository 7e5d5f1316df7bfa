"""Sequence-classification heads exactly as PEFT saves them for ``task_type=SEQ_CLS``.

* RoBERTa / XLM-R: ``classifier.dense`` (H->H, tanh) then ``classifier.out_proj`` (H->C) on token 0.
* BERT: a pooler (``tanh(dense(token 0))``, H->H) then ``classifier`` (H->C).

Token 0 is [CLS] for a prefix row and the first virtual token for a prompt row, as in PEFT.
Key names keep PEFT's ``base_model.classifier.`` prefix in files; here they are stripped.

Decisions (the head is a function of the adapter file and the backbone's identity, nothing else):
* The style follows the architecture (``config.model_type``), not whether a pooler happens to be loaded.
* A BERT head uses the backbone's pooler only when that pooler came from the checkpoint (then it is part
  of the backbone fingerprint). A checkpoint without pooler weights (multilingual-e5, many
  sentence-transformers exports) is loaded without a pooler (see :mod:`.backbone`), and a BERT head on it
  carries **its own pooler**, stored under ``base_model.bert.pooler.dense.{weight,bias}``: the key PEFT
  itself writes for ``modules_to_save=["classifier", "pooler"]`` and loads back into
  ``BertForSequenceClassification.bert.pooler``, so an unpacked adapter gives PEFT the same logits.
* When a head has its own pooler, it wins over the backbone's (as in PEFT, whose load overwrites it).
  A BERT head with no pooler of its own on a backbone without one is refused at load (``needs_pooler``
  in :func:`.format.check_compatible`), never run with a random pooler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PEFT_HEAD_PREFIX = "base_model.classifier."
PEFT_POOLER_PREFIX = "base_model.bert.pooler.dense."  # PeftModel -> BertForSequenceClassification.bert.pooler.dense
ROBERTA_KEYS = ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias")
BERT_KEYS = ("weight", "bias")
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")  # a head's own pooler, stripped
ROBERTA_LIKE = {"roberta", "xlm-roberta", "camembert", "xlm-roberta-xl"}


def head_style(tensors: dict[str, Tensor]) -> str:
    """'roberta' (dense + out_proj) or 'bert' (linear, optionally with its own pooler) from stripped key names."""
    keys = set(tensors)
    pooler = {k for k in keys if k.startswith("pooler.")}
    rest = keys - pooler
    if rest == set(ROBERTA_KEYS) and not pooler:
        return "roberta"
    if rest == set(BERT_KEYS) and pooler in (set(), set(POOLER_KEYS)):
        return "bert"
    if pooler and rest == set(ROBERTA_KEYS):
        raise KeyError("a roberta-style head (dense + out_proj) has no pooler; remove the pooler tensors")
    raise KeyError(f"unknown classification head layout: {sorted(keys)}")


def carries_pooler(tensors: dict[str, Tensor]) -> bool:
    """Whether a (stripped) head brings its own pooler."""
    return set(POOLER_KEYS) <= set(tensors)


def head_shapes(style: str, hidden: int, num_labels: int, pooler: bool) -> dict[str, tuple[int, ...]]:
    """The shape every (stripped) head tensor must have."""
    if style == "roberta":
        shapes = {
            "dense.weight": (hidden, hidden),
            "dense.bias": (hidden,),
            "out_proj.weight": (num_labels, hidden),
            "out_proj.bias": (num_labels,),
        }
    else:
        shapes = {"weight": (num_labels, hidden), "bias": (num_labels,)}
    if pooler:
        shapes |= {"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)}
    return shapes


def expected_head_style(backbone) -> str:
    """The head PEFT builds on this backbone: RoBERTa-likes a 2-layer head, BERT pooler + linear."""
    model_type = getattr(getattr(backbone, "config", None), "model_type", None)
    if model_type is None:  # not a transformers model: judge by the pooler, as PEFT's head would
        return "bert" if getattr(backbone, "pooler", None) is not None else "roberta"
    return "roberta" if model_type in ROBERTA_LIKE else "bert"


class Pooler(nn.Module):
    """BERT's pooler, ``(N, S, H) -> (N, H)``: the same operations as transformers' ``BertPooler``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (N, H)


class ClassificationHead(nn.Module):
    """One tenant's head. ``forward(hidden (N, S, H), pooler) -> logits (N, C)``.

    ``own_pooler=True`` (bert style only) gives the head its own :class:`Pooler`, used instead of the
    ``pooler`` argument (the backbone's): see the module docstring.
    """

    def __init__(self, hidden: int, num_labels: int, style: str, *, own_pooler: bool = False):
        super().__init__()
        self.style = style
        if style == "roberta":
            self.dense = nn.Linear(hidden, hidden)
            self.out_proj = nn.Linear(hidden, num_labels)
        elif style == "bert":
            self.linear = nn.Linear(hidden, num_labels)
        else:
            raise ValueError(f"style must be 'roberta' or 'bert', got {style!r}")
        if own_pooler and style != "bert":
            raise ValueError("only a 'bert' head has a pooler")
        self.pooler: Pooler | None = Pooler(hidden) if own_pooler else None  # made last: seeded inits unchanged

    @property
    def num_labels(self) -> int:
        return (self.out_proj if self.style == "roberta" else self.linear).out_features

    def forward(self, hidden: Tensor, pooler: nn.Module | None = None) -> Tensor:
        if self.style == "roberta":
            x = torch.tanh(self.dense(hidden[:, 0]))  # (N, H)
            return self.out_proj(x)  # (N, C)
        pooler = self.pooler if self.pooler is not None else pooler
        if pooler is None:  # format.check_compatible refuses this pairing (needs_pooler) before we get here
            raise ValueError("a 'bert' head needs a pooler: its own or the backbone's checkpoint pooler")
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
        state = {PEFT_HEAD_PREFIX + k: v for k, v in own.items()}
        if self.pooler is not None:
            state |= {PEFT_POOLER_PREFIX + k: v for k, v in self.pooler.dense.state_dict(keep_vars=True).items()}
        return {k: v.detach().clone().contiguous() for k, v in state.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], *, copy: bool = True) -> ClassificationHead:
        """Build from stripped head tensors (``dense.weight`` ... or ``weight``/``bias`` [+ ``pooler.dense.*``]).

        ``copy=False`` adopts the tensors (the engine does, with tensors freshly read from a file).
        """
        style = head_style(tensors)
        w = tensors["out_proj.weight"] if style == "roberta" else tensors["weight"]  # (C, H)
        with torch.device("meta"):  # skip the random init that the load overwrites (~4x cheaper miss)
            head = cls(w.shape[1], w.shape[0], style, own_pooler=carries_pooler(tensors))
        if style == "bert":
            own = {(k if k.startswith("pooler.") else "linear." + k): v for k, v in tensors.items()}
        else:
            own = dict(tensors)
        head.load_state_dict({k: (v.detach().clone() if copy else v.detach()) for k, v in own.items()}, assign=True)
        return head


def split_head(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The head's tensors of a PEFT state dict: ``base_model.classifier.`` stripped, the pooler as ``pooler.dense.*``.

    A classifier key that would strip to ``pooler.*`` keeps its full name, so it can never pass for the pooler
    (:func:`head_style` then refuses the layout): one stripped name, one file key.
    """
    head: dict[str, Tensor] = {}
    for k, v in tensors.items():
        if k.startswith(PEFT_HEAD_PREFIX):
            short = k[len(PEFT_HEAD_PREFIX) :]
            head[k if short.startswith("pooler.") else short] = v
        elif k.startswith(PEFT_POOLER_PREFIX):
            head["pooler.dense." + k[len(PEFT_POOLER_PREFIX) :]] = v
    return head

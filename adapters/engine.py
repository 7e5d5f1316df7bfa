"""Mixed-adapter batched inference: many tenants' rows, one backbone forward.

Pipeline (LitServe's split, minus transport): rows -> tokenize (each row truncated to the room its
adapter leaves) -> gather virtual tokens per row -> ONE :func:`virtual_tokens.encode` -> per-adapter
heads on their rows -> per-row predictions. No storage, HTTP or Ray here: callers resolve adapters
(:meth:`Engine.adapter` caches them on the device) and hand over :class:`Row` objects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PretrainedConfig

from .backbone import Backbone
from .cache import DEFAULT_BUDGET_BYTES, AdapterCache
from .format import AdapterFile, AdapterMeta, load_packed
from .heads import ClassificationHead
from .ref import AdapterRef
from .virtual_tokens import VirtualTokens, encode, max_text_tokens, prefix_to_kv, right_pad, text_room

# What names a device adapter: a store version, or (offline job, benches) a local file path.
AdapterKey = AdapterRef | str


@dataclass(frozen=True)
class DeviceAdapter:
    """One adapter resident on the engine's device, ready to gather into a batch."""

    key: AdapterKey
    meta: AdapterMeta
    virtual: Tensor  # prefix: (layers, 2, heads, P, head_dim); prompt: (Q, hidden)
    head: ClassificationHead
    nbytes: int

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def length(self) -> int:
        return self.meta.num_virtual_tokens


@dataclass
class Row:
    adapter: DeviceAdapter
    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class Prediction:
    """One row's answer; ``logits`` are the raw head outputs in label order."""

    label: str
    score: float
    scores: dict[str, float]
    logits: list[float] = field(repr=False)
    truncated: bool = False

    def to_dict(self, with_logits: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "label": self.label,
            "score": self.score,
            "scores": self.scores,
            "truncated": self.truncated,
        }
        if with_logits:
            d["logits"] = self.logits
        return d


class Engine:
    """Holds the frozen backbone and the device adapter cache.

    ``max_length`` caps real tokens per row (specials included); each row is further capped by the
    positions its adapter leaves (``max_position_embeddings - offset - P``).
    """

    def __init__(self, backbone: Backbone, *, cache_bytes: int = DEFAULT_BUDGET_BYTES, max_length: int | None = None):
        self.backbone = backbone
        self.model = backbone.model
        self.tokenizer: Any = backbone.tokenizer  # a transformers tokenizer (untyped call signature)
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.max_length = max_length or max_text_tokens(self.model, 0)
        self.cache: AdapterCache[AdapterKey, DeviceAdapter] = AdapterCache(cache_bytes, lambda a: a.nbytes)
        c: PretrainedConfig = backbone.config
        self._layers: int = c.num_hidden_layers
        self._heads: int = c.num_attention_heads
        self._hidden: int = c.hidden_size

    # ---- adapters -------------------------------------------------------------------------------
    def to_device(self, key: AdapterKey, adapter: AdapterFile | bytes) -> DeviceAdapter:
        """Validate against this backbone and materialise on the device (no caching)."""
        if isinstance(adapter, (bytes, bytearray)):
            adapter = load_packed(bytes(adapter), expect=self.backbone.spec)
        else:
            from .format import check_compatible

            check_compatible(adapter.meta, self.backbone.spec)
        virtual = adapter.virtual.to(self.device, self.dtype)  # (P, layers*2*H) or (Q, H)
        if adapter.meta.kind == "prefix":
            virtual = prefix_to_kv(virtual, self._layers, self._heads)  # (layers, 2, heads, P, hd), a view
        head = ClassificationHead.from_tensors(adapter.head, copy=False).to(self.device, self.dtype).eval()
        head.requires_grad_(False)
        nbytes = virtual.numel() * virtual.element_size() + sum(p.numel() * p.element_size() for p in head.parameters())
        return DeviceAdapter(key, adapter.meta, virtual, head, nbytes)

    def adapter(self, key: AdapterKey, load: Callable[[], AdapterFile | bytes]) -> DeviceAdapter:
        """Cached device adapter for ``key``; ``load()`` returns packed bytes or an AdapterFile on a miss."""
        return self.cache.get(key, lambda: self.to_device(key, load()))

    # ---- inference ------------------------------------------------------------------------------
    def room(self, adapter: DeviceAdapter) -> int:
        return text_room(self.model, adapter.length, self.max_length)

    def _tokenize(self, rows: list[Row]) -> tuple[Tensor, Tensor, Tensor, list[bool]]:
        """Right-padded ids (B, T) with each row truncated to its own room; truncated flags.

        Single texts and pairs are tokenized in one call per group; only rows longer than their
        adapter's room are tokenized a second time, with truncation (which also tells us they were cut).
        """
        tok = self.tokenizer
        ids: list[list[int]] = [[] for _ in rows]
        types: list[list[int]] = [[] for _ in rows]

        def tokenize(idx: list[int], **kw: Any) -> None:
            args = (
                ([rows[i].text for i in idx],)
                if all(rows[i].text_pair is None for i in idx)
                else ([rows[i].text for i in idx], [rows[i].text_pair for i in idx])
            )
            enc = tok(*args, **kw)
            for j, i in enumerate(idx):
                ids[i] = enc["input_ids"][j]
                types[i] = enc["token_type_ids"][j] if "token_type_ids" in enc else [0] * len(ids[i])

        for group in (
            [i for i, r in enumerate(rows) if r.text_pair is None],
            [i for i, r in enumerate(rows) if r.text_pair is not None],
        ):
            if group:
                tokenize(group, truncation=False)
        truncated = [len(ids[i]) > self.room(r.adapter) for i, r in enumerate(rows)]
        for i, r in enumerate(rows):
            if truncated[i]:  # rooms differ per adapter: one call per overlong row
                tokenize([i], truncation=True, max_length=self.room(r.adapter))
        input_ids, attention, token_types = right_pad(ids, types, tok.pad_token_id)  # (B, T) x 3
        return input_ids, attention, token_types, truncated

    def _virtual(self, rows: list[Row], groups: dict[AdapterKey, list[int]]) -> VirtualTokens:
        """Gather each row's prefix K/V (padded to the longest) and prompt (padded)."""
        b, dev = len(rows), self.device
        prefix_len = torch.tensor([r.adapter.length if r.adapter.kind == "prefix" else 0 for r in rows], device=dev)
        prompt_len = torch.tensor([r.adapter.length if r.adapter.kind == "prompt" else 0 for r in rows], device=dev)
        p_max, q_max = int(prefix_len.max()), int(prompt_len.max())
        hd = self._hidden // self._heads
        kv = torch.zeros(self._layers, 2, b, self._heads, p_max, hd, device=dev, dtype=self.dtype) if p_max else None
        prompt = torch.zeros(b, q_max, self._hidden, device=dev, dtype=self.dtype) if q_max else None
        for idx in groups.values():
            a = rows[idx[0]].adapter
            sel = torch.tensor(idx, device=dev)
            if kv is not None and a.kind == "prefix":  # kv[:, :, rows, :, :P] <- (layers, 2, 1, heads, P, hd)
                kv[:, :, sel, :, : a.length] = a.virtual.unsqueeze(2)
            elif prompt is not None and a.kind == "prompt":  # prompt[rows, :Q] <- (1, Q, H)
                prompt[sel, : a.length] = a.virtual.unsqueeze(0)
        return VirtualTokens(kv, prefix_len, prompt, prompt_len)

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Tensor], list[bool]]:
        """Raw logits per row (each (C_row,)) and truncated flags, from ONE backbone forward."""
        if not rows:
            return [], []
        input_ids, attention, token_types, truncated = self._tokenize(rows)
        groups: dict[AdapterKey, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.adapter.key, []).append(i)
        vt = self._virtual(rows, groups)
        dev = self.device
        out = encode(self.model, input_ids.to(dev), attention.to(dev), token_types.to(dev), vt)
        first = out.last_hidden_state[:, :1]  # (B, 1, H): heads (and BERT's pooler) read token 0 only
        pooler = getattr(self.model, "pooler", None)
        logits: dict[int, Tensor] = {}
        for idx in groups.values():
            head = rows[idx[0]].adapter.head
            group_logits = head(first[idx], pooler).float().cpu()  # (n, C)
            for j, i in enumerate(idx):
                logits[i] = group_logits[j]
        return [logits[i] for i in range(len(rows))], truncated

    def predict(self, rows: list[Row]) -> list[Prediction]:
        logits, truncated = self.forward(rows)
        preds = []
        for row, lg, tr in zip(rows, logits, truncated):
            probs = torch.softmax(lg, dim=-1)  # (C,)
            labels = row.adapter.meta.labels
            best = int(torch.argmax(probs))
            preds.append(
                Prediction(
                    labels[best], float(probs[best]), {lab: float(p) for lab, p in zip(labels, probs)}, lg.tolist(), tr
                )
            )
        return preds

"""Mixed-adapter batched inference: many tenants' rows, one backbone forward.

Pipeline (LitServe's split, minus transport): rows -> tokenize (each row truncated to the room its
adapter leaves) -> rows ordered by adapter (each adapter's rows one contiguous segment) -> pack them into
one token stream, each row with its own prefix K/V or prompt (:mod:`.packing`) and each weight adapter
(LoRA, IA3, bottleneck) on its own segment (:mod:`.rowkinds`) -> ONE :class:`~.encoder.PackedEncoder`
forward -> per-adapter heads (float32) on their rows' token 0 -> per-row predictions, in request order.
No storage, HTTP or Ray here: callers resolve adapters (:meth:`Engine.adapter` caches them on the device)
and hand over :class:`Row` objects.
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
from .kinds import weight_kind
from .packing import PackedBatch, prefix_to_kv
from .ref import AdapterRef
from .rowkinds import RowKind, SegmentHooks, adapter_nbytes
from .transfer import to_device_tensors

# What names a device adapter: a store version, or (offline job, benches) a local file path.
AdapterKey = AdapterRef | str


@dataclass(frozen=True)
class DeviceAdapter:
    """One adapter resident on the engine's device, ready to gather into a batch."""

    key: AdapterKey
    meta: AdapterMeta
    virtual: Tensor | None  # prefix: (layers, 2, P, heads, head_dim); prompt: (Q, hidden); else None
    head: ClassificationHead
    nbytes: int
    weights: RowKind | None = None  # lora / ia3 / bottleneck: the module acting on its rows' segment

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
        self.encoder = backbone.encoder
        self.tokenizer: Any = backbone.tokenizer  # a transformers tokenizer (untyped call signature)
        self.device = backbone.device
        self.dtype = backbone.dtype
        self.max_length = max_length or self.encoder.max_text_tokens(0)
        self.cache: AdapterCache[AdapterKey, DeviceAdapter] = AdapterCache(cache_bytes, lambda a: a.nbytes)
        c: PretrainedConfig = backbone.config
        self._layers: int = c.num_hidden_layers
        self._heads: int = c.num_attention_heads

    # ---- adapters -------------------------------------------------------------------------------
    def to_device(self, key: AdapterKey, adapter: AdapterFile | bytes) -> DeviceAdapter:
        """Validate against this backbone and materialise on the device (no caching)."""
        if isinstance(adapter, (bytes, bytearray)):
            adapter = load_packed(bytes(adapter), expect=self.backbone.spec)
        else:
            from .format import check_compatible

            check_compatible(adapter.meta, self.backbone.spec)
        # float32 heads (a few rows per batch): logits are float32 whatever the serving dtype
        head_tensors = to_device_tensors(adapter.head, self.device, torch.float32, copy=True)
        head = ClassificationHead.from_tensors(head_tensors, copy=False).eval()
        head.requires_grad_(False)
        nbytes = adapter_nbytes(head)
        kind = adapter.meta.kind
        if adapter.meta.is_weight_kind:
            weights = weight_kind(kind).build(adapter.peft_config, adapter.body)  # a RowKind module (CPU, fp32)
            weights = weights.to(self.device, self.dtype).eval().requires_grad_(False)
            weights.for_serving()  # e.g. LoRA: each point's modules folded into one matmul pair
            return DeviceAdapter(key, adapter.meta, None, head, nbytes + adapter_nbytes(weights), weights)
        # The parsed tensors view the packed bytes (zero-copy): each kept tensor gets its own memory exactly
        # once (the K/V relayout, or copy=True), so a resident adapter never pins the whole file buffer.
        virtual = to_device_tensors({"v": adapter.virtual}, self.device, self.dtype, copy=kind != "prefix")["v"]
        if kind == "prefix":  # (P, layers*2*H) -> (layers, 2, P, heads, hd), contiguous: one slice per layer
            virtual = prefix_to_kv(virtual, self._layers, self._heads).contiguous()
        nbytes += virtual.numel() * virtual.element_size()
        return DeviceAdapter(key, adapter.meta, virtual, head, nbytes)

    def adapter(self, key: AdapterKey, load: Callable[[], AdapterFile | bytes]) -> DeviceAdapter:
        """Cached device adapter for ``key``; ``load()`` returns packed bytes or an AdapterFile on a miss."""
        return self.cache.get(key, lambda: self.to_device(key, load()))

    # ---- inference ------------------------------------------------------------------------------
    def room(self, adapter: DeviceAdapter) -> int:
        return self.encoder.text_room(adapter.length, self.max_length)

    def _tokenize(self, rows: list[Row]) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """Token ids and types per row (no padding), each row truncated to its own room; truncated flags.

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
        return ids, types, truncated

    def pack(
        self, rows: list[Row], ids: list[list[int]], types: list[list[int]]
    ) -> tuple[PackedBatch, list[list[int]]]:
        """The batch in stream order (each adapter's rows contiguous, with its weight adapter on that segment)
        and the row indices of each adapter, in order of first appearance."""
        groups: dict[AdapterKey, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.adapter.key, []).append(i)
        order = [i for idx in groups.values() for i in idx]
        batch = self.encoder.pack(
            [ids[i] for i in order],
            [types[i] for i in order],
            prompts=[rows[i].adapter.virtual if rows[i].adapter.kind == "prompt" else None for i in order],
            prefixes=[rows[i].adapter.virtual if rows[i].adapter.kind == "prefix" else None for i in order],
        )
        starts = batch.row_starts  # (B+1,) row offsets in the stream, on the host
        segments, pos = [], 0
        for idx in groups.values():
            weights = rows[idx[0]].adapter.weights
            if weights is not None:
                segments.append((starts[pos], starts[pos + len(idx)], weights))
            pos += len(idx)
        if segments:
            batch.hooks = SegmentHooks(segments)
        return batch, list(groups.values())

    def heads(self, rows: list[Row], hidden: Tensor, batch: PackedBatch, groups: list[list[int]]) -> list[Tensor]:
        """Each row's float32 logits (C_row,) from its adapter's head on token 0, in request order."""
        first = self.encoder.first_tokens(hidden, batch).float()  # (B, 1, H) in stream order: all heads read
        pooler = self.encoder.pooler  # float32 (or None)
        outs, pos = [], 0
        for idx in groups:
            outs.append(rows[idx[0]].adapter.head(first[pos : pos + len(idx)], pooler))  # (n, C) float32
            pos += len(idx)
        flat = torch.cat([o.flatten() for o in outs]).cpu()  # ONE device -> host copy per batch
        logits: list[Tensor] = [flat[:0]] * len(rows)
        at = 0
        for idx, o in zip(groups, outs):
            n, c = o.shape
            for j, i in enumerate(idx):
                logits[i] = flat[at + j * c : at + (j + 1) * c]
            at += n * c
        return logits

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> tuple[list[Tensor], list[bool]]:
        """Raw float32 logits per row (each (C_row,)) and truncated flags, from ONE encoder forward:
        :meth:`_tokenize` -> :meth:`pack` -> the encoder -> :meth:`heads`."""
        if not rows:
            return [], []
        ids, types, truncated = self._tokenize(rows)
        batch, groups = self.pack(rows, ids, types)
        hidden = self.encoder(batch)  # (T, H): every real token of every row, no padding
        return self.heads(rows, hidden, batch, groups), truncated

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

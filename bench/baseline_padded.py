"""BENCH-ONLY: the pre-#12 engine (right-padded batches through Hugging Face's forward), kept as a baseline.

Reconstructed from git history (``git show 6749799:adapters/virtual_tokens.py`` and
``git show 6749799:adapters/engine.py``, the last commit before the packed encoder): the product no longer
contains this code and nothing outside ``bench/`` may import it. What it did per batch:

* tokenize every row (each truncated to the room its adapter leaves), **right-pad** to the batch's longest row;
* gather each row's prefix K/V into a zero-padded ``(layers, 2, B, heads, P_max, head_dim)`` block;
* ONE ``transformers`` forward with the prefixes fed through a ``DynamicCache`` (as PEFT does), a 2-D key
  mask ``(B, P_max + T)`` and per-row position ids (text after a prefix of P starts at ``offset + P``);
* per-adapter heads on token 0.

Differences from the original, all outside the timed arithmetic: it takes the new engine's resident
:class:`~prefixserve.adapters.engine.DeviceAdapter` objects (their prefix ``(layers, 2, P, heads, hd)`` is
viewed as the old ``(layers, 2, heads, P, hd)`` layout, no copy) so both engines serve the same 1,000
adapters without holding them twice, and it serves prefix adapters only (the benches that use it compare
prefixes; the old prompt path is not reconstructed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from prefixserve.adapters.engine import AdapterKey, DeviceAdapter, Row


def position_offset(model) -> int:
    """First position id of a sequence: ``padding_idx + 1`` for RoBERTa/XLM-R, 0 for BERT."""
    padding_idx = getattr(model.embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def right_pad(ids: list[list[int]], types: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token lists -> right-padded (input_ids, attention_mask, token_type_ids), each (B, T)."""
    t_max = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t_max), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(ids), t_max), dtype=torch.long)  # (B, T)
    token_types = torch.zeros((len(ids), t_max), dtype=torch.long)  # (B, T)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
        token_types[i, : len(types[i])] = torch.tensor(types[i])
    return input_ids, attention, token_types


def encode(model, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor, prefix_kv, prefix_len: Tensor):
    """The old ``virtual_tokens.encode`` for prefixes: HF forward with per-row prefix K/V in a DynamicCache.

    input_ids, attention_mask, token_type_ids: (B, T) right-padded; prefix_kv: (layers, 2, B, heads, P_max, hd)
    zero-padded (or None); prefix_len: (B,) valid prefix slots per row.
    """
    batch, t_max = input_ids.shape  # (B, T)
    device = input_ids.device
    if getattr(model.config, "type_vocab_size", 2) < 2:
        token_type_ids = torch.zeros_like(input_ids)  # RoBERTa-style checkpoints have one type
    emb = model.embeddings.word_embeddings(input_ids)  # (B, T, H)
    start = position_offset(model) + prefix_len.unsqueeze(1)  # (B, 1)
    position_ids = start + torch.arange(t_max, device=device).unsqueeze(0)  # (B, T)
    position_ids = position_ids.clamp(max=model.config.max_position_embeddings - 1)  # padding slots: masked
    cache = None
    key_mask = attention_mask.bool()  # (B, T)
    if prefix_kv is not None and prefix_kv.shape[-2] > 0:
        p_max = prefix_kv.shape[-2]
        slots = torch.arange(p_max, device=device).unsqueeze(0)  # (1, P_max)
        key_mask = torch.cat([slots < prefix_len.unsqueeze(1), key_mask], dim=1)  # (B, P_max + T)
        cache = DynamicCache()
        kv = prefix_kv.to(emb.dtype)  # (layers, 2, B, heads, P_max, hd)
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0], kv[layer, 1], layer)  # (B, heads, P_max, hd) each
    return model(
        inputs_embeds=emb,
        attention_mask=key_mask.long(),  # 2-D, as PEFT passes it: transformers picks the kernel's mask form
        token_type_ids=token_type_ids,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=False,
    )


class PaddedEngine:
    """The pre-#12 ``Engine.forward`` over a transformers ``AutoModel`` (``model``) and its tokenizer."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None):
        self.model = model
        self.tokenizer: Any = tokenizer
        c = model.config
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self._layers, self._heads, self._hidden = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
        self.max_length = max_length or int(c.max_position_embeddings) - position_offset(model)

    def room(self, adapter: DeviceAdapter) -> int:
        room = int(self.model.config.max_position_embeddings) - position_offset(self.model) - adapter.length
        return min(room, self.max_length)

    def _tokenize(self, rows: list[Row]) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded (B, T) ids / mask / types, each row truncated to its own room (old ``Engine._tokenize``)."""
        enc = self.tokenizer([r.text for r in rows], truncation=False)
        ids: list[list[int]] = list(enc["input_ids"])
        types = list(enc["token_type_ids"]) if "token_type_ids" in enc else [[0] * len(x) for x in ids]
        for i, r in enumerate(rows):
            if len(ids[i]) > self.room(r.adapter):  # rooms differ per adapter: one call per overlong row
                one = self.tokenizer([r.text], truncation=True, max_length=self.room(r.adapter))
                ids[i] = one["input_ids"][0]
                types[i] = one["token_type_ids"][0] if "token_type_ids" in one else [0] * len(ids[i])
        return right_pad(ids, types, self.tokenizer.pad_token_id)

    def _gather(self, rows: list[Row], groups: dict[AdapterKey, list[int]]) -> tuple[Tensor | None, Tensor]:
        """Each row's prefix K/V, zero-padded to the longest: (layers, 2, B, heads, P_max, hd), and (B,) lengths."""
        dev = self.device
        prefix_len = torch.tensor([r.adapter.length for r in rows], device=dev)  # (B,)
        p_max = int(prefix_len.max())
        hd = self._hidden // self._heads
        if not p_max:
            return None, prefix_len
        kv = torch.zeros(self._layers, 2, len(rows), self._heads, p_max, hd, device=dev, dtype=self.dtype)
        for idx in groups.values():
            a = rows[idx[0]].adapter
            assert a.virtual is not None  # prefix rows only
            old = a.virtual.permute(0, 1, 3, 2, 4)  # (layers, 2, heads, P, hd): the old layout, a view
            kv[:, :, torch.tensor(idx, device=dev), :, : a.length] = old.unsqueeze(2).to(self.dtype)
        return kv, prefix_len

    @torch.inference_mode()
    def forward(self, rows: list[Row]) -> list[Tensor]:
        """Raw float32 logits per row, from ONE padded transformers forward."""
        if any(r.adapter.kind != "prefix" for r in rows):
            raise ValueError("the reconstructed pre-#12 engine serves prefix adapters only")
        input_ids, attention, token_types = self._tokenize(rows)  # (B, T) x 3
        groups: dict[AdapterKey, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.adapter.key, []).append(i)
        kv, prefix_len = self._gather(rows, groups)
        dev = self.device
        out = encode(self.model, input_ids.to(dev), attention.to(dev), token_types.to(dev), kv, prefix_len)
        first = out.last_hidden_state[:, :1]  # (B, 1, H): heads (and BERT's pooler) read token 0 only
        pooler = getattr(self.model, "pooler", None)
        logits: dict[int, Tensor] = {}
        for idx in groups.values():
            head = rows[idx[0]].adapter.head  # float32 (the new engine's); the old one ran heads in the model dtype
            group_logits = head(first[idx].float(), pooler).float().cpu()  # (n, C)
            for j, i in enumerate(idx):
                logits[i] = group_logits[j]
        return [logits[i] for i in range(len(rows))]

"""A batch as ONE stream of real tokens, laid out for :class:`~.encoder.PackedEncoder`.

Rows of different tenants keep their own virtual tokens, with no padding anywhere but (optionally) inside
attention:

* row ``i`` occupies stream slots ``cu_seqlens[i] : cu_seqlens[i+1]``: ``[its prompt (Q_i) ; its tokens (n_i)]``;
* its keys/values are ``[its prefix (P_i) ; its stream slots]``: the key stream is ``[prefix pool ; token K/V]``
  indexed by ``key_index`` (each distinct prefix sits once in the pool, however many rows use it);
* positions are numbered as PEFT numbers the row alone: slot ``j`` of a row has position
  ``position_start + P_i + j`` (``position_start`` is 0 for BERT, ``padding_idx + 1`` for RoBERTa / XLM-R); a
  prompt's slots come first and count, a prefix's do not occupy positions but shift the text after it.
* prompt slots have token type 0, as in PEFT.

Attention is planned once per batch, not per layer: either one variable-length call over the whole
stream (``varlen``: CUDA with fp16/bf16, PyTorch's ``torch.nn.attention.varlen``) or **groups** of rows
(sorted by key length; a group pads to its longest row only while the padding stays under ``slack`` of
its real keys). ``slack=0`` groups only rows of equal length (no masks at all); a large slack is one
padded batch. The CPU default was chosen by measurement (``bench/attention_plan.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .rowkinds import SegmentHooks

DEFAULT_SLACK = 0.25  # CPU: rows of a group may pad up to 25% of their real keys (bench/attention_plan.py)


@dataclass
class AttentionGroup:
    """Rows attended together with one SDPA call (padded to the group's longest row)."""

    q_index: Tensor  # (n, Lq) long: stream slots of the rows' queries; padding -> slot 0 (result dropped)
    k_index: Tensor  # (n, Lk) long: into the key stream [prefix pool ; tokens]; padding -> 0 (masked)
    mask: Tensor | None  # (n, 1, 1, Lk) bool, True = attend; None when every row has Lk keys
    q_valid: Tensor | None  # (n, Lq) bool: real queries; None when every row has Lq queries


@dataclass
class PackedBatch:
    """Everything the encoder needs for one forward; built by :func:`pack` (all tensors on one device)."""

    input_ids: Tensor  # (T_text,) long: every row's real tokens, row after row
    text_slots: Tensor  # (T_text,) long: each token's stream slot
    prompt_pool: Tensor | None  # (Q_pool, H): the batch's distinct prompts, concatenated
    prompt_src: Tensor  # (T_prompt,) long: pool row for each prompt slot
    prompt_slots: Tensor  # (T_prompt,) long: stream slot of each prompt slot
    position_ids: Tensor  # (T,) long
    token_types: Tensor  # (T,) long
    cu_seqlens: Tensor  # (B+1,) int32: query offsets in the stream
    prefix_pool: Tensor | None  # (layers, 2, P_pool, heads, head_dim): distinct prefixes along P
    key_index: Tensor  # (T_k,) long: key stream = [prefix pool ; tokens][key_index]
    cu_seqlens_k: Tensor  # (B+1,) int32: key offsets
    max_q: int
    max_k: int
    groups: list[AttentionGroup] | None  # None: varlen attention over the whole stream
    group_order: Tensor | None  # (T,) long: stream slot -> row in the concatenated group outputs
    row_starts: list[int]  # (B+1,) cu_seqlens on the host: segments without a device sync
    hooks: SegmentHooks | None = None  # weight adapters (LoRA, IA3, bottleneck) per row segment (.rowkinds)

    @property
    def num_tokens(self) -> int:
        return int(self.position_ids.shape[0])

    @property
    def first_slots(self) -> Tensor:
        """(B,) stream slot of each row's token 0 ([CLS], or the first prompt slot): what heads read."""
        return self.cu_seqlens[:-1].long()


def _distinct(items: Sequence[Tensor | None]) -> tuple[list[Tensor], list[int]]:
    """Distinct tensors (by identity) and each row's index among them (-1 for None)."""
    pool: list[Tensor] = []
    seen: dict[int, int] = {}
    index = []
    for t in items:
        if t is None:
            index.append(-1)
            continue
        if id(t) not in seen:
            seen[id(t)] = len(pool)
            pool.append(t)
        index.append(seen[id(t)])
    return pool, index


def plan_groups(q_lens: list[int], k_lens: list[int], slack: float) -> list[list[int]]:
    """Rows grouped for attention: sorted by key length, a group grows while its padded keys stay
    within ``(1 + slack)`` of its real keys (queries likewise)."""
    order = sorted(range(len(k_lens)), key=lambda i: (k_lens[i], q_lens[i]))
    groups: list[list[int]] = []
    k_real = q_real = k_max = q_max = 0  # the open group's real keys/queries and longest row
    for i in order:
        k, q = k_real + k_lens[i], q_real + q_lens[i]
        km, qm = max(k_max, k_lens[i]), max(q_max, q_lens[i])
        n = len(groups[-1]) + 1 if groups else 0
        if n and n * km <= (1 + slack) * k and n * qm <= (1 + slack) * q:
            groups[-1].append(i)
            k_real, q_real, k_max, q_max = k, q, km, qm
        else:
            groups.append([i])
            k_real, q_real, k_max, q_max = k_lens[i], q_lens[i], k_lens[i], q_lens[i]
    return groups


def pack(
    ids: list[list[int]],
    types: list[list[int]] | None,
    *,
    prompts: Sequence[Tensor | None] | None = None,
    prefixes: Sequence[Tensor | None] | None = None,
    position_start: int = 0,
    device: torch.device | str = "cpu",
    varlen: bool = False,
    slack: float = DEFAULT_SLACK,
) -> PackedBatch:
    """Lay out rows for one forward.

    ids/types: each row's tokens (specials included) and token types. prompts[i]: (Q_i, H) or None;
    prefixes[i]: (layers, 2, P_i, heads, head_dim) or None - rows sharing an adapter pass the SAME tensor,
    so it is stored once. Prompts and prefixes keep autograd (the trainer packs its trainable ones).
    """
    b = len(ids)
    prompts = prompts or [None] * b
    prefixes = prefixes or [None] * b
    q_len = [0 if p is None else int(p.shape[0]) for p in prompts]  # Q_i
    p_len = [0 if p is None else int(p.shape[2]) for p in prefixes]  # P_i
    row_len = [q + len(x) for q, x in zip(q_len, ids)]  # real stream slots per row
    starts = [0]
    for n in row_len:
        starts.append(starts[-1] + n)

    prompt_pool_list, prompt_idx = _distinct(prompts)
    prompt_offsets = [0]
    for t in prompt_pool_list:
        prompt_offsets.append(prompt_offsets[-1] + int(t.shape[0]))
    prefix_pool_list, prefix_idx = _distinct(prefixes)
    prefix_offsets = [0]
    for t in prefix_pool_list:
        prefix_offsets.append(prefix_offsets[-1] + int(t.shape[2]))
    p_pool = prefix_offsets[-1]

    text_slots: list[int] = []
    prompt_src: list[int] = []
    prompt_slots: list[int] = []
    positions: list[int] = []
    token_types: list[int] = []
    key_index: list[int] = []
    k_starts = [0]
    for i in range(b):
        s, q, n = starts[i], q_len[i], len(ids[i])
        prompt_slots += range(s, s + q)
        if q:
            o = prompt_offsets[prompt_idx[i]]
            prompt_src += range(o, o + q)
        text_slots += range(s + q, s + q + n)
        positions += range(position_start + p_len[i], position_start + p_len[i] + q + n)
        token_types += [0] * q + (list(types[i]) if types is not None else [0] * n)
        if p_len[i]:
            o = prefix_offsets[prefix_idx[i]]
            key_index += range(o, o + p_len[i])
        key_index += range(p_pool + s, p_pool + s + q + n)
        k_starts.append(len(key_index))

    def long(x: list[int]) -> Tensor:
        return torch.tensor(x, dtype=torch.long, device=device)

    k_lens = [p + r for p, r in zip(p_len, row_len)]
    groups = group_order = None
    if not varlen:
        groups, group_order = _groups(row_len, k_lens, starts, k_starts, key_index, slack, device)
    flat_ids = [t for x in ids for t in x]
    return PackedBatch(
        input_ids=long(flat_ids),
        text_slots=long(text_slots),
        prompt_pool=torch.cat(prompt_pool_list) if prompt_pool_list else None,
        prompt_src=long(prompt_src),
        prompt_slots=long(prompt_slots),
        position_ids=long(positions),
        token_types=long(token_types),
        cu_seqlens=torch.tensor(starts, dtype=torch.int32, device=device),
        prefix_pool=torch.cat(prefix_pool_list, dim=2) if prefix_pool_list else None,
        key_index=long(key_index),
        cu_seqlens_k=torch.tensor(k_starts, dtype=torch.int32, device=device),
        max_q=max(row_len, default=0),
        max_k=max(k_lens, default=0),
        groups=groups,
        group_order=group_order,
        row_starts=starts,
    )


def _groups(
    q_lens: list[int],
    k_lens: list[int],
    starts: list[int],
    k_starts: list[int],
    key_index: list[int],
    slack: float,
    device: torch.device | str,
) -> tuple[list[AttentionGroup], Tensor]:
    """Index tensors per attention group, and the permutation that puts group outputs back in stream order."""
    groups: list[AttentionGroup] = []
    emitted: list[int] = []  # stream slots in the order the groups' real queries come out
    for rows in plan_groups(q_lens, k_lens, slack):
        lq, lk = max(q_lens[i] for i in rows), max(k_lens[i] for i in rows)
        q_index = [[starts[i] + j if j < q_lens[i] else 0 for j in range(lq)] for i in rows]
        k_index = [[key_index[k_starts[i] + j] if j < k_lens[i] else 0 for j in range(lk)] for i in rows]
        same_k = all(k_lens[i] == lk for i in rows)
        same_q = all(q_lens[i] == lq for i in rows)
        mask = None if same_k else torch.tensor([[j < k_lens[i] for j in range(lk)] for i in rows], device=device)
        valid = None if same_q else torch.tensor([[j < q_lens[i] for j in range(lq)] for i in rows], device=device)
        groups.append(
            AttentionGroup(
                q_index=torch.tensor(q_index, dtype=torch.long, device=device),
                k_index=torch.tensor(k_index, dtype=torch.long, device=device),
                mask=None if mask is None else mask[:, None, None, :],
                q_valid=valid,
            )
        )
        for i in rows:
            emitted += range(starts[i], starts[i] + q_lens[i])
    order = torch.empty(len(emitted), dtype=torch.long)
    order[torch.tensor(emitted, dtype=torch.long)] = torch.arange(len(emitted))
    return groups, order.to(device)


def prefix_to_kv(prefix: Tensor, layers: int, heads: int) -> Tensor:
    """PEFT's flat prefix ``(P, layers*2*hidden)`` -> ``(layers, 2, P, heads, head_dim)``, a view.

    Same split as ``PeftModel.get_prompt``: view(P, 2*layers, heads, head_dim), even = key, odd = value.
    """
    num_tokens, width = prefix.shape  # (P, layers*2*hidden)
    head_dim = width // (2 * layers * heads)
    kv = prefix.view(num_tokens, layers, 2, heads, head_dim)  # (P, layers, 2, heads, head_dim)
    return kv.permute(1, 2, 0, 3, 4)  # (layers, 2, P, heads, head_dim)

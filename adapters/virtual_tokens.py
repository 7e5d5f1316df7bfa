"""Virtual tokens into a BERT-family encoder: the ONE prefix/prompt-into-attention implementation.

Both the serving engine and the trainer call :func:`encode`. Every row of a batch carries its own
virtual tokens, so rows of different tenants share one forward pass:

* a **prefix** (Prefix-Tuning / P-Tuning v2, PEFT ``PREFIX_TUNING``) is a per-layer key/value block
  prepended to every self-attention layer's keys and values (through a ``DynamicCache``, as PEFT does);
* a **prompt** (PEFT ``PROMPT_TUNING`` / ``P_TUNING``) is a block of input embeddings placed before the
  row's tokens.

A mixed batch pads prefixes to the longest (padded slots masked out of attention) and packs each
row's input as ``[prompt_i ; tokens_i ; padding]``. Positions are numbered per row exactly as PEFT
numbers them for that adapter alone: text after a prefix of length P starts at position P
(BERT) / ``padding_idx + 1 + P`` (RoBERTa, XLM-R); a prompt's positions run from the start.
Masked keys contribute exactly zero after softmax, so each row's output equals the row run alone
(up to float summation order).

Decision: the key mask is passed 2-D ``(B, P_max + S)``: transformers sizes it from its own length
and picks the attention kernel's mask form (none at all when nothing is masked - the fast path). A
prepared 4-D float mask would be returned unchanged but forces SDPA's slow masked path (~30% here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache


@dataclass
class VirtualTokens:
    """Per-row virtual tokens for one forward pass (B rows)."""

    prefix_kv: Tensor | None  # (layers, 2, B, heads, P_max, head_dim); zeros where padded
    prefix_len: Tensor  # (B,) long: valid prefix slots per row (0 = no prefix)
    prompt: Tensor | None  # (B, Q_max, hidden); zeros where padded
    prompt_len: Tensor  # (B,) long: valid prompt embeddings per row (0 = no prompt)

    @staticmethod
    def none(batch: int, device: torch.device | str = "cpu") -> VirtualTokens:
        zeros = torch.zeros(batch, dtype=torch.long, device=device)
        return VirtualTokens(None, zeros, None, zeros.clone())


def position_offset(model) -> int:
    """First position id of a sequence: ``padding_idx + 1`` for RoBERTa/XLM-R, 0 for BERT."""
    padding_idx = getattr(model.embeddings, "padding_idx", None)
    return 0 if padding_idx is None else int(padding_idx) + 1


def max_text_tokens(model, num_virtual_tokens: int) -> int:
    """Room left for real tokens (specials included) after ``num_virtual_tokens`` virtual ones."""
    return int(model.config.max_position_embeddings) - position_offset(model) - int(num_virtual_tokens)


def text_room(model, num_virtual_tokens: int, max_length: int | None = None) -> int:
    """Real tokens (specials included) a row keeps after its virtual tokens, capped by ``max_length``."""
    room = max_text_tokens(model, num_virtual_tokens)
    return min(room, max_length) if max_length else room


def right_pad(ids: list[list[int]], types: list[list[int]] | None, pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Token lists -> right-padded (input_ids, attention_mask, token_type_ids), each (B, T), as :func:`encode` wants."""
    t_max = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), t_max), pad_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((len(ids), t_max), dtype=torch.long)  # (B, T)
    token_types = torch.zeros((len(ids), t_max), dtype=torch.long)  # (B, T)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(x)] = 1
        if types is not None:
            token_types[i, : len(types[i])] = torch.tensor(types[i])
    return input_ids, attention, token_types


def prefix_to_kv(prefix: Tensor, layers: int, heads: int) -> Tensor:
    """PEFT's flat prefix ``(P, layers*2*hidden)`` -> ``(layers, 2, heads, P, head_dim)``.

    Same split as ``PeftModel.get_prompt``: view(P, 2*layers, heads, head_dim), even = key, odd = value.
    """
    num_tokens, width = prefix.shape  # (P, layers*2*hidden)
    head_dim = width // (2 * layers * heads)
    kv = prefix.view(num_tokens, layers, 2, heads, head_dim)  # (P, layers, 2, heads, head_dim)
    return kv.permute(1, 2, 3, 0, 4)  # (layers, 2, heads, P, head_dim)


def _pack_prompts(
    tok_emb: Tensor, attention_mask: Tensor, token_type_ids: Tensor, prompt: Tensor, prompt_len: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Place each row as ``[prompt_i ; tokens_i ; pad]``; returns (emb, token_mask, token_types).

    ``prompt`` (B, Q_max, H) and ``prompt_len`` (B,) are :class:`VirtualTokens`' fields, passed once known present.
    """
    batch, t_max, hidden = tok_emb.shape  # (B, T, H)
    q_max = prompt.shape[1]
    device = tok_emb.device
    source = torch.cat([prompt.to(tok_emb.dtype), tok_emb], dim=1)  # (B, Q_max+T, H)
    j = torch.arange(q_max + t_max, device=device).unsqueeze(0)  # (1, S)
    q = prompt_len.unsqueeze(1)  # (B, 1)
    in_prompt = j < q  # (B, S)
    text_idx = (j - q).clamp(min=0, max=t_max - 1)  # (B, S) index into the row's tokens
    gather = torch.where(in_prompt, j, q_max + text_idx)  # (B, S) index into `source`
    emb = source.gather(1, gather.unsqueeze(-1).expand(-1, -1, hidden))  # (B, S, H)
    in_text = (~in_prompt) & (j - q < t_max)  # (B, S)
    text_mask = attention_mask.gather(1, text_idx) * in_text  # (B, S)
    token_mask = torch.where(in_prompt, torch.ones_like(text_mask), text_mask)  # (B, S)
    types = token_type_ids.gather(1, text_idx) * in_text  # (B, S): prompt slots are type 0, as in PEFT
    return emb, token_mask, types


def encode(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    token_type_ids: Tensor | None = None,
    virtual: VirtualTokens | None = None,
):
    """Run ``model`` (a BertModel/RobertaModel/XLMRobertaModel) with per-row virtual tokens.

    input_ids, attention_mask, token_type_ids: (B, T), right-padded.
    Returns the model output: ``last_hidden_state`` (B, Q_max+T, H) with row i's prompt first
    (so index 0 is the first virtual token for prompt rows, [CLS] otherwise) and ``pooler_output``.
    Differentiable w.r.t. ``virtual`` (the trainer relies on it).
    """
    batch, t_max = input_ids.shape  # (B, T)
    device = input_ids.device
    vt = virtual or VirtualTokens.none(batch, device)
    if token_type_ids is None or getattr(model.config, "type_vocab_size", 2) < 2:
        token_type_ids = torch.zeros_like(input_ids)  # RoBERTa-style checkpoints have one type
    tok_emb = model.embeddings.word_embeddings(input_ids)  # (B, T, H)
    if vt.prompt is not None and vt.prompt.shape[1] > 0:
        emb, token_mask, types = _pack_prompts(
            tok_emb, attention_mask, token_type_ids, vt.prompt, vt.prompt_len
        )  # (B, S, H)
    else:
        emb, token_mask, types = tok_emb, attention_mask, token_type_ids  # S = T
    seq = emb.shape[1]

    # Positions: each row numbered as PEFT numbers it alone (after its own prefix length).
    start = position_offset(model) + vt.prefix_len.unsqueeze(1)  # (B, 1)
    position_ids = start + torch.arange(seq, device=device).unsqueeze(0)  # (B, S)
    # Padding slots of a row with a long prefix can run past the table; they are masked, so clamp.
    position_ids = position_ids.clamp(max=model.config.max_position_embeddings - 1)  # (B, S)

    cache = None
    key_mask = token_mask.bool()  # (B, S)
    if vt.prefix_kv is not None and vt.prefix_kv.shape[-2] > 0:
        p_max = vt.prefix_kv.shape[-2]
        slots = torch.arange(p_max, device=device).unsqueeze(0)  # (1, P_max)
        prefix_mask = slots < vt.prefix_len.unsqueeze(1)  # (B, P_max)
        key_mask = torch.cat([prefix_mask, key_mask], dim=1)  # (B, P_max+S)
        cache = DynamicCache()
        kv = vt.prefix_kv.to(emb.dtype)  # (layers, 2, B, heads, P_max, head_dim)
        for layer in range(kv.shape[0]):
            cache.update(kv[layer, 0], kv[layer, 1], layer)  # key/value: (B, heads, P_max, head_dim)

    # A 2-D key mask (B, P_max+S), as PEFT passes it: transformers turns it into the form the
    # attention kernel wants (bool for SDPA, additive for eager) and drops it when nothing is masked.
    return model(
        inputs_embeds=emb,
        attention_mask=key_mask.long(),
        token_type_ids=types,
        position_ids=position_ids,
        past_key_values=cache,
        use_cache=False,
    )

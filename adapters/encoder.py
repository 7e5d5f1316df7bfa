"""Our own BERT / RoBERTa / XLM-R encoder forward over packed, unpadded batches (the whole model, one file).

Transformers stays for the config, the tokenizer and the checkpoint's state dict; its forward is only the
reference in tests. Why our own: no padding in any linear layer, LayerNorm or head (a batch is one stream
of T real tokens, see :mod:`.packing`), each row with its own prefix K/V and prompt, attention by
variable-length kernels on CUDA, and named points where further adapter kinds attach.

One layer, on the stream ``x`` (T, H)::

    qkv      = x @ W_qkv + b                      # "qkv": fused query/key/value projection
    keys     = [prefix pool ; k][key_index]         # each row: [its prefix ; its tokens]
    a        = attention(q, keys, values) @ W_o     # "attn_out"
    x        = LayerNorm(x + a)
    f        = act(x @ W_in) @ W_out                # "ffn_in", "ffn_out"
    x        = LayerNorm(x + f)

Named points: at each of the four projections and the two residual norms, ``PackedBatch.hooks``
(:class:`~.rowkinds.SegmentHooks`) lets each weight adapter (LoRA, IA3, bottleneck) act on its own rows.

Decisions:
* Weights are copied from the checkpoint once (query/key/value fused into one matrix: one GEMM instead of
  three) and the transformers module is dropped: one copy of the weights in memory.
* The encoder never applies dropout (it is frozen and shared; the trainer keeps it in eval, as served).
* ``position_embedding_type`` must be ``absolute`` (every BERT/RoBERTa/XLM-R checkpoint we serve).
* The pooler (BERT checkpoints that carry one) stays float32 whatever the serving dtype: heads run in
  float32 so logits come back float32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN

from .heads import ROBERTA_LIKE, Pooler
from .packing import PackedBatch, pack

# Post-LayerNorm BERT-family layouts this file implements (xlm-roberta-xl is pre-LayerNorm: not one of them).
SUPPORTED = {"bert", "roberta", "xlm-roberta", "camembert"}


class Embeddings(nn.Module):
    def __init__(self, c: PretrainedConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(int(c.type_vocab_size), 1), c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, batch: PackedBatch) -> Tensor:
        tok = self.word_embeddings(batch.input_ids)  # (T_text, H)
        x = tok.new_zeros(batch.num_tokens, tok.shape[1])  # (T, H)
        x = x.index_copy(0, batch.text_slots, tok)  # real tokens into their slots
        if batch.prompt_pool is not None:
            prompt = batch.prompt_pool.to(tok.dtype)[batch.prompt_src]  # (T_prompt, H)
            x = x.index_copy(0, batch.prompt_slots, prompt)  # prompts before their rows' tokens
        x = x + self.position_embeddings(batch.position_ids) + self.token_type_embeddings(batch.token_types)
        return self.LayerNorm(x)  # (T, H)


class Layer(nn.Module):
    def __init__(self, c: PretrainedConfig, index: int):
        super().__init__()
        h = c.hidden_size
        self.index = index
        self.heads = c.num_attention_heads
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.ffn_in = nn.Linear(h, c.intermediate_size)
        self.ffn_out = nn.Linear(c.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.act = ACT2FN[c.hidden_act]

    def _proj(self, point: str, linear: nn.Linear, x: Tensor, batch: PackedBatch) -> Tensor:
        hooks = batch.hooks  # weight adapters on their own rows (none for prefix / prompt rows)
        if hooks is None or not hooks.active(self.index, point):
            return linear(x)
        x = hooks.before(self.index, point, x)
        return hooks.after(self.index, point, x, linear(x), linear)

    def _add_norm(self, point: str, ln: nn.LayerNorm, x: Tensor, h: Tensor, batch: PackedBatch) -> Tensor:
        y = ln(x + h)  # (T, H)
        hooks = batch.hooks
        return y if hooks is None else hooks.norm(self.index, point, x, h, y, ln)

    def forward(self, x: Tensor, batch: PackedBatch, kv_out: list | None = None) -> Tensor:
        t, h = x.shape  # (T, H)
        d = h // self.heads
        q, k, v = self._proj("qkv", self.qkv, x, batch).view(t, 3, self.heads, d).unbind(1)  # (T, heads, d) x3
        if kv_out is not None:
            kv_out.append((k, v))
        if batch.prefix_pool is not None:
            pool = batch.prefix_pool[self.index].to(k.dtype)  # (2, P_pool, heads, d)
            k = torch.cat([pool[0], k])  # (P_pool + T, heads, d)
            v = torch.cat([pool[1], v])  # (P_pool + T, heads, d)
        a = attention(q, k, v, batch)  # (T, heads, d)
        x = self._add_norm(
            "attn_norm", self.attn_norm, x, self._proj("attn_out", self.attn_out, a.reshape(t, h), batch), batch
        )  # (T, H)
        f = self.act(self._proj("ffn_in", self.ffn_in, x, batch))  # (T, I)
        return self._add_norm(
            "ffn_norm", self.ffn_norm, x, self._proj("ffn_out", self.ffn_out, f, batch), batch
        )  # (T, H)


def attention(q: Tensor, k: Tensor, v: Tensor, batch: PackedBatch) -> Tensor:
    """Each row's queries over its own keys. q: (T, heads, d); k, v: (P_pool + T, heads, d) -> (T, heads, d)."""
    if batch.groups is None:  # CUDA fp16/bf16: one variable-length call, no padding at all
        keys, values = k[batch.key_index], v[batch.key_index]  # (T_k, heads, d): row i = [prefix_i ; tokens_i]
        return varlen(q.contiguous(), keys, values, batch)
    outs = []
    for g in batch.groups:
        qg = q[g.q_index].transpose(1, 2)  # (n, heads, Lq, d)
        kg = k[g.k_index].transpose(1, 2)  # (n, heads, Lk, d)
        vg = v[g.k_index].transpose(1, 2)  # (n, heads, Lk, d)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask).transpose(1, 2)  # (n, Lq, heads, d)
        outs.append(og.flatten(0, 1) if g.q_valid is None else og[g.q_valid])  # (real queries, heads, d)
    assert batch.group_order is not None
    return torch.cat(outs)[batch.group_order]  # (T, heads, d), stream order


def varlen(q: Tensor, keys: Tensor, values: Tensor, batch: PackedBatch) -> Tensor:
    """PyTorch's variable-length flash attention: q (T, heads, d), keys/values (T_k, heads, d) -> (T, heads, d)."""
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, keys, values, batch.cu_seqlens, batch.cu_seqlens_k, batch.max_q, batch.max_k)
    assert isinstance(out, Tensor)  # no return_aux: just the output
    return out


class PackedEncoder(nn.Module):
    """``forward(PackedBatch) -> hidden (T, H)`` for every stream slot."""

    def __init__(self, config: PretrainedConfig, *, pooler: bool):
        super().__init__()
        if config.model_type not in SUPPORTED:
            raise ValueError(f"model_type {config.model_type!r} is not supported: {sorted(SUPPORTED)}")
        if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
            raise ValueError(f"position_embedding_type {config.position_embedding_type!r} is not supported")
        self.config = config
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.pooler: Pooler | None = Pooler(config.hidden_size) if pooler else None
        # BERT numbers positions from 0; RoBERTa / XLM-R from padding_idx + 1 (their learned table's layout)
        self.position_start = int(config.pad_token_id) + 1 if config.model_type in ROBERTA_LIKE else 0

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, model: nn.Module) -> PackedEncoder:
        """From a transformers BertModel / RobertaModel / XLMRobertaModel (its weights copied, fp32)."""
        config = model.config
        assert isinstance(config, PretrainedConfig)
        enc = cls(config, pooler=getattr(model, "pooler", None) is not None)
        enc.load_hf_state(model.state_dict())
        return enc

    @torch.no_grad()
    def load_hf_state(self, state: dict[str, Tensor]) -> None:
        """Copy a transformers encoder state dict (names without the ``bert.``/``roberta.`` prefix)."""
        own: dict[str, Tensor] = {}
        for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
            own[f"embeddings.{name}.weight"] = state[f"embeddings.{name}.weight"]
        for p in ("weight", "bias"):
            own[f"embeddings.LayerNorm.{p}"] = state[f"embeddings.LayerNorm.{p}"]
            for i in range(len(self.layers)):
                hf = f"encoder.layer.{i}."
                qkv = [state[f"{hf}attention.self.{n}.{p}"] for n in ("query", "key", "value")]
                own[f"layers.{i}.qkv.{p}"] = torch.cat(qkv)  # (3H, H) / (3H,)
                own[f"layers.{i}.attn_out.{p}"] = state[f"{hf}attention.output.dense.{p}"]
                own[f"layers.{i}.attn_norm.{p}"] = state[f"{hf}attention.output.LayerNorm.{p}"]
                own[f"layers.{i}.ffn_in.{p}"] = state[f"{hf}intermediate.dense.{p}"]
                own[f"layers.{i}.ffn_out.{p}"] = state[f"{hf}output.dense.{p}"]
                own[f"layers.{i}.ffn_norm.{p}"] = state[f"{hf}output.LayerNorm.{p}"]
            if self.pooler is not None:
                own[f"pooler.dense.{p}"] = state[f"pooler.dense.{p}"]
        self.load_state_dict({k: v.detach().float() for k, v in own.items()})

    def to_serving(self, device: torch.device, dtype: torch.dtype) -> PackedEncoder:
        """Frozen, eval, on ``device`` in ``dtype`` (the pooler stays float32: see the module docstring)."""
        self.to(device=device, dtype=dtype).eval().requires_grad_(False)
        if self.pooler is not None:
            self.pooler.float()
        return self

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def max_text_tokens(self, num_virtual_tokens: int = 0) -> int:
        """Real tokens (specials included) that fit after ``num_virtual_tokens`` virtual ones."""
        return int(self.config.max_position_embeddings) - self.position_start - int(num_virtual_tokens)

    def text_room(self, num_virtual_tokens: int, max_length: int | None = None) -> int:
        """:meth:`max_text_tokens`, capped by ``max_length``."""
        room = self.max_text_tokens(num_virtual_tokens)
        return min(room, max_length) if max_length else room

    @property
    def uses_varlen(self) -> bool:
        """Variable-length flash attention: CUDA sm80+ with a half dtype (its kernels have no fp32, no older GPUs);
        anything else takes the grouped SDPA path."""
        if self.device.type != "cuda" or self.dtype not in (torch.float16, torch.bfloat16):
            return False
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:  # torch < 2.10
            return False
        return torch.cuda.get_device_capability(self.device) >= (8, 0)

    def pack(
        self,
        ids: list[list[int]],
        types: list[list[int]] | None = None,
        *,
        prompts: Sequence[Tensor | None] | None = None,
        prefixes: Sequence[Tensor | None] | None = None,
    ) -> PackedBatch:
        """:func:`.packing.pack` with this encoder's position numbering, device and attention path."""
        if types is not None and int(self.config.type_vocab_size) < 2:
            types = None  # RoBERTa-style checkpoints have a single token type
        return pack(
            ids,
            types,
            prompts=prompts,
            prefixes=prefixes,
            position_start=self.position_start,
            device=self.device,
            varlen=self.uses_varlen,
        )

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, batch: PackedBatch, kv_out: list | None = None) -> Tensor:
        """Hidden states (T, H) for every stream slot; ``kv_out`` collects each layer's token K/V (T, heads, d)."""
        x = self.embeddings(batch)  # (T, H)
        for layer in self.layers:
            x = layer(x, batch, kv_out)  # (T, H)
        return x

    def first_tokens(self, hidden: Tensor, batch: PackedBatch) -> Tensor:
        """Token 0 of each row as (B, 1, H): all a classification head reads."""
        return hidden[batch.first_slots].unsqueeze(1)


def flops_per_token(config: PretrainedConfig) -> int:
    """Matmul FLOPs per real token for the linear layers (attention scores excluded): 2 * params."""
    h, i = config.hidden_size, config.intermediate_size
    return 2 * config.num_hidden_layers * (4 * h * h + 2 * h * i)

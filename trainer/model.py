"""The trainable wrapper: frozen shared encoder + trainable adapter (virtual tokens or a weight adapter) + head.

The forward pass goes through :class:`prefixserve.adapters.encoder.PackedEncoder` on packed batches - the very
encoder the serving engine runs, with autograd - so what is trained is exactly what is served (no second
attention implementation, no padding).

Decisions:
* The encoder stays in **eval mode** even while training (``train()`` is overridden): it is frozen and
  shared, and its dropout would make the prefix learn to fight noise the server never applies. The only
  dropout is on the head's input (the token-0 hidden state), ``head_dropout`` (default 0.1).
* A weight kind (``lora``, ``ia3``, ``bottleneck``) is its package's ``<Kind>Adapter`` module (a
  :class:`~prefixserve.adapters.rowkinds.RowKind`), started by ``<Kind>Adapter.init`` as the reference library
  starts it; the forward sets ``batch.hooks = SegmentHooks([(0, T, adapter)])``: one segment, the whole
  stream, so training runs the exact code the engine serves (where each tenant has its own segment). The
  adapter module follows ``train()``/``eval()`` (LoRA's dropout applies in training only); the encoder does not.
  The trainer's options (:class:`~.config.WeightOptions`) map onto the package's config in :func:`weight_config`;
  a BERT-style head with its own pooler adds ``modules_to_save=["pooler"]`` (LoRA, IA3), as PEFT would save it.
* ``kind=None`` gives a head-only model (linear probe / full fine-tuning rows of Table 1); such a model has
  no adapter body and cannot be exported as an adapter.
* ``train_backbone=True`` (full fine-tuning) makes the encoder's parameters trainable; the result is a
  full model, reported only, never servable on the shared backbone.
* A soft prompt starts from the embeddings of random vocabulary tokens (seeded), which trains far better
  than N(0, 1) noise. A prefix starts (``prefix_init="tokens"``, the trainer's default) from the keys/values
  the frozen encoder computes for random vocabulary tokens (Li & Liang 2021), or as PEFT's N(0, 1)
  (``"random"``; always with ``prefix_projection``), unless ``init`` (a pre-trained prefix) is given.
* A BERT-style head on a backbone without a checkpoint pooler (``Backbone.has_pooler`` False: the loader
  removed the random one) trains **its own pooler** with the classifier (``head_lr``; seeded like the rest of
  the head, created after the classifier so heads on pooler-ful backbones start exactly as before) and
  exports it as ``base_model.bert.pooler.dense.*`` (see :mod:`prefixserve.adapters.heads`). On a backbone
  with a pooler, the backbone's frozen pooler is used, as PEFT does.
* Tokenisation matches the engine: each text is truncated to ``min(max_length, room left by the adapter)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from prefixserve.adapters.encoder import PackedEncoder
from prefixserve.adapters.format import dump_packed
from prefixserve.adapters.heads import ClassificationHead, expected_head_style
from prefixserve.adapters.kinds import VIRTUAL_KINDS, WEIGHT_KINDS, weight_kind
from prefixserve.adapters.packing import prefix_to_kv
from prefixserve.adapters.prefix import PrefixConfig, PrefixEncoder
from prefixserve.adapters.prompt import PromptConfig, PromptEncoder
from prefixserve.adapters.rowkinds import SegmentHooks

from .config import DEFAULT_NUM_VIRTUAL_TOKENS, PrefixOptions, TrainConfig, WeightOptions

if TYPE_CHECKING:
    from prefixserve.adapters.backbone import Backbone

    from .data import Example

TokenizedRow = tuple[list[int], list[int], int]  # (input_ids, token_type_ids, label index)
Batch = tuple[list[list[int]], list[list[int]], Tensor]  # each row's input_ids and token_type_ids; labels (B,)


def encoder_config(encoder: nn.Module) -> PretrainedConfig:
    """The encoder's transformers config, typed (``nn.Module.__getattr__`` would type it ``Tensor | Module``)."""
    config = getattr(encoder, "config", None)
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"{type(encoder).__name__} has no transformers config: not a BERT/RoBERTa encoder")
    return config


def weight_config(kind: str, options: WeightOptions, own_pooler: bool = False) -> Any:
    """The weight kind package's config (``LoraConfig`` / ``IA3Config`` / ``BottleneckConfig``) for the
    trainer's options; ``own_pooler``: the head trains BERT's pooler (saved whole, as PEFT's modules_to_save)."""
    pkg = weight_kind(kind)
    saved = ["pooler"] if own_pooler else None
    if kind == "lora":
        return pkg.LoraConfig(
            r=options.lora_r,
            lora_alpha=options.lora_alpha,
            lora_dropout=options.lora_dropout,
            target_modules=list(options.lora_targets),
            use_rslora=options.rslora,
            modules_to_save=saved,
        )
    if kind == "ia3":
        names: dict[str, Any] = {}  # unset: the package's defaults (PEFT's for BERT / RoBERTa / XLM-R)
        if options.ia3_targets is not None:
            names["target_modules"] = list(options.ia3_targets)
            names["feedforward_modules"] = list(options.ia3_feedforward or [])
        elif options.ia3_feedforward is not None:
            names["feedforward_modules"] = list(options.ia3_feedforward)
        return pkg.IA3Config(**names, modules_to_save=saved)
    preset = pkg.BottleneckConfig.pfeiffer if options.bottleneck == "pfeiffer" else pkg.BottleneckConfig.houlsby
    return preset(reduction_factor=options.reduction_factor)


def tokenizer_of(backbone: Backbone) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer, typed (``Backbone`` keeps it as a plain object)."""
    tokenizer = backbone.tokenizer
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"backbone {backbone.name!r} has no transformers tokenizer")
    return tokenizer


class AdapterModel(nn.Module):
    """``forward(input_ids per row, token_type_ids per row) -> logits (B, C)``; rows are packed, never padded."""

    def __init__(
        self,
        encoder: PackedEncoder,
        num_labels: int,
        *,
        kind: str | None = TrainConfig.kind,
        num_virtual_tokens: int = DEFAULT_NUM_VIRTUAL_TOKENS,
        prefix_projection: bool = PrefixOptions.prefix_projection,
        encoder_hidden_size: int = PrefixOptions.encoder_hidden_size,
        init: Tensor | None = None,
        head_dropout: float = TrainConfig.head_dropout,
        train_backbone: bool = False,
        seed: int = 0,
        prefix_init: str = "random",  # PEFT's start; the trainer's own default is TrainConfig.prefix_init
        weight_options: WeightOptions | None = None,  # weight kinds; None: the defaults of WeightOptions
    ):
        super().__init__()
        self.encoder = encoder
        self.kind = kind
        self.train_backbone = train_backbone
        c = encoder.config
        self.layers: int = c.num_hidden_layers
        self.heads: int = c.num_attention_heads
        self.hidden: int = c.hidden_size
        self.vconfig: PrefixConfig | PromptConfig | None = None  # None: head only or a weight kind
        self.virtual: PrefixEncoder | PromptEncoder | None = None
        self.wconfig: Any = None  # a weight kind's package config (LoraConfig, IA3Config, BottleneckConfig)
        self.weights: nn.Module | None = None  # a weight kind's <Kind>Adapter (a RowKind)
        style = expected_head_style(encoder)
        own_pooler = style == "bert" and getattr(encoder, "pooler", None) is None  # see module docstring
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init, independent of the global RNG state
            torch.manual_seed(seed)
            if kind == "prefix":
                prefix = PrefixConfig(
                    num_virtual_tokens, self.layers, self.heads, self.hidden, prefix_projection, encoder_hidden_size
                )
                if init is None and prefix_init == "tokens" and not prefix_projection:
                    init = token_activations(encoder, num_virtual_tokens, gen)  # (P, layers*2*H)
                self.vconfig, self.virtual = prefix, PrefixEncoder(prefix, None if init is None else init.float())
            elif kind == "prompt":
                prompt = PromptConfig(num_virtual_tokens, self.hidden, self.layers, self.heads)
                if init is None:  # random vocabulary embeddings: (Q, H)
                    vocab = encoder.embeddings.word_embeddings.weight  # (V, H)
                    ids = torch.randint(
                        min(100, vocab.shape[0] - 1), vocab.shape[0], (num_virtual_tokens,), generator=gen
                    )  # (Q,)
                    init = vocab.detach()[ids.to(vocab.device)].float().cpu()  # (Q, H)
                self.vconfig, self.virtual = prompt, PromptEncoder(prompt, init)
            elif kind in WEIGHT_KINDS:  # fresh, initialised as the reference library does (seeded above)
                self.wconfig = weight_config(kind, weight_options or WeightOptions(), own_pooler)
                self.weights = weight_kind(kind).Adapter.init(self.wconfig, c)
            elif kind is not None:
                raise ValueError(f"kind must be one of {VIRTUAL_KINDS + WEIGHT_KINDS} or None, got {kind!r}")
            self.head = ClassificationHead(self.hidden, num_labels, style, own_pooler=own_pooler)
        self.dropout = nn.Dropout(head_dropout)
        encoder.requires_grad_(train_backbone)
        device = next(encoder.parameters()).device
        self.to(device)

    @property
    def num_virtual_tokens(self) -> int:
        return 0 if self.vconfig is None else self.vconfig.num_virtual_tokens

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        self.encoder.eval()  # frozen/shared encoder: deterministic, as served (see module docstring)
        return self

    @property
    def body_group(self) -> str:
        """Name of the adapter's parameter group: ``virtual`` (prefix, prompt, head only) or ``weights``."""
        return "weights" if self.weights is not None else "virtual"

    def trainable_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups by role: the adapter's (:attr:`body_group`), ``head``, ``backbone`` (when fine-tuning)."""
        body = self.weights if self.weights is not None else self.virtual
        groups = {
            self.body_group: [] if body is None else list(body.parameters()),
            "head": list(self.head.parameters()),
            "backbone": list(self.encoder.parameters()) if self.train_backbone else [],
        }
        return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}

    def forward(self, ids: list[list[int]], types: list[list[int]] | None = None) -> Tensor:
        b = len(ids)
        prompts = prefixes = None
        if self.virtual is not None:
            flat = self.virtual()  # prefix: (P, layers*2*H); prompt: (Q, H)
            if self.kind == "prefix":
                prefixes = [prefix_to_kv(flat, self.layers, self.heads)] * b  # (layers, 2, P, heads, hd), shared
            else:
                prompts = [flat] * b  # (Q, H), shared
        batch = self.encoder.pack(ids, types, prompts=prompts, prefixes=prefixes)
        if self.weights is not None:  # one segment: the whole stream (the engine gives each tenant its own)
            batch.hooks = SegmentHooks([(0, batch.num_tokens, self.weights)])  # type: ignore[list-item]
        hidden = self.encoder(batch)  # (T, H): real tokens only; a prompt row starts with its prompt
        first = self.dropout(self.encoder.first_tokens(hidden, batch))  # (B, 1, H): token 0 is all either head reads
        return self.head(first, self.encoder.pooler)  # (B, C)

    # ---- export ---------------------------------------------------------------------------------
    def peft_config(self, base_model: str = "") -> dict[str, object]:
        """The packed file's ``adapter_config`` (``peft_type`` names the kind; ``task_type`` SEQ_CLS)."""
        if self.wconfig is not None:
            cfg = self.wconfig
            if hasattr(cfg, "base_model_name_or_path"):  # LoRA, IA3 (PEFT configs); bottleneck has none
                cfg = dataclasses.replace(cfg, base_model_name_or_path=base_model)
            return {**cfg.to_config_dict(), "task_type": "SEQ_CLS"}
        if self.vconfig is None:
            raise ValueError("a head-only model has no adapter to export")
        return self.vconfig.to_peft_dict(base_model)

    def adapter_tensors(self) -> dict[str, Tensor]:
        """The packed tensors: the body (``prompt_embeddings`` materialised, or the weight adapter's
        ``encoder.layer.{i}.*``), ``base_model.classifier.*`` and, when the head has its own pooler,
        ``base_model.bert.pooler.dense.*`` (CPU, fp32)."""
        if self.weights is not None:
            body: dict[str, Tensor] = self.weights.body()  # type: ignore[operator]
        elif self.virtual is not None:
            body = {"prompt_embeddings": self.virtual.materialise()}
        else:
            raise ValueError("a head-only model has no adapter to export")
        tensors = {**body, **self.head.peft_state()}
        return {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}

    def export(self, labels: list[str], fingerprint: str, base_model: str = "") -> bytes:
        """The packed adapter file (validated by ``dump_packed``)."""
        return dump_packed(self.peft_config(base_model), self.adapter_tensors(), labels, fingerprint)

    def state_to_keep(self) -> dict[str, Tensor]:
        """A CPU copy of everything trainable (for the best checkpoint)."""
        names = {id(p) for ps in self.trainable_parameters().values() for p in ps}
        return {k: v.detach().cpu().clone() for k, v in self.named_parameters() if id(v) in names}

    def load_kept(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


@torch.no_grad()
def token_activations(encoder: PackedEncoder, num_tokens: int, gen: torch.Generator) -> Tensor:
    """Prefix init from real activations (Li & Liang 2021): the keys/values the frozen encoder computes for
    ``num_tokens`` random vocabulary tokens, in PEFT's flat layout (P, layers*2*hidden)."""
    vocab = encoder.embeddings.word_embeddings.num_embeddings
    ids = torch.randint(min(1000, vocab // 2), vocab, (num_tokens,), generator=gen).tolist()  # (P,)
    captured: list[tuple[Tensor, Tensor]] = []  # per layer: key, value (P, heads, hd)
    encoder(encoder.pack([ids]), kv_out=captured)
    kv = torch.stack([torch.stack([k, v]) for k, v in captured]).float().cpu()  # (L, 2, P, heads, hd)
    return kv.flatten(3).permute(2, 0, 1, 3).reshape(num_tokens, -1).contiguous()  # (P, layers*2*H)


# ---- tokenisation and batches -------------------------------------------------------------------
def tokenize(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], labels: list[str], room: int
) -> list[TokenizedRow]:
    """[(input_ids, token_type_ids, label_index)] truncated to ``room`` like the engine does."""
    index = {name: i for i, name in enumerate(labels)}
    texts = [e.text for e in examples]
    pairs = [e.pair for e in examples]
    if any(p is not None for p in pairs):
        rows = [
            tokenizer(t, p, truncation=True, max_length=room)
            if p is not None
            else tokenizer(t, truncation=True, max_length=room)
            for t, p in zip(texts, pairs)
        ]
        ids = [r["input_ids"] for r in rows]
        types = [r.get("token_type_ids") or [0] * len(r["input_ids"]) for r in rows]
    else:
        enc = tokenizer(texts, truncation=True, max_length=room)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") or [[0] * len(x) for x in ids]
    return [(i, t, index[e.label]) for i, t, e in zip(ids, types, examples)]


def batches(
    rows: Sequence[TokenizedRow], batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield (ids per row, types per row, labels (B,)); shuffled with ``generator`` when given (seeded)."""
    order = torch.randperm(len(rows), generator=generator).tolist() if generator is not None else list(range(len(rows)))
    for start in range(0, len(order), batch_size):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        labels = torch.tensor([r[2] for r in chunk], dtype=torch.long, device=device)  # (B,)
        yield [r[0] for r in chunk], [r[1] for r in chunk], labels

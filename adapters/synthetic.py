"""Seeded random BERT / RoBERTa backbones saved as ordinary Hugging Face folders.

Nothing can be downloaded in tests or CI, so tests and benchmarks build their backbones here and
load them through the same ``from_pretrained(path)`` code as a real hub checkpoint. The tokenizer
is a WordPiece with ``do_lower_case=False`` (as KLUE's: lower-casing would strip accents and
NFD-decompose Hangul into jamo). RoBERTa follows klue/roberta-base: a BERT WordPiece vocabulary
with ``[CLS]=0, [PAD]=1, [SEP]=2, [UNK]=3`` on a RoBERTa model.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.models.bert.tokenization_bert import BertTokenizerFast

# A small vocabulary that covers English test sentences, digits and some Hangul syllables.
_WORDS = (
    "the a an is was this that it movie film good bad great terrible not very really fun boring "
    "plot actor actors story love hate best worst ever i you we they and or but of to in on "
    "for with at by from as be have has had do does did will would can could should time "
    "영화 재미 있다 없다 정말 최고 최악 너무 좋다 싫다 배우 연기 스토리 감동 지루 하다 이 그 는 은 가 를"
).split()


def _vocab(special_first: list[str], size_hint: int) -> list[str]:
    pieces = list(special_first)
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    pieces += [chr(c) for c in range(0xAC00, 0xAC00 + 64)]  # Hangul syllables
    pieces += ["##" + chr(c) for c in range(0xAC00, 0xAC00 + 64)]
    pieces += _WORDS
    seen, out = set(), []
    for p in pieces:
        if p not in seen:
            seen.add(p)
            out.append(p)
    while len(out) < size_hint:
        out.append(f"[unused{len(out)}]")
    return out


def make_tokenizer(arch: str, size_hint: int = 512) -> BertTokenizerFast:
    """A fast WordPiece tokenizer (BERT special-token layout for ``bert``, KLUE's for ``roberta``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # transformers 5 keeps the alias in the model module but leaves it out of its typed top-level exports.
    from transformers.models.bert.tokenization_bert import BertTokenizerFast

    if arch == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    else:  # klue/roberta-base layout
        specials = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(_vocab(specials, size_hint))}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return BertTokenizerFast(
        tokenizer_object=tok,
        do_lower_case=False,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
    )


class _EncoderShape(TypedDict):
    """The config fields BERT and RoBERTa share (a TypedDict so ``**`` keeps each field's type)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float


def make_backbone(
    out_dir: str | Path,
    arch: str = "roberta",
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 66,
    vocab_size: int = 512,
    type_vocab_size: int | None = None,
    seed: int = 0,
    pooler: bool = True,
) -> Path:
    """Write a random ``arch`` (bert|roberta|xlm-roberta) encoder with an MLM head (and BERT's pooler) to ``out_dir``.

    ``xlm-roberta`` is XLM-R's architecture with the RoBERTa-layout tokenizer (same special ids as XLM-R's
    SentencePiece: ``<s>=0, <pad>=1, </s>=2, <unk>=3``).

    ``hidden=768, layers=12, heads=12, max_positions=514, vocab_size=32000`` gives klue/roberta-base's shape.
    ``pooler=False`` (BERT) leaves the pooler tensors out of the checkpoint, as multilingual-e5 and many
    sentence-transformers exports do; every other tensor is the same as with ``pooler=True`` for a seed.
    """
    import torch
    from transformers import (
        BertConfig,
        BertForPreTraining,
        RobertaConfig,
        RobertaForMaskedLM,
        XLMRobertaConfig,
        XLMRobertaForMaskedLM,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer("bert" if arch == "bert" else "roberta", size_hint=min(vocab_size, 512))
    vocab_size = max(vocab_size, len(tokenizer))
    common = _EncoderShape(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate or 4 * hidden,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "bert":
        bert_config = BertConfig(pad_token_id=0, type_vocab_size=type_vocab_size or 2, **common)
        model = BertForPreTraining(bert_config)  # keeps the pooler in the checkpoint, like bert-base
    elif arch == "roberta":
        roberta_config = RobertaConfig(
            pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=type_vocab_size or 1, **common
        )
        model = RobertaForMaskedLM(roberta_config)
    elif arch == "xlm-roberta":
        xlmr_config = XLMRobertaConfig(
            pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=type_vocab_size or 1, **common
        )
        model = XLMRobertaForMaskedLM(xlmr_config)
    else:
        raise ValueError(f"arch must be 'bert', 'roberta' or 'xlm-roberta', got {arch!r}")
    if not pooler and arch == "bert":
        model.save_pretrained(out, state_dict={k: v for k, v in model.state_dict().items() if ".pooler." not in k})
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def random_adapter(
    config,
    fingerprint: str,
    *,
    kind: str = "prefix",
    num_virtual_tokens: int = 20,
    labels=("negative", "positive"),
    seed: int = 0,
    base_model: str = "",
    own_pooler: bool = False,
) -> bytes:
    """A valid packed adapter with seeded random virtual tokens and head, for ``config``'s backbone.

    ``config`` is the backbone's HF config (hidden size, layers, heads, model type). UNTRAINED: for
    benchmarks, tests and the quickstart demo, never for real predictions. ``own_pooler=True`` gives a
    BERT head its own pooler: needed on a backbone without one (``not backbone.has_pooler``).
    """
    import torch

    from .backbone import ROBERTA_LIKE
    from .format import VIRTUAL_KEY, dump_packed
    from .heads import PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX
    from .prefix import PrefixConfig
    from .prompt import PromptConfig

    if kind not in ("prefix", "prompt"):
        raise ValueError(f"kind must be prefix or prompt, got {kind!r}")
    hidden, c = config.hidden_size, len(labels)
    dims = dict(
        num_virtual_tokens=num_virtual_tokens,
        token_dim=hidden,
        num_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
    )
    cfg = PrefixConfig(**dims) if kind == "prefix" else PromptConfig(**dims)
    g = torch.Generator().manual_seed(seed)
    tensors = {VIRTUAL_KEY: torch.randn(num_virtual_tokens, cfg.width, generator=g) * 0.5}  # (P, width)
    if getattr(config, "model_type", "") in ROBERTA_LIKE:  # dense (H, H) + out_proj (C, H)
        head = {
            "dense.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
            "dense.bias": torch.zeros(hidden),
            "out_proj.weight": torch.randn(c, hidden, generator=g) * 0.02,
            "out_proj.bias": torch.zeros(c),
        }
    else:  # BERT: linear (C, H) over the backbone's shared pooler
        head = {"weight": torch.randn(c, hidden, generator=g) * 0.02, "bias": torch.zeros(c)}
        if own_pooler:  # its own pooler, drawn after everything else: the rest stays as without it
            pool = {"weight": torch.randn(hidden, hidden, generator=g) * 0.02, "bias": torch.zeros(hidden)}
            tensors.update({PEFT_POOLER_PREFIX + k: v for k, v in pool.items()})
    tensors.update({PEFT_HEAD_PREFIX + k: v for k, v in head.items()})
    return dump_packed(cfg.to_peft_dict(base_model), tensors, list(labels), fingerprint)

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
from typing import TYPE_CHECKING, Any, TypedDict

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


WEIGHT_KINDS = ("lora", "ia3", "bottleneck")


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
    weight_config: Any = None,
) -> bytes:
    """A valid packed adapter of ``kind`` with seeded random body and head, for ``config``'s backbone.

    ``config`` is the backbone's HF config (hidden size, layers, heads, model type). UNTRAINED: for
    benchmarks, tests and the quickstart demo, never for real predictions. ``own_pooler=True`` gives a
    BERT head its own pooler: needed on a backbone without one (``not backbone.has_pooler``).

    Kinds: ``prefix`` / ``prompt`` (``num_virtual_tokens`` rows), and the weight kinds with the reference
    libraries' defaults unless ``weight_config`` (a ``LoraConfig`` / ``IA3Config`` / ``BottleneckConfig``) is
    given: ``lora`` r=8 on query/value, ``ia3`` PEFT's BERT targets (key, value, output.dense; feed-forward
    output.dense), ``bottleneck`` Pfeiffer (``SeqBnConfig``, reduction factor 16). Weight bodies are drawn so the
    adapter visibly changes the encoder (LoRA's B is not zero, IA3's vectors are not ones, the bottleneck's
    up-projection is not ~0), unlike the reference initialisations, which start as the identity.
    """
    import torch

    from .format import VIRTUAL_KEY, dump_packed
    from .prefix import PrefixConfig
    from .prompt import PromptConfig

    g = torch.Generator().manual_seed(seed)
    if kind in WEIGHT_KINDS:
        peft_config, tensors = _random_weights(config, kind, g, base_model, weight_config)
    elif kind in ("prefix", "prompt"):
        dims = dict(
            num_virtual_tokens=num_virtual_tokens,
            token_dim=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
        )
        cfg = PrefixConfig(**dims) if kind == "prefix" else PromptConfig(**dims)
        peft_config = cfg.to_peft_dict(base_model)
        tensors = {VIRTUAL_KEY: torch.randn(num_virtual_tokens, cfg.width, generator=g) * 0.5}  # (P, width)
    else:
        raise ValueError(f"kind must be one of prefix, prompt, {', '.join(WEIGHT_KINDS)}; got {kind!r}")
    tensors.update(_random_head(config, len(labels), g, own_pooler))
    return dump_packed(peft_config, tensors, list(labels), fingerprint)


def _random_head(config, num_labels: int, g, own_pooler: bool) -> dict:
    """Head tensors under PEFT's names, drawn from ``g`` (a BERT head's own pooler last: the rest is unchanged)."""
    import torch

    from .backbone import ROBERTA_LIKE
    from .heads import PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX

    hidden, c = config.hidden_size, num_labels
    out = {}
    if getattr(config, "model_type", "") in ROBERTA_LIKE:  # dense (H, H) + out_proj (C, H)
        head = {
            "dense.weight": torch.randn(hidden, hidden, generator=g) * 0.02,
            "dense.bias": torch.zeros(hidden),
            "out_proj.weight": torch.randn(c, hidden, generator=g) * 0.02,
            "out_proj.bias": torch.zeros(c),
        }
    else:  # BERT: linear (C, H) over the backbone's shared pooler
        head = {"weight": torch.randn(c, hidden, generator=g) * 0.02, "bias": torch.zeros(c)}
        if own_pooler:
            pool = {"weight": torch.randn(hidden, hidden, generator=g) * 0.02, "bias": torch.zeros(hidden)}
            out.update({PEFT_POOLER_PREFIX + k: v for k, v in pool.items()})
    out.update({PEFT_HEAD_PREFIX + k: v for k, v in head.items()})
    return out


def _random_weights(config, kind: str, g, base_model: str, weight_config: Any) -> tuple[dict, dict]:
    """(adapter_config, body) of a weight kind: the package's own ``init`` lays out names and shapes, then every
    tensor is redrawn from ``g`` (seeded, and the global RNG is left as it was)."""
    import dataclasses

    import torch

    from .kinds import weight_kind

    pkg = weight_kind(kind)
    if weight_config is None:
        if kind == "lora":
            weight_config = pkg.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"])
        elif kind == "ia3":
            weight_config = pkg.IA3Config()
        else:
            weight_config = pkg.BottleneckConfig.pfeiffer(reduction_factor=16)
    if base_model and any(f.name == "base_model_name_or_path" for f in dataclasses.fields(weight_config)):
        weight_config = dataclasses.replace(weight_config, base_model_name_or_path=base_model)
    with torch.random.fork_rng(devices=[]):  # init draws from the global RNG: ours stays seeded by ``g`` alone
        layout = pkg.Adapter.init(weight_config, config).body()  # name -> tensor (shapes only)
    body = {name: _draw(name, tuple(t.shape), g) for name, t in sorted(layout.items())}
    return weight_config.to_config_dict(), body


def _draw(name: str, shape: tuple[int, ...], g):
    """One random body tensor, scaled so each kind moves the hidden states by ~10-30 % of their size."""
    import torch

    if name.endswith("lora_A.weight"):  # (r, in): kaiming-uniform bound 1/sqrt(in), as PEFT's init
        bound = 1 / shape[1] ** 0.5
        return (torch.rand(shape, generator=g) * 2 - 1) * bound
    if name.endswith("lora_B.weight"):  # (out, r): PEFT starts at zeros; ours is not
        return torch.randn(shape, generator=g) * 0.05
    if name.endswith("ia3_l"):  # (out, 1) or (1, in): PEFT starts at ones; ours scatter around them
        return 1 + torch.randn(shape, generator=g) * 0.2
    if name.endswith("adapter_down.weight"):  # (down, H): unit-variance bottleneck pre-activations
        return torch.randn(shape, generator=g) / shape[1] ** 0.5
    if name.endswith("adapter_up.weight"):  # (H, down): an update ~0.3 per hidden unit, not ~0
        return torch.randn(shape, generator=g) * 0.3 / shape[1] ** 0.5
    return torch.randn(shape, generator=g) * 0.02  # biases

"""All five kinds in ONE shuffled engine batch, each row equal to its own reference (fp32, 1e-5).

References: PEFT's own ``PeftModel`` (one row at a time) for prefix, prompt, LoRA (two LoRAs of different
ranks and targets) and IA3; for bottleneck adapters AdapterHub's equations inside transformers' forward
(:mod:`tests.fixtures.bottleneck_ref`), with the adapter's own head. Every adapter must move its rows'
logits: an adapter that does nothing fails.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.bottleneck import BottleneckConfig
from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.format import dump_packed, load_packed
from prefixserve.adapters.peft_io import pack_folder, unpack
from tests.fixtures.backbones import make_peft_adapter, peft_logits
from tests.fixtures.bottleneck_ref import hooked, random_body

TOL = 1e-5
NUM_LABELS = 3
TEXTS = [
    "a fine film",
    "bad",
    "the plot was long and the actors were tired but the music was good",
    "ok",
    "great fun for everyone in the family",
    "boring boring boring",
    "what a story",
    "I would not watch it again even if it were free",
    "the best",
    "meh",
    "a quiet small film that stays with you",
    "no",
    "loud",
    "a story of two friends",
]
PEFT_KINDS = {  # name -> (make_peft_adapter method, P, weight scale)
    "prefix": ("prefix", 4, 1.0),
    "prompt": ("prompt", 3, 1.0),
    "lora": ("lora", 0, 0.3),
    "lora_all": ("lora_all", 0, 0.2),
    "ia3": ("ia3", 0, 1.0),
}


def returns(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _bottleneck(backbone_dir: str, fingerprint: str, preset: str, seed: int) -> tuple[bytes, dict, dict]:
    """A packed bottleneck adapter with random body and head, its config, and the HF reference's head state."""
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dir, num_labels=NUM_LABELS)
    c = model.config
    cfg = getattr(BottleneckConfig, preset)(reduction_factor=4).to_config_dict()
    body = random_body(cfg, c.hidden_size, c.num_hidden_layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    head_state = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in model.classifier.state_dict().items()}
    head = {f"base_model.classifier.{k}": v for k, v in head_state.items()}
    if c.model_type == "bert":  # its own (random) pooler, as the PEFT adapters of this test carry one
        pooler = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in model.bert.pooler.dense.state_dict().items()}
        head |= {f"base_model.bert.pooler.dense.{k}": v for k, v in pooler.items()}
        head_state = head_state | {f"pooler.{k}": v for k, v in pooler.items()}
    labels = [f"l{i}" for i in range(NUM_LABELS)]
    return dump_packed(cfg, {**body, **head}, labels, fingerprint), cfg, head_state


@torch.no_grad()
def _bottleneck_logits(backbone_dir: str, tokenizer, cfg: dict | None, packed: bytes, head_state: dict, texts) -> list:
    """transformers' model with the adapter's head and (``cfg`` given) AdapterHub's blocks, one row at a time."""
    model = AutoModelForSequenceClassification.from_pretrained(backbone_dir, num_labels=NUM_LABELS).eval()
    model.classifier.load_state_dict({k: v for k, v in head_state.items() if not k.startswith("pooler.")})
    if "pooler.weight" in head_state:
        model.bert.pooler.dense.load_state_dict(
            {"weight": head_state["pooler.weight"], "bias": head_state["pooler.bias"]}
        )
    body = load_packed(packed).body
    encoder = model.roberta if hasattr(model, "roberta") else model.bert
    out = []
    with hooked(encoder, cfg, body if cfg else None):
        for text in texts:
            enc = tokenizer(text, return_tensors="pt")
            if model.config.type_vocab_size < 2:
                enc.pop("token_type_ids", None)
            out.append(model(**enc).logits[0])
    return out


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_every_kind_in_one_shuffled_batch_matches_its_reference(arch, tiny_backbones, tmp_path, one_thread):
    backbone_dir = tiny_backbones[arch]
    bb = load_backbone(backbone_dir, dtype="float32")  # CUDA when there (make gpu-check): references stay on CPU
    tok = AutoTokenizer.from_pretrained(backbone_dir)
    engine = Engine(bb)
    adapters: dict = {}
    refs: dict = {}
    plain: dict = {}  # the same heads without their adapter: each adapter must move its logits
    for i, (name, (method, p, scale)) in enumerate(PEFT_KINDS.items()):
        # BERT: each adapter brings its own random pooler (the tiny backbone's pooler squashes token 0 to ~0,
        # which would make every adapter's logits nearly constant and "moves the logits" untestable)
        own_pooler = ["pooler"] if arch == "bert" else None
        folder = make_peft_adapter(
            backbone_dir, tmp_path / name, method, p, NUM_LABELS, seed=i, scale=scale, modules_to_save=own_pooler
        )
        packed = pack_folder(folder, default_fingerprint=bb.fingerprint)
        adapters[name] = engine.adapter(f"t/{name}@1", returns(packed))
        refs[name], plain[name] = peft_logits(backbone_dir, folder, NUM_LABELS, tok, TEXTS)
        # what we export loads back in PEFT and gives the same logits (LoRA / IA3 are renamed both ways)
        again, _ = peft_logits(backbone_dir, str(unpack(packed, tmp_path / f"{name}-out")), NUM_LABELS, tok, TEXTS[:2])
        assert max(float((a - b).abs().max()) for a, b in zip(again, refs[name][:2])) <= TOL
    for j, preset in enumerate(("pfeiffer", "houlsby")):
        packed, cfg, head_state = _bottleneck(backbone_dir, bb.fingerprint, preset, seed=10 + j)
        adapters[preset] = engine.adapter(f"t/{preset}@1", returns(packed))
        refs[preset] = _bottleneck_logits(backbone_dir, tok, cfg, packed, head_state, TEXTS)
        plain[preset] = _bottleneck_logits(backbone_dir, tok, None, packed, head_state, TEXTS)
    assert {a.kind for a in adapters.values()} == {"prefix", "prompt", "lora", "ia3", "bottleneck"}

    names = [n for n in adapters for _ in range(2)] + random.Random(0).choices(list(adapters), k=len(TEXTS))
    random.Random(1).shuffle(names)
    rows = [(names[k], k % len(TEXTS)) for k in range(len(names))]  # (adapter, text) in shuffled arrival order
    logits, _ = engine.forward([Row(adapters[n], TEXTS[t]) for n, t in rows])
    worst = 0.0
    for (name, t), got in zip(rows, logits):
        want = refs[name][t]
        worst = max(worst, float((got - want).abs().max()))
        assert float((got - plain[name][t]).abs().max()) > 1e-3, name  # the adapter, not just its head
    assert worst <= TOL, worst


def test_weight_kinds_fit_checks(tiny_backbones):
    """A weight kind names the layers and widths it needs: checked against the backbone at load. IA3 on the
    feed-forward only never shows the hidden width in its vectors: the head gives it."""
    import dataclasses

    from prefixserve.adapters.errors import InvalidAdapterError
    from prefixserve.adapters.ia3 import IA3Config
    from prefixserve.adapters.synthetic import random_adapter

    bb = load_backbone(tiny_backbones["roberta"], device="cpu")
    ffn_only = IA3Config(target_modules=["intermediate.dense"], feedforward_modules=[])
    data = random_adapter(bb.config, bb.fingerprint, kind="ia3", weight_config=ffn_only, seed=1)
    meta = load_packed(data, expect=bb.spec).meta
    assert (meta.kind, meta.hidden, meta.intermediate, meta.num_heads) == ("ia3", 32, 128, 0)
    lora = random_adapter(bb.config, bb.fingerprint, kind="lora", seed=2)
    for spec, code in (
        (dataclasses.replace(bb.spec, num_layers=1), "unsupported_target"),
        (dataclasses.replace(bb.spec, hidden=64), "shape_mismatch"),
    ):
        with pytest.raises(InvalidAdapterError) as err:
            load_packed(lora, expect=spec)
        assert err.value.code == code
    with pytest.raises(InvalidAdapterError) as err:
        load_packed(data, expect=dataclasses.replace(bb.spec, intermediate=64))
    assert err.value.code == "shape_mismatch"


@pytest.mark.parametrize(
    "targets, ranks",
    [
        (["query", "value"], {}),  # one rank: stacked B's, index_add into the qkv blocks
        (["query", "key", "value", "output.dense"], {"value": 2, "key": 6}),  # mixed ranks: one zero-padded B
        (["intermediate.dense", "attention.output.dense"], {}),  # one module per point
    ],
)
def test_lora_serving_form_equals_training_form(targets, ranks, tiny_backbones):
    """``for_serving`` (what the engine runs) computes what the trainable per-module form computes."""
    from prefixserve.adapters import lora
    from prefixserve.adapters.packing import pack
    from prefixserve.adapters.rowkinds import SegmentHooks
    from prefixserve.adapters.synthetic import random_adapter

    bb = load_backbone(tiny_backbones["bert"], device="cpu")
    cfg = lora.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks)
    af = load_packed(random_adapter(bb.config, bb.fingerprint, kind="lora", weight_config=cfg, seed=5))
    trained, served = (lora.build(af.peft_config, af.body) for _ in range(2))
    served.for_serving()
    ids = [[2, 7, 9, 11, 3], [2, 5, 3]]
    out = []
    with torch.inference_mode():
        for module in (None, trained, served):
            batch = pack(ids, None, position_start=bb.encoder.position_start)
            batch.hooks = SegmentHooks([(0, 5, module)]) if module is not None else None
            out.append(bb.encoder(batch))
    assert float((out[1] - out[0]).abs().max()) > 1e-3  # the LoRA moves its row
    assert torch.equal(out[1][5:], out[0][5:])  # and only its row
    assert float((out[2] - out[1]).abs().max()) <= 1e-5

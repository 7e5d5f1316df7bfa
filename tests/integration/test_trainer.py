"""Trainer on tiny random backbones: data, loss, frozen backbone, export parity (engine + PEFT), pretrain."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.errors import BadRequestError, FingerprintMismatchError, PrefixServeError
from prefixserve.adapters.format import load_packed
from prefixserve.adapters.peft_io import unpack
from prefixserve.trainer.data import Example, load_datasets, read_examples
from prefixserve.trainer.model import AdapterModel, tokenize, tokenizer_of
from prefixserve.trainer.pretrain import PretrainConfig, load_prefix_init, pretrain
from prefixserve.trainer.train import TrainConfig, train
from tests.fixtures.backbones import learnable_backbone

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; identical reductions across processes

TOL = 1e-5
POS, NEG = ["good", "great", "fun", "best", "love"], ["bad", "terrible", "boring", "worst", "hate"]
FILLER = ["the", "movie", "film", "plot", "actor", "story", "was", "it", "영화", "배우"]
TEXTS = [
    "the movie was good",
    "bad plot terrible actors were not fun at all",
    "영화 최고 감동",
    "fun",
    " ".join(["movie"] * 200),
]  # the last one is truncated by both the trainer and the engine


def write_tsv(path, n=96, seed=0, extra: str = "") -> str:
    rng = random.Random(seed)
    lines = ["id\tdocument\tlabel"]
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(POS if y else NEG)] * 2
        rng.shuffle(words)
        lines.append(f"{i}\t{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {"train": write_tsv(d / "train.tsv", 96, 0), "eval": write_tsv(d / "eval.tsv", 32, 1), "dir": d}


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> str:
    """A tiny RoBERTa whose matrices are N(0, 0.15): the shared fixture's N(0, 0.02) init passes almost no
    token information to position 0, so nothing can be learnt through it."""
    return learnable_backbone(tmp_path_factory.mktemp("learnable"), "roberta", 5)


@pytest.fixture(scope="module")
def all_backbones(tiny_backbones, pooler_less_bert) -> dict[str, str]:
    """The shared tiny backbones plus ``bert-no-pooler`` (a checkpoint without pooler weights)."""
    return {**tiny_backbones, "bert-no-pooler": pooler_less_bert}


@pytest.fixture(scope="module")
def backbones(all_backbones):
    return {arch: load_backbone(path, device="cpu") for arch, path in all_backbones.items()}


def cfg(bdir, data, **kw) -> TrainConfig:
    base = dict(
        backbone=bdir,
        train=data["train"],
        eval=data["eval"],
        num_virtual_tokens=4,
        epochs=3,
        batch_size=16,
        patience=0,
        progress=False,
        encoder_hidden_size=16,
    )
    base.update(kw)
    return TrainConfig(**base)


# ---- data ---------------------------------------------------------------------------------------
def test_formats_labels_and_bad_rows(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text(
        'id\tdocument\tlabel\n1\t"quoted" good\t1\n2\t\t0\n3\tno label\t\n4\ttoo\tmany\tcells\n'
        "5\tfine\t0\n6\tunknown\t7\n",
        encoding="utf-8",
    )
    ds = read_examples(tsv)
    assert [e.text for e in ds.examples] == ['"quoted" good', "fine", "unknown"]
    assert ds.bad == {"missing_text": 1, "missing_label": 1, "unparsable": 1}
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"t": "x", "y": 1}\nnot json\n{"t": "", "y": 0}\n{"t": "z", "y": 0, "p": "pp"}\n[1]\n')
    ds = read_examples(jl, text_column="t", label_column="y", text_pair_column="p")
    assert [(e.text, e.label, e.pair) for e in ds.examples] == [("x", "1", None), ("z", "0", "pp")]
    assert ds.bad == {"unparsable": 2, "missing_text": 1}
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,category\n"a, b",fresh\nc,rotten\nd,\n', encoding="utf-8")
    assert [e.label for e in read_examples(csv_path).examples] == ["fresh", "rotten"]
    with pytest.raises(BadRequestError):
        read_examples(csv_path, text_column="nope")

    # labels: sorted raw values (numeric order); --label-names maps integer labels by index
    ev = tmp_path / "ev.tsv"
    ev.write_text("id\tdocument\tlabel\n1\tx\t1\n2\ty\t2\n3\tz\t0\n")
    c = TrainConfig(backbone="-", train=str(tsv), eval=str(ev))
    train_ds, eval_ds, labels = load_datasets(c)
    assert labels == ["0", "1", "7"] and eval_ds.bad == {"unknown_label": 1}
    c.label_names = ["negative", "positive"]
    train_ds, eval_ds, labels = load_datasets(c)
    assert labels == ["negative", "positive"]
    assert [e.label for e in train_ds.examples] == ["positive", "negative"]
    assert train_ds.bad["unknown_label"] == 1 and eval_ds.bad == {"unknown_label": 1}


# ---- training -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,kind,projection",
    [
        ("bert", "prefix", False),
        ("roberta", "prefix", True),
        ("roberta", "prompt", False),
        ("bert", "prompt", False),
        ("bert-no-pooler", "prefix", False),
        ("bert-no-pooler", "prompt", False),
    ],
)
def test_train_export_matches_engine_and_peft(arch, kind, projection, backbones, all_backbones, data, tmp_path):
    bb, bdir = backbones[arch], all_backbones[arch]
    classifier_weight = "base_model.classifier." + ("out_proj.weight" if arch == "roberta" else "weight")
    before = {k: v.clone() for k, v in bb.encoder.state_dict().items()}
    out = tmp_path / "a.safetensors"
    res = train(cfg(bdir, data, kind=kind, prefix_projection=projection, out=str(out), epochs=2), backbone=bb)

    # only the adapter changed (backbone bitwise identical)
    after = bb.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fresh = AdapterModel(
        bb.encoder, 2, kind=kind, num_virtual_tokens=4, prefix_projection=projection, encoder_hidden_size=16, seed=42
    )
    assert not torch.equal(fresh.virtual.materialise(), res.model.virtual.materialise())
    assert not torch.equal(fresh.head.peft_state()[classifier_weight], res.model.head.peft_state()[classifier_weight])
    # a backbone without a checkpoint pooler: the head trains and exports its own (else: exactly as before)
    pooler_key = "base_model.bert.pooler.dense.weight"
    assert (pooler_key in res.model.adapter_tensors()) == (arch == "bert-no-pooler") == res.log["head_has_pooler"]
    if arch == "bert-no-pooler":
        assert not torch.equal(fresh.head.peft_state()[pooler_key], res.model.head.peft_state()[pooler_key])
    assert (
        set(res.log["trainable_params"]) == {"virtual", "head", "backbone"}
        and res.log["trainable_params"]["backbone"] == 0
    )

    # the file on disk + the JSON log
    packed = out.read_bytes()
    assert packed == res.packed
    meta = load_packed(packed, expect=bb.spec).meta
    assert meta.kind == kind and meta.labels == ("0", "1") and meta.fingerprint == bb.fingerprint
    log = json.loads((tmp_path / "a.safetensors.log.json").read_text())
    assert len(log["epochs"]) == 2 and log["peak_memory_bytes"] > 0 and log["fingerprint"] == bb.fingerprint
    assert {"eval_accuracy", "eval_macro_f1"} <= set(log["epochs"][0])

    # trainer's own eval forward == engine (mixed with another tenant) == PEFT
    room = bb.encoder.text_room(4, None)
    rows = tokenize(bb.tokenizer, [Example(t, "0") for t in TEXTS], res.labels, room)
    with torch.no_grad():
        mine = res.model.eval()([r[0] for r in rows], [r[1] for r in rows])  # (N, C)
    engine = Engine(bb)
    adapter = engine.adapter("t/a@1", lambda: packed)

    def other_tenant() -> bytes:  # a second adapter in the same batch
        packed = train(cfg(bdir, data, kind="prefix", num_virtual_tokens=2, epochs=1), backbone=bb).packed
        assert packed is not None
        return packed

    other = engine.adapter("t/b@1", other_tenant)
    batch = [r for t in TEXTS for r in (Row(adapter, t), Row(other, t))]
    served = torch.stack(engine.forward(batch)[0][::2])  # (N, C)
    assert (served - mine).abs().max() <= TOL

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    folder = unpack(packed, tmp_path / "peft")
    base = AutoModelForSequenceClassification.from_pretrained(bdir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, str(folder)).eval()
    for i, text in enumerate(TEXTS[:4]):  # PEFT itself does not truncate to leave room for the prefix
        enc = bb.tokenizer(text, return_tensors="pt")
        if base.config.type_vocab_size < 2:
            enc.pop("token_type_ids", None)
        with torch.no_grad():
            ref = peft_model(**enc).logits[0]
        assert (ref - mine[i]).abs().max() <= TOL


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_loss_decreases(kind, learnable, data):
    """Loss of the trained adapter on the training set is below that of its (identically seeded) start."""
    from prefixserve.trainer.train import evaluate

    bb = load_backbone(learnable, device="cpu")
    res = train(cfg(learnable, data, kind=kind, epochs=8, head_lr=1e-2), backbone=bb)
    start = AdapterModel(bb.encoder, 2, kind=kind, num_virtual_tokens=4, seed=42, prefix_init="tokens")
    tokenizer = tokenizer_of(bb)
    rows = tokenize(tokenizer, read_examples(data["train"]).examples, res.labels, bb.encoder.text_room(4, 128))
    before, _ = evaluate(start, rows, 64, "cpu", 2)
    after, _ = evaluate(res.model, rows, 64, "cpu", 2)
    assert after["loss"] < before["loss"] - 0.02, (before, after)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_prefix_init_from_token_activations(backbones, all_backbones):
    """``prefix_init="tokens"``: the prefix starts as real keys/values, which match the layer's own K/V."""
    bb = backbones["roberta"]
    model = AdapterModel(bb.encoder, 2, kind="prefix", num_virtual_tokens=3, prefix_init="tokens", seed=1)
    flat = model.virtual.materialise()  # (P, layers*2*H)
    assert flat.shape == (3, 2 * 2 * 32)
    kv = flat.view(3, 2, 2, 32)  # (P, layers, 2, H)
    ids = torch.randint(
        min(1000, bb.config.vocab_size // 2), bb.config.vocab_size, (1, 3), generator=torch.Generator().manual_seed(1)
    )
    from transformers import AutoModel

    hf = AutoModel.from_pretrained(all_backbones["roberta"]).eval()  # the reference: transformers' own layer 0
    with torch.no_grad():
        hidden0 = hf.embeddings(input_ids=ids)  # (1, P, H): input of layer 0
        key0 = hf.encoder.layer[0].attention.self.key(hidden0)[0]  # (P, H)
    assert torch.allclose(kv[:, 0, 0], key0, atol=1e-5)


def test_deterministic_for_a_seed(backbones, tiny_backbones, data):
    a = train(cfg(tiny_backbones["bert"], data, epochs=1), backbone=backbones["bert"])
    b = train(cfg(tiny_backbones["bert"], data, epochs=1), backbone=backbones["bert"])
    c = train(cfg(tiny_backbones["bert"], data, epochs=1, seed=7), backbone=backbones["bert"])
    assert a.packed == b.packed and a.packed != c.packed


def test_early_stopping_keeps_best_epoch(backbones, tiny_backbones, data):
    res = train(
        cfg(tiny_backbones["roberta"], data, epochs=8, patience=1, lr=0.5, head_lr=0.5), backbone=backbones["roberta"]
    )
    accs = [h["eval_accuracy"] for h in res.history]
    assert res.best["eval_accuracy"] == max(accs)
    assert len(accs) == 8 or accs[-1] <= res.best["eval_accuracy"]


def test_full_fine_tuning_leaves_the_shared_backbone_alone(backbones, tiny_backbones, data):
    bb = backbones["bert"]
    before = {k: v.clone() for k, v in bb.encoder.state_dict().items()}
    res = train(
        cfg(tiny_backbones["bert"], data, kind=None, train_backbone=True, backbone_lr=1e-3, epochs=1), backbone=bb
    )
    assert res.packed is None and res.log["trainable_params"]["backbone"] > 0
    assert all(torch.equal(before[k], v) for k, v in bb.encoder.state_dict().items())
    assert not torch.equal(
        res.model.encoder.embeddings.word_embeddings.weight, bb.encoder.embeddings.word_embeddings.weight
    )


# ---- pre-trained prefix -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tiny_backbones, data):
    corpus = data["dir"] / "corpus.txt"
    rng = random.Random(3)
    corpus.write_text("\n".join(" ".join(rng.choice(FILLER + POS + NEG) for _ in range(10)) for _ in range(64)))
    out = data["dir"] / "prefix.safetensors"
    res = pretrain(
        PretrainConfig(
            backbone=tiny_backbones["roberta"],
            corpus=str(corpus),
            num_virtual_tokens=4,
            steps=40,
            lr=3e-2,
            batch_size=16,
            out=str(out),
            progress=False,
            device="cpu",
        )
    )
    return out, res


def test_pretrain_lowers_mlm_loss(pretrained):
    out, res = pretrained
    assert res["log"]["loss_after"] < res["log"]["loss_before"]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["prompt_embeddings"] and f.get_tensor("prompt_embeddings").shape == (4, 2 * 2 * 32)
    assert meta["format"] == "prefixserve.pretrained_prefix" and meta["kind"] == "prefix"
    assert json.loads(meta["adapter_config"])["peft_type"] == "PREFIX_TUNING"


def test_init_from_round_trip_and_errors(pretrained, backbones, tiny_backbones, data):
    out, res = pretrained
    bb = backbones["roberta"]
    init = load_prefix_init(str(out), bb)
    assert torch.equal(init, res["prefix"])
    model = AdapterModel(bb.encoder, 2, kind="prefix", num_virtual_tokens=4, init=init)
    assert torch.equal(model.virtual.materialise(), res["prefix"])  # training starts exactly there
    trained = train(
        cfg(tiny_backbones["roberta"], data, init_from=str(out), num_virtual_tokens=None, epochs=1), backbone=bb
    )
    assert trained.model.num_virtual_tokens == 4
    # a packed prefix adapter also seeds a prefix
    again = tiny_backbones["roberta"] + "-adapter.safetensors"
    assert trained.packed is not None
    Path(again).write_bytes(trained.packed)
    assert torch.equal(load_prefix_init(again, bb), trained.model.virtual.materialise())
    with pytest.raises(BadRequestError):  # length mismatch
        load_prefix_init(str(out), bb, num_virtual_tokens=5)
    with pytest.raises(FingerprintMismatchError):  # another backbone
        load_prefix_init(str(out), backbones["bert"])
    with pytest.raises(BadRequestError):
        train(cfg(tiny_backbones["roberta"], data, init_from=str(out), prefix_projection=True), backbone=bb)
    with pytest.raises(BadRequestError):
        train(cfg(tiny_backbones["roberta"], data, init_from=str(out), kind="prompt"), backbone=bb)


def test_pretrain_needs_an_mlm_head(tmp_path, tiny_backbones):
    from transformers import AutoModel, AutoTokenizer

    plain = tmp_path / "plain"
    AutoModel.from_pretrained(tiny_backbones["bert"]).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_backbones["bert"]).save_pretrained(plain)
    corpus = tmp_path / "c.txt"
    corpus.write_text("the movie\n")
    with pytest.raises(PrefixServeError) as err:
        pretrain(PretrainConfig(backbone=str(plain), corpus=str(corpus), steps=1, progress=False, device="cpu"))
    assert err.value.code == "no_mlm_head"

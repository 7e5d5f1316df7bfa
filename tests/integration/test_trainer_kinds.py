"""Trainer ``--kind lora|ia3|bottleneck``: the weight adapter trains through the serving encoder, only the adapter
and the head move, and the exported file serves (Engine) the trainer's own eval logits."""

from __future__ import annotations

import random

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.format import load_packed
from prefixserve.trainer.config import KIND_LR
from prefixserve.trainer.data import Example, read_examples
from prefixserve.trainer.model import AdapterModel, tokenize, tokenizer_of
from prefixserve.trainer.train import TrainConfig, evaluate, train
from tests.fixtures.backbones import learnable_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-5
POS, NEG = ["good", "great", "fun", "best", "love"], ["bad", "terrible", "boring", "worst", "hate"]
FILLER = ["the", "movie", "film", "plot", "actor", "story", "was", "it"]
TEXTS = ["the movie was good", "bad plot terrible actors were not fun at all", "fun", " ".join(["movie"] * 200)]
# per kind: the options under test (non-default where it exercises more of the mapping) and the body tensors
KINDS = {
    "lora": ({"lora_r": 4, "lora_targets": ["query", "value", "output.dense"]}, "lora_B.weight"),
    "ia3": ({}, "ia3_l"),
    "bottleneck": ({"bottleneck": "houlsby", "reduction_factor": 8}, "adapter_up.weight"),
}


def write_tsv(path, n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["id\tdocument\tlabel"]
    for i in range(n):
        y = i % 2
        words = [rng.choice(FILLER) for _ in range(3)] + [rng.choice(POS if y else NEG)] * 2
        rng.shuffle(words)
        lines.append(f"{i}\t{' '.join(words)}\t{y}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("kinds-data")
    return {"train": write_tsv(d / "train.tsv", 64, 0)}


@pytest.fixture(scope="module")
def learnable(tmp_path_factory) -> str:
    """A tiny BERT without pooler weights (the head trains its own) whose matrices are N(0, 0.15), so token
    information reaches position 0 (the shared fixtures' N(0, 0.02) passes almost none)."""
    return learnable_backbone(tmp_path_factory.mktemp("kinds-bb"), "bert", 7, pooler=False)


def config(bdir: str, data: dict[str, str], kind: str, **kw) -> TrainConfig:
    """The kind's default LR; eval on the training rows, so the kept epoch is one that fits them best."""
    base = dict(backbone=bdir, train=data["train"], eval=data["train"], kind=kind, epochs=10, batch_size=8)
    return TrainConfig(**{**base, "patience": 0, "progress": False, **KINDS[kind][0], **kw})


@pytest.mark.parametrize("kind", list(KINDS))
def test_weight_kind_trains_and_serves(kind, learnable, data, tmp_path):
    bb = load_backbone(learnable, device="cpu", dtype="float32")
    before = {k: v.clone() for k, v in bb.encoder.state_dict().items()}
    out = tmp_path / "a.safetensors"
    cfg = config(learnable, data, kind, out=str(out))
    res = train(cfg, backbone=bb)

    # the backbone is bit-identical; the adapter body and the head (with its own pooler) both moved
    assert all(torch.equal(before[k], v) for k, v in bb.encoder.state_dict().items())
    start = AdapterModel(bb.encoder, 2, kind=kind, seed=cfg.seed, weight_options=cfg)
    assert not any(p.requires_grad for p in bb.encoder.parameters())
    assert set(res.log["trainable_params"]) == {"weights", "head", "backbone"}
    assert res.log["trainable_params"]["backbone"] == 0 and res.log["trainable_params"]["weights"] > 0
    assert res.log["num_virtual_tokens"] == 0
    a0, a1 = start.adapter_tensors(), res.model.adapter_tensors()
    assert a0.keys() == a1.keys() and "base_model.bert.pooler.dense.weight" in a1
    body = [k for k in a1 if k.endswith(KINDS[kind][1])]
    assert body and all(not torch.equal(a0[k], a1[k]) for k in body)
    assert not torch.equal(a0["base_model.classifier.weight"], a1["base_model.classifier.weight"])
    # ... and the trainer's parameter groups are exactly the adapter's and the head's
    groups = res.model.trainable_parameters()
    assert res.model.weights is not None
    assert {id(p) for p in groups["weights"]} == {id(p) for p in res.model.weights.parameters()}

    # loss on the training rows fell from the (identically seeded) start
    room = bb.encoder.text_room(0, cfg.max_length)
    train_rows = tokenize(tokenizer_of(bb), read_examples(data["train"]).examples, res.labels, room)
    loss0, _ = evaluate(start, train_rows, 64, "cpu", 2)
    loss1, _ = evaluate(res.model, train_rows, 64, "cpu", 2)
    assert loss1["loss"] < loss0["loss"] - 0.02, (loss0, loss1)

    # the file: this kind, this config, and the Engine gives the trainer's eval logits (mixed batch)
    packed = out.read_bytes()
    assert packed == res.packed
    loaded = load_packed(packed, expect=bb.spec)
    assert loaded.meta.kind == kind and loaded.peft_config["task_type"] == "SEQ_CLS"
    assert loaded.peft_config["peft_type"] == kind.upper() and loaded.meta.num_virtual_tokens == 0
    rows = tokenize(tokenizer_of(bb), [Example(t, "0") for t in TEXTS], res.labels, bb.encoder.text_room(0, None))
    with torch.no_grad():
        mine = res.model.eval()([r[0] for r in rows], [r[1] for r in rows])  # (N, C)
        fresh = start.eval()([r[0] for r in rows], [r[1] for r in rows])  # (N, C)
    engine = Engine(bb)
    adapter = engine.adapter("t/w@1", lambda: packed)

    def other_tenant() -> bytes:  # a second weight adapter in the same batch, on its own segment
        packed = train(config(learnable, data, "lora", epochs=1), backbone=bb).packed
        assert packed is not None
        return packed

    other = engine.adapter("t/o@1", other_tenant)
    batch = [r for t in TEXTS for r in (Row(other, t), Row(adapter, t))]
    served = torch.stack(engine.forward(batch)[0][1::2])  # (N, C)
    assert (served - mine).abs().max() <= TOL
    assert (mine - fresh).abs().max() > 1e-3  # the trained adapter moved the logits


def test_options_reach_the_packages(learnable):
    """Each CLI option lands in the package config; per-kind default LRs exist; dropout only in train mode."""
    bb = load_backbone(learnable, device="cpu", dtype="float32")
    opts = TrainConfig(backbone="-", train="-", lora_r=2, lora_alpha=4, rslora=True, lora_targets=["key"])
    m = AdapterModel(bb.encoder, 2, kind="lora", weight_options=opts)
    c = m.peft_config("my/base")
    assert (c["r"], c["lora_alpha"], c["use_rslora"], c["target_modules"]) == (2, 4, True, ["key"])
    assert c["base_model_name_or_path"] == "my/base" and c["modules_to_save"][0] == "pooler"
    assert {k.split(".")[-3] for k in m.adapter_tensors() if "lora_" in k} == {"key"}
    ia3 = AdapterModel(bb.encoder, 2, kind="ia3", weight_options=TrainConfig(backbone="-", train="-"))
    assert ia3.peft_config()["target_modules"] == ["key", "value", "output.dense"]
    ia3 = AdapterModel(
        bb.encoder, 2, kind="ia3", weight_options=TrainConfig(backbone="-", train="-", ia3_targets=["query"])
    )
    assert ia3.peft_config()["target_modules"] == ["query"] and ia3.peft_config()["feedforward_modules"] == []
    bn = AdapterModel(bb.encoder, 2, kind="bottleneck", weight_options=TrainConfig(backbone="-", train="-"))
    bc = bn.peft_config()
    assert (bc["mh_adapter"], bc["output_adapter"], bc["non_linearity"], bc["reduction_factor"]) == (
        False,
        True,
        "relu",
        16,
    )
    assert set(KIND_LR) == {"prefix", "prompt", "lora", "ia3", "bottleneck"}

    # LoRA dropout: active in train mode (two forwards differ), off in eval mode (the served logits)
    drop = AdapterModel(
        bb.encoder, 2, kind="lora", weight_options=TrainConfig(backbone="-", train="-", lora_dropout=0.5)
    )
    with torch.no_grad():
        for p in drop.weights.parameters():  # a non-zero update (LoRA's B starts at 0)
            p.normal_(0, 0.5)
    ids = [tokenizer_of(bb)("the movie was good")["input_ids"]]
    with torch.no_grad():
        drop.train()
        drop.dropout.p = 0.0  # the head's dropout off: only LoRA's can differ
        assert not torch.equal(drop(ids), drop(ids))
        drop.eval()
        assert torch.equal(drop(ids), drop(ids))

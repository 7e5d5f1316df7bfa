"""``experiment table1`` with MLM pre-trained prefixes (``--pretrain-corpus``), on tiny backbones."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.server.main import main
from prefixserve.trainer.experiment import MLM_INIT, ExperimentConfig, plan, pretrained_prefix_path, run_table1
from prefixserve.trainer.pretrain import load_prefix_init
from tests.integration.test_trainer import FILLER, NEG, POS, write_tsv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("table1")
    rng = random.Random(3)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(FILLER + POS + NEG) for _ in range(10)) for _ in range(48)))
    return {"train": write_tsv(d / "train.tsv", 32, 0), "eval": write_tsv(d / "eval.tsv", 16, 1), "corpus": str(corpus)}


def test_plan_adds_one_mlm_row_per_length(tmp_path):
    base: dict[str, Any] = dict(backbone="b", train="t", out=str(tmp_path), lengths=[2, 4, 500])
    rows, skipped = plan(ExperimentConfig(**base, pretrain_corpus="c.txt"), max_virtual=30)
    mlm = [r for r in rows if r.mlm_length is not None]
    assert [r.name for r in mlm] == [
        f"prefix P=2, {MLM_INIT} (frozen)",
        f"prefix P=4, {MLM_INIT} (frozen)",
        f"prefix P=2, {MLM_INIT} + full fine-tuning",
    ]
    for r in mlm:  # each starts from the file pre-trained at ITS length, materialised (no projection)
        assert r.mlm_length is not None
        assert r.overrides["init_from"] == str(pretrained_prefix_path(str(tmp_path), r.mlm_length))
        assert r.overrides["num_virtual_tokens"] == r.mlm_length and r.overrides["prefix_projection"] is False
    assert mlm[-1].overrides["train_backbone"] is True and "P=500" in skipped[0]
    plain, _ = plan(ExperimentConfig(**base), max_virtual=30)  # no corpus: no MLM rows, nothing else changes
    assert [r.name for r in plain] == [r.name for r in rows if r.mlm_length is None]


def test_corpus_needs_an_mlm_head(tmp_path, tiny_backbones, files, capsys):
    from transformers import AutoModel, AutoTokenizer

    plain = tmp_path / "plain"  # the same tiny BERT saved without its MLM head, like a sentence-embedding model
    AutoModel.from_pretrained(tiny_backbones["bert"]).save_pretrained(plain)
    AutoTokenizer.from_pretrained(tiny_backbones["bert"]).save_pretrained(plain)
    out = tmp_path / "t1"
    argv = ["experiment", "table1", "--backbone", str(plain), "--train", files["train"], "--eval", files["eval"]]
    argv += ["--lengths", "2", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main([*argv, "--pretrain-corpus", files["corpus"]]) == 2
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]["code"] == "no_mlm_head"
    assert not (out / "table1.json").exists()  # refused before any row trained
    assert main([*argv, "--pretrain-corpus", str(tmp_path / "missing.txt")]) == 2
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]["code"] == "file_not_found"


def test_table1_with_mlm_pretrained_prefixes(tiny_backbones, files, tmp_path):
    out = tmp_path / "t1"
    cfg = ExperimentConfig(
        backbone=tiny_backbones["roberta"],
        train=files["train"],
        eval=files["eval"],
        out=str(out),
        lengths=[2, 4],
        epochs=1,
        batch_size=16,
        lr=0.0,  # the virtual tokens stay where they started: the exported prefix IS the init
        pretrain_corpus=files["corpus"],
        pretrain_steps=6,
        pretrain_lr=3e-2,
        save_adapters=True,
        progress=False,
        device="cpu",
    )
    report = run_table1(cfg)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == [
        "linear probe (frozen, head only)",
        "prefix P=2 (frozen)",
        "prefix P=4 (frozen)",
        f"prefix P=2, {MLM_INIT} (frozen)",
        f"prefix P=4, {MLM_INIT} (frozen)",
        "full fine-tuning",
        "prefix P=2 + full fine-tuning",
        f"prefix P=2, {MLM_INIT} + full fine-tuning",
    ]
    assert [p["num_virtual_tokens"] for p in report["pretraining"]] == [2, 4]
    assert all(p["steps"] == 6 and p["pretrain_time_s"] > 0 for p in report["pretraining"])
    assert [r["pretrain_time_s"] is not None for r in rows.values()] == [r["mlm_pretrained"] for r in rows.values()]
    assert sum(r["mlm_pretrained"] for r in rows.values()) == 3
    assert all(0 <= r["accuracy"] <= 1 and r["trainable_params"] > 0 for r in rows.values())

    # the MLM rows really start from the pre-trained prefix of their own length, the plain rows do not
    backbone = load_backbone(tiny_backbones["roberta"], device="cpu")
    for p in (2, 4):
        pretrained = load_prefix_init(str(pretrained_prefix_path(str(out), p)), backbone, p)
        mlm_row = load_prefix_init(rows[f"prefix P={p}, {MLM_INIT} (frozen)"]["adapter"], backbone, p)
        plain_row = load_prefix_init(rows[f"prefix P={p} (frozen)"]["adapter"], backbone, p)
        assert torch.equal(mlm_row, pretrained)
        assert not torch.allclose(plain_row, pretrained)

    md = (out / "table1.md").read_text()
    assert all(f"| {name} |" in md for name in rows)
    assert "pretrain time (s)" in md and "| 4 | 6 | 48 |" in md  # the pre-training table: P, steps, lines
    assert "no --pretrain-corpus" not in md
    assert json.loads((out / "table1.json").read_text())["rows"][3]["row"] == f"prefix P=2, {MLM_INIT} (frozen)"

    # the plot: one labelled point per row, and a real picture (not blank)
    import matplotlib.image

    assert report["plot"]["points"] == [r["label"] for r in rows.values()]
    assert len(set(report["plot"]["points"])) == len(rows)
    png = (out / "table1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(out / "table1.png")  # (H, W, 4) floats
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and float(pixels[..., :3].std()) > 0.05

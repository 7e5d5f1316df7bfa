"""The same backbone is the same function in every process (issue #11, B).

A BERT checkpoint without pooler weights (multilingual-e5, many sentence-transformers exports) used to get a
random pooler at every load while its fingerprint stayed the same, so a BERT-style head trained in one
process scored at chance in another. Now the random pooler is removed at load, the head brings its own
(trained, stored in the adapter), and a head without one is refused on such a backbone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.format import inspect_packed
from prefixserve.adapters.synthetic import random_adapter
from prefixserve.trainer.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models; identical reductions across processes

TEXTS = ["the movie was good", "bad plot terrible actors", "영화 최고 감동", "fun", "i hate this boring film"]

# Loads the backbone and the packed adapter in a fresh interpreter; prints its engine logits, and the
# backbone's own output for the texts, as JSON (Python floats round-trip exactly).
SERVE = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    backbone_dir, adapter_path, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    bb = load_backbone(backbone_dir, device="cpu")
    engine = Engine(bb)
    adapter = engine.adapter("t/a@1", lambda: open(adapter_path, "rb").read())
    logits = engine.forward([Row(adapter, t) for t in texts])[0]
    enc = bb.tokenizer(texts)
    with torch.no_grad():
        hidden = bb.encoder(bb.encoder.pack(enc["input_ids"], enc.get("token_type_ids")))
    print(json.dumps({
        "fingerprint": bb.fingerprint,
        "has_pooler": bb.has_pooler,
        "logits": [x.tolist() for x in logits],
        "hidden": hidden.flatten().tolist(),
    }))
    """
)


@pytest.fixture(scope="module")
def train_tsv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("identity") / "train.tsv"
    pos, neg = ["good", "great", "fun", "love"], ["bad", "terrible", "boring", "hate"]
    rows = [f"{i}\tthe movie was {(pos if i % 2 else neg)[i % 4]} really\t{i % 2}" for i in range(48)]
    path.write_text("id\tdocument\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def _returns(data: bytes) -> Callable[[], bytes]:
    """An ``Engine.adapter`` loader bound to these bytes (not to a loop variable)."""
    return lambda: data


def _hidden(bb, texts: list[str]) -> torch.Tensor:
    enc = bb.tokenizer(texts)
    with torch.no_grad():
        return bb.encoder(bb.encoder.pack(enc["input_ids"], enc.get("token_type_ids")))  # (T, H), packed


def test_a_checkpoint_without_pooler_weights_loads_without_a_pooler(pooler_less_bert, tiny_backbones):
    bb = load_backbone(pooler_less_bert, device="cpu")
    assert bb.encoder.pooler is None and not bb.has_pooler  # no randomly initialised module survives the load
    assert bb.spec.has_pooler is False and bb.spec.head_style == "bert"  # still a BERT: PEFT's BERT head
    with_pooler = load_backbone(tiny_backbones["bert"], device="cpu")
    assert with_pooler.has_pooler and with_pooler.spec.has_pooler and with_pooler.spec.head_style == "bert"


def test_fingerprint_says_whether_the_pooler_is_there(pooler_less_bert, tiny_backbones):
    """Same seed, same encoder tensors; only the pooler weights differ: the fingerprints must too."""
    without = load_backbone(pooler_less_bert, device="cpu")
    with_pooler = load_backbone(tiny_backbones["bert"], device="cpu")
    assert without.fingerprint != with_pooler.fingerprint
    encoder = {k: v for k, v in with_pooler.encoder.state_dict().items() if not k.startswith("pooler.")}
    assert all(torch.equal(v, without.encoder.state_dict()[k]) for k, v in encoder.items())
    assert set(without.encoder.state_dict()) == set(encoder)


def test_loading_twice_gives_the_same_function(pooler_less_bert):
    a, b = (load_backbone(pooler_less_bert, device="cpu") for _ in range(2))
    assert a.fingerprint == b.fingerprint
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(_hidden(a, TEXTS), _hidden(b, TEXTS))


def test_a_trained_bert_head_scores_the_same_in_another_process(pooler_less_bert, train_tsv, tmp_path):
    bb = load_backbone(pooler_less_bert, device="cpu")
    cfg = TrainConfig(
        backbone=pooler_less_bert,
        train=train_tsv,
        kind="prefix",
        num_virtual_tokens=4,
        epochs=2,
        batch_size=16,
        patience=0,
        progress=False,
    )
    res = train(cfg, backbone=bb)
    packed = res.packed
    assert packed is not None and res.log["head_has_pooler"] and not res.log["backbone_has_pooler"]
    meta = inspect_packed(packed, expect=bb.spec)
    assert meta.has_pooler and meta.head_style == "bert"
    path = tmp_path / "a.safetensors"
    path.write_bytes(packed)

    engine = Engine(bb)  # the training process's own engine
    adapter = engine.adapter("t/a@1", lambda: packed)
    mine = torch.stack(engine.forward([Row(adapter, t) for t in TEXTS])[0])  # (N, C)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(
        [sys.executable, "-c", SERVE, pooler_less_bert, str(path), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other["fingerprint"] == bb.fingerprint and other["has_pooler"] is False
    theirs = torch.tensor(other["logits"])  # (N, C)
    assert torch.equal(theirs, mine), (theirs - mine).abs().max()  # bit-identical, not merely close
    hidden = _hidden(bb, TEXTS)  # and the backbone itself is the same function there
    assert torch.equal(torch.tensor(other["hidden"]).view_as(hidden), hidden)


def test_a_bert_head_must_bring_a_pooler_where_the_backbone_has_none(pooler_less_bert, tiny_backbones):
    bb = load_backbone(pooler_less_bert, device="cpu")
    plain = random_adapter(bb.config, bb.fingerprint, num_virtual_tokens=3)
    with pytest.raises(InvalidAdapterError) as err:
        inspect_packed(plain, expect=bb.spec)
    assert err.value.code == "needs_pooler" and err.value.status == 422
    with pytest.raises(InvalidAdapterError):
        Engine(bb).adapter("t/a@1", lambda: plain)
    own = random_adapter(bb.config, bb.fingerprint, num_virtual_tokens=3, own_pooler=True)
    assert inspect_packed(own, expect=bb.spec).has_pooler
    engine = Engine(bb)
    assert engine.forward([Row(engine.adapter("t/b@1", lambda: own), "fun")])[0][0].shape == (2,)

    # on a backbone with its checkpoint pooler, both kinds of BERT head are served; an own pooler wins
    pooled = load_backbone(tiny_backbones["bert"], device="cpu")
    engine = Engine(pooled)
    logits = []
    for own_pooler in (False, True):  # the same adapter but for the pooler (drawn last)
        data = random_adapter(pooled.config, pooled.fingerprint, num_virtual_tokens=3, own_pooler=own_pooler)
        assert inspect_packed(data, expect=pooled.spec).has_pooler == own_pooler
        adapter = engine.adapter(f"t/c{own_pooler}@1", _returns(data))
        logits.append(engine.forward([Row(adapter, "fun")])[0][0])
    assert not torch.equal(logits[0], logits[1])

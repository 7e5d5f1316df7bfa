"""Every row of a mixed-tenant batch equals the row alone AND PEFT's own PeftModel output (fp32, 1e-5)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.peft_io import pack_folder
from tests.fixtures.backbones import make_peft_adapter, peft_logits

TOL = 1e-5
# (method, num_virtual_tokens, num_labels): both kinds, different lengths and label counts
ADAPTERS = [("prefix", 5, 2), ("prefix_projection", 11, 3), ("prompt", 4, 5), ("p_tuning", 7, 2), ("prefix", 2, 4)]
TEXTS = [
    "정말 재미 있다 movie",
    "bad plot and terrible actors were not fun at all",
    "the",
    "great film 최고 감동",
    "i love this story",
    "boring 지루 하다",
]


def _returns(packed: bytes) -> Callable[[], bytes]:
    """An ``Engine.adapter`` loader bound to this adapter's bytes (not to the loop variable)."""
    return lambda: packed


@pytest.fixture(scope="module", params=["roberta", "bert", "bert-no-pooler", "xlm-roberta"])
def setup(request, tiny_backbones, tmp_path_factory):
    """``bert-no-pooler``: a checkpoint without pooler weights; PEFT trains and saves the pooler with the head
    (``modules_to_save``), so PEFT's reference and our engine both use the adapter's pooler, never a random one."""
    arch = request.param
    no_pooler = arch == "bert-no-pooler"
    if arch == "xlm-roberta":
        bdir = request.getfixturevalue("tiny_xlmr")
    else:
        bdir = request.getfixturevalue("pooler_less_bert") if no_pooler else tiny_backbones[arch]
    backbone = load_backbone(bdir)
    assert backbone.has_pooler == (arch == "bert")
    engine = Engine(backbone)
    adapters = []
    for k, (method, p, c) in enumerate(ADAPTERS):
        folder = make_peft_adapter(
            bdir,
            tmp_path_factory.mktemp(f"{arch}-{method}-{k}"),
            method,
            p,
            c,
            seed=k,
            modules_to_save=["pooler"] if no_pooler else None,
        )
        labels = [f"{method}-{i}" for i in range(c)]
        packed = pack_folder(folder, labels=labels, fingerprint=backbone.fingerprint)
        adapters.append((folder, c, engine.adapter(f"tenant{k}/a{k}@1", _returns(packed))))
    return bdir, backbone, engine, adapters


def test_mixed_batch_equals_alone_and_peft(setup):
    bdir, backbone, engine, adapters = setup
    # every adapter gets every text, interleaved so rows of all tenants share each forward
    rows = [Row(adapters[(i + j) % len(adapters)][2], t) for j in range(2) for i, t in enumerate(TEXTS)]
    mixed = engine.forward(rows)[0]
    assert len({r.adapter.key for r in rows}) == len(adapters)
    for row, got in zip(rows, mixed):
        alone = engine.forward([row])[0][0]
        assert torch.allclose(got, alone, atol=TOL, rtol=0), (row.adapter.key, (got - alone).abs().max())
    for folder, c, adapter in adapters:
        mine = [got for row, got in zip(rows, mixed) if row.adapter is adapter]
        texts = [row.text for row in rows if row.adapter is adapter]
        ref, no_adapter = peft_logits(bdir, folder, c, backbone.tokenizer, texts)
        for got, want, plain in zip(mine, ref, no_adapter):
            assert got.shape == want.shape
            assert (got - want).abs().max() <= TOL, (adapter.key, (got - want).abs().max())
            # an adapter that changed nothing would pass the equality above: it must move the logits
            assert (want - plain).abs().max() > 100 * TOL


def test_text_pairs_match_peft(setup):
    bdir, backbone, engine, adapters = setup
    folder, c, adapter = adapters[0]
    pairs = ["bad plot", None, "정말 최고", None, "no", "fun"]
    rows = [Row(adapter, t, p) for t, p in zip(TEXTS, pairs)] + [Row(adapters[2][2], TEXTS[0], "x")]
    got = engine.forward(rows)[0][: len(TEXTS)]
    ref, _ = peft_logits(bdir, folder, c, backbone.tokenizer, TEXTS, pairs)
    for g, w in zip(got, ref):
        assert (g - w).abs().max() <= TOL


def test_truncation_leaves_room_for_the_adapter(setup):
    _, backbone, engine, adapters = setup
    long_text = " ".join(["movie"] * 500)
    preds = engine.predict([Row(a, long_text) for _, _, a in adapters] + [Row(adapters[0][2], "short")])
    assert all(p.truncated for p in preds[:-1]) and not preds[-1].truncated
    max_pos = backbone.config.max_position_embeddings
    for _, _, a in adapters:  # positions never run past the table: room shrinks with P
        assert engine.room(a) + a.length <= max_pos


def test_predictions_are_probabilities_with_label_names(setup):
    _, _, engine, adapters = setup
    preds = engine.predict([Row(a, "great film") for _, _, a in adapters])
    for p, (_, c, a) in zip(preds, adapters):
        assert list(p.scores) == list(a.meta.labels) and len(p.logits) == c
        assert abs(sum(p.scores.values()) - 1) < 1e-5 and p.label == max(p.scores, key=p.scores.get)


def test_cache_counts_hits_and_misses(setup):
    _, _, engine, adapters = setup
    before = engine.cache.stats.hits
    for _, _, a in adapters:
        assert engine.adapter(a.key, lambda: pytest.fail("must be a cache hit")) is a
    assert engine.cache.stats.hits == before + len(adapters)


def test_bert_head_without_a_pooler_is_refused_on_a_pooler_less_backbone(pooler_less_bert, tmp_path):
    """PEFT's default SEQ_CLS save has no pooler: on this backbone it would run on a random one, so it is refused."""
    backbone = load_backbone(pooler_less_bert)
    folder = make_peft_adapter(pooler_less_bert, tmp_path / "plain", "prefix", 3, 2)
    packed = pack_folder(folder, fingerprint=backbone.fingerprint)  # a well-formed file...
    with pytest.raises(InvalidAdapterError) as err:  # ...that does not fit this backbone
        Engine(backbone).adapter("t/a@1", _returns(packed))
    assert err.value.code == "needs_pooler" and err.value.status == 422

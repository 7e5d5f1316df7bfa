"""Packed format: lossless with PEFT folders, and every validation failure has its own error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save as st_save

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.errors import AdapterTooLargeError, FingerprintMismatchError, InvalidAdapterError
from prefixserve.adapters.format import Limits, dump_packed, inspect_packed, load_packed
from prefixserve.adapters.peft_io import pack_folder, unpack
from tests.fixtures.backbones import make_peft_adapter, peft_logits


@pytest.fixture(scope="module")
def packed(tiny_backbones, tmp_path_factory):
    bdir = tiny_backbones["roberta"]
    backbone = load_backbone(bdir)
    folder = make_peft_adapter(bdir, tmp_path_factory.mktemp("peft"), "prefix_projection", 6, 3)
    data = pack_folder(folder, labels=["neg", "neu", "pos"], fingerprint=backbone.fingerprint)
    return bdir, backbone, folder, data


def test_peft_pack_unpack_peft_gives_same_logits(packed, tmp_path):
    bdir, backbone, folder, data = packed
    out = unpack(data, tmp_path / "unpacked")
    texts = ["great film", "정말 재미 없다"]
    want, _ = peft_logits(bdir, folder, 3, backbone.tokenizer, texts)
    got, _ = peft_logits(bdir, str(out), 3, backbone.tokenizer, texts)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert pack_folder(out) == data  # lossless: unpack -> pack is byte-identical (labels, fingerprint kept)


def test_metadata_round_trip(packed):
    _, backbone, _, data = packed
    meta = inspect_packed(data, expect=backbone.spec)
    assert meta.kind == "prefix" and meta.num_virtual_tokens == 6 and meta.labels == ("neg", "neu", "pos")
    assert meta.fingerprint == backbone.fingerprint and meta.head_style == "roberta"
    af = load_packed(data)
    assert af.virtual.shape == (6, 2 * 2 * 32) and af.peft_config["prefix_projection"] is True


def _rebuild(data, *, tensors=None, meta=None, config=None):
    af = load_packed(data)
    header_meta = {
        "format": "prefixserve.adapter",
        "format_version": "1",
        "kind": af.meta.kind,
        "adapter_config": json.dumps(config or af.peft_config),
        "labels": json.dumps(list(af.meta.labels)),
        "backbone": af.meta.fingerprint,
    }
    header_meta.update(meta or {})
    return st_save(tensors or dict(af.tensors), metadata=header_meta)


def _code(data, **kw):
    with pytest.raises(InvalidAdapterError) as err:
        load_packed(data, **kw)
    return err.value.code


def test_header_length_cap(packed):
    data = packed[3]
    assert _code(data, limits=Limits(max_header_bytes=16)) == "header_too_large"  # a real header over the cap
    # a length larger than the file itself: not a safetensors file (random bytes read as a length are huge)
    assert _code(struct.pack("<Q", 10**9) + data[8:]) == "not_safetensors"
    assert _code(b"\x01\x02") == "not_safetensors"


def test_header_must_be_json(packed):
    data = packed[3]
    (n,) = struct.unpack("<Q", data[:8])
    assert _code(data[:8] + b"{" * n + data[8 + n :]) == "bad_header"


def test_dtype_allowed(packed):
    data = packed[3]
    af = load_packed(data)
    tensors = dict(af.tensors)
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"].to(torch.float64)
    assert _code(_rebuild(data, tensors=tensors)) == "bad_dtype"


def test_shapes_agree_with_config_and_backbone(packed):
    _, backbone, _, data = packed
    af = load_packed(data)
    tensors = dict(af.tensors)
    tensors["prompt_embeddings"] = tensors["prompt_embeddings"][:, :-2].contiguous()
    assert _code(_rebuild(data, tensors=tensors)) == "shape_mismatch"
    config = dict(af.peft_config, num_layers=3)  # layers disagree with the tensor width
    assert _code(_rebuild(data, config=config)) == "shape_mismatch"
    spec = backbone.spec
    other = type(spec)(**{**spec.__dict__, "num_layers": 4})
    assert _code(data, expect=other) == "shape_mismatch"


def test_finite_values(packed):
    data = packed[3]
    tensors = dict(load_packed(data).tensors)
    bad = tensors["prompt_embeddings"].clone()
    bad[0, 0] = float("nan")
    tensors["prompt_embeddings"] = bad
    assert _code(_rebuild(data, tensors=tensors)) == "non_finite"


def test_num_virtual_tokens_limit(packed):
    data = packed[3]
    assert _code(data, limits=Limits(max_virtual_tokens=4)) == "too_many_virtual_tokens"


def test_label_count_matches_head(packed):
    data = packed[3]
    assert _code(_rebuild(data, meta={"labels": json.dumps(["a", "b"])})) == "label_mismatch"
    assert _code(_rebuild(data, meta={"labels": json.dumps(["a", "a", "b"])})) == "bad_labels"


def test_total_size_cap(packed):
    with pytest.raises(AdapterTooLargeError):
        load_packed(packed[3], limits=Limits(max_bytes=1000))


def test_wrong_backbone_names_both(packed, tiny_backbones):
    other = load_backbone(tiny_backbones["bert"])
    with pytest.raises(FingerprintMismatchError) as err:
        load_packed(packed[3], expect=other.spec)
    assert packed[1].fingerprint[:23] in err.value.message and other.fingerprint[:23] in err.value.message
    assert err.value.status == 422


def test_not_a_prefixserve_file_and_no_pickle(packed, tmp_path):
    plain = st_save({"x": torch.zeros(2)})
    assert _code(plain) == "missing_metadata"
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidAdapterError) as err:
        pack_folder(tmp_path, fingerprint="sha256:x")
    assert err.value.code == "pickle_refused"


def test_unsupported_peft_type_and_extra_tensors(packed):
    data = packed[3]
    af = load_packed(data)
    assert _code(_rebuild(data, config=dict(af.peft_config, peft_type="ADALORA"))) == "unsupported_peft_type"
    assert _code(_rebuild(data, tensors={**af.tensors, "evil": torch.zeros(1)})) == "bad_tensors"


def test_dump_is_deterministic_and_validates(packed):
    af = load_packed(packed[3])
    a = dump_packed(af.peft_config, af.tensors, list(af.meta.labels), af.meta.fingerprint)
    assert a == dump_packed(
        af.peft_config, dict(reversed(list(af.tensors.items()))), list(af.meta.labels), af.meta.fingerprint
    )
    with pytest.raises(InvalidAdapterError):
        dump_packed(af.peft_config, af.tensors, ["only-one"], af.meta.fingerprint)


def test_fingerprint_is_stable_and_cached(tiny_backbones):
    a = load_backbone(tiny_backbones["roberta"]).fingerprint
    b = load_backbone(tiny_backbones["roberta"], dtype="bfloat16").fingerprint
    assert a == b and a.startswith("sha256:")
    assert a != load_backbone(tiny_backbones["bert"]).fingerprint

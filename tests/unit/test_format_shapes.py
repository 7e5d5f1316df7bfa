"""Every malformed adapter is an ``InvalidAdapterError`` with a specific code, never another exception (a 500).

Each case builds its bytes by hand (no backbone, no model). A seeded fuzz loop then mutates a valid packed
file (truncations, byte flips, random JSON values anywhere in the header or in the metadata's own JSON) and
asserts that ``inspect_packed``/``load_packed`` either succeed or raise ``InvalidAdapterError``; the same
for ``peft_io.pack_parts`` (the multipart upload path) and ``pack_folder`` (its sidecar).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.format import BackboneSpec, check_compatible, dump_packed, inspect_packed, load_packed
from prefixserve.adapters.peft_io import pack_folder, pack_parts

H, LAYERS, HEADS, P, C = 8, 1, 2, 2, 2
FP = "sha256:test"
CONFIG = dict(peft_type="PREFIX_TUNING", task_type="SEQ_CLS", num_virtual_tokens=P)
CONFIG |= dict(token_dim=H, num_layers=LAYERS, num_attention_heads=HEADS)
POOLER = "base_model.bert.pooler.dense."


def _tensors(style: str = "roberta", pooler: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {"prompt_embeddings": torch.randn(P, LAYERS * 2 * H, generator=g)}  # (P, layers*2*H)
    if style == "roberta":
        t |= {
            "base_model.classifier.dense.weight": torch.randn(H, H, generator=g),
            "base_model.classifier.dense.bias": torch.zeros(H),
            "base_model.classifier.out_proj.weight": torch.randn(C, H, generator=g),
            "base_model.classifier.out_proj.bias": torch.zeros(C),
        }
    else:
        t |= {
            "base_model.classifier.weight": torch.randn(C, H, generator=g),
            "base_model.classifier.bias": torch.zeros(C),
        }
    if pooler:
        t |= {POOLER + "weight": torch.randn(H, H, generator=g), POOLER + "bias": torch.zeros(H)}
    return t


VALID = dump_packed(CONFIG, _tensors(), ["neg", "pos"], FP)
VALID_BERT = dump_packed(CONFIG, _tensors("bert"), ["neg", "pos"], FP)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def frame(header: bytes | str, body: bytes = b"") -> bytes:
    """A safetensors file from raw header text and body bytes."""
    raw = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(raw)) + raw + body


def edit_header(mutate: Callable[[dict[str, Any]], object], base: bytes = VALID) -> bytes:
    header, body = _split(base)
    mutate(header)
    return frame(json.dumps(header), body)


def meta(**changes: Any) -> bytes:
    """VALID with ``__metadata__`` entries replaced (``...`` deletes one)."""

    def mutate(h: dict[str, Any]) -> None:
        for k, v in changes.items():
            if v is ...:
                h["__metadata__"].pop(k)
            else:
                h["__metadata__"][k] = v

    return edit_header(mutate)


def config(**changes: Any) -> bytes:
    return meta(adapter_config=json.dumps({**CONFIG, **changes}))


def tensor_entry(name: str, **changes: Any) -> bytes:
    return edit_header(lambda h: h[name].update(changes))


def inject(after: str, extra: str) -> bytes:
    """VALID with raw JSON ``extra`` written right after the first ``after`` in its header: keys can repeat."""
    (n,) = struct.unpack("<Q", VALID[:8])
    return frame(VALID[8 : 8 + n].decode().replace(after, after + extra, 1), VALID[8 + n :])


def st_file(
    style: str = "roberta", pooler: bool = False, raw: dict[str, torch.Tensor] | None = None, **changes: Any
) -> bytes:
    """A file with VALID's metadata and ``_tensors(style, pooler)`` plus ``raw``, some replaced or removed (None).

    ``changes``: ``virtual`` (prompt_embeddings), ``pooler_weight``..., else the classifier's (``out_proj_weight``).
    """
    t = _tensors(style, pooler) | (raw or {})
    for short, v in changes.items():
        if short == "virtual":
            key = "prompt_embeddings"
        elif short.startswith("pooler_"):
            key = POOLER + short.removeprefix("pooler_")
        else:
            key = "base_model.classifier." + ".".join(short.rsplit("_", 1))
        if v is None:
            t.pop(key)
        else:
            t[key] = v
    return st_save(t, metadata=_split(VALID)[0]["__metadata__"])


SEEDED_RANDOM = random.Random(7).randbytes(4096)
REPEATED_CONFIG = json.dumps(CONFIG)[:-1].encode() + b', "num_layers": 7}'  # which num_layers is it?
VIRTUAL_ENTRY = _split(VALID)[0]["prompt_embeddings"]
CLS_POOLER = {  # pooler-shaped tensors under the classifier's prefix: they must not pass for the pooler
    "base_model.classifier.pooler.dense.weight": torch.zeros(H, H),
    "base_model.classifier.pooler.dense.bias": torch.zeros(H),
}
REPEATED_TENSOR = inject("{", f'"prompt_embeddings":{json.dumps(VIRTUAL_ENTRY)},')  # json.loads keeps the last
F64_VIRTUAL = torch.zeros(P, LAYERS * 2 * H, dtype=torch.float64)
CASES: list[tuple[str, Callable[[], bytes], str]] = [
    # -- not a safetensors file at all (framing): random bytes must not read as "header too large" --
    ("empty", lambda: b"", "not_safetensors"),
    ("shorter_than_length_prefix", lambda: b"\x01\x02", "not_safetensors"),
    ("random_bytes", lambda: SEEDED_RANDOM, "not_safetensors"),
    ("length_past_end", lambda: struct.pack("<Q", 10**9) + VALID[8:], "not_safetensors"),
    ("length_one_past_end", lambda: struct.pack("<Q", len(VALID) - 7) + VALID[8:], "not_safetensors"),
    ("empty_header", lambda: frame(b"", b"x" * 16), "not_safetensors"),
    # -- a real over-cap header (it fits in the file) keeps its own code --
    ("header_over_cap", lambda: frame('{"__metadata__": {}}' + " " * (300 * 1024)), "header_too_large"),
    # -- header text --
    ("header_not_utf8", lambda: frame(b'{"\xff": 1}'), "bad_header"),
    ("header_not_json", lambda: frame("{{{{"), "bad_header"),
    ("header_is_list", lambda: frame("[1, 2]"), "bad_header"),
    ("header_is_string", lambda: frame('"hello"'), "bad_header"),
    ("header_deeply_nested", lambda: frame('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"), "bad_header"),
    ("header_huge_integer", lambda: frame('{"a": 1' + "0" * 5000 + "}"), "bad_header"),
    ("repeated_tensor_name", lambda: REPEATED_TENSOR, "duplicate_key"),
    ("repeated_metadata_object", lambda: inject("{", '"__metadata__":{},'), "duplicate_key"),
    ("repeated_metadata_key", lambda: inject('"__metadata__":{', '"backbone":"sha256:x",'), "duplicate_key"),
    ("repeated_entry_key", lambda: inject('"prompt_embeddings":{', '"dtype":"F16",'), "duplicate_key"),
    # -- tensor entries --
    ("entry_is_number", lambda: edit_header(lambda h: h.update(prompt_embeddings=5)), "bad_header"),
    ("entry_is_list", lambda: edit_header(lambda h: h.update(prompt_embeddings=[1])), "bad_header"),
    ("dtype_f64", lambda: tensor_entry("prompt_embeddings", dtype="F64"), "bad_dtype"),
    ("dtype_is_list", lambda: tensor_entry("prompt_embeddings", dtype=["F32"]), "bad_dtype"),
    ("dtype_is_object", lambda: tensor_entry("prompt_embeddings", dtype={"a": 1}), "bad_dtype"),
    ("dtype_missing", lambda: edit_header(lambda h: h["prompt_embeddings"].pop("dtype")), "bad_dtype"),
    ("shape_is_string", lambda: tensor_entry("prompt_embeddings", shape="2x16"), "bad_header"),
    ("shape_has_bool", lambda: tensor_entry("prompt_embeddings", shape=[True, 32]), "bad_header"),
    ("shape_negative", lambda: tensor_entry("prompt_embeddings", shape=[-2, -16]), "bad_header"),
    ("offsets_are_strings", lambda: tensor_entry("prompt_embeddings", data_offsets=["0", "128"]), "bad_header"),
    ("offsets_are_floats", lambda: tensor_entry("prompt_embeddings", data_offsets=[0.0, 128.0]), "bad_header"),
    ("offsets_are_null", lambda: tensor_entry("prompt_embeddings", data_offsets=None), "bad_header"),
    ("offsets_three", lambda: tensor_entry("prompt_embeddings", data_offsets=[0, 64, 128]), "bad_header"),
    ("offsets_past_body", lambda: tensor_entry("prompt_embeddings", data_offsets=[10**6, 10**6 + 128]), "bad_header"),
    # -- __metadata__ itself --
    ("metadata_is_list", lambda: edit_header(lambda h: h.update(__metadata__=["format"])), "bad_metadata"),
    ("metadata_is_string", lambda: edit_header(lambda h: h.update(__metadata__="prefixserve")), "bad_metadata"),
    ("metadata_is_null", lambda: edit_header(lambda h: h.update(__metadata__=None)), "bad_metadata"),
    ("metadata_is_number", lambda: edit_header(lambda h: h.update(__metadata__=7)), "bad_metadata"),
    ("metadata_absent", lambda: edit_header(lambda h: h.pop("__metadata__")), "missing_metadata"),
    ("format_missing", lambda: meta(format=...), "missing_metadata"),
    ("format_is_number", lambda: meta(format=5), "bad_metadata"),
    ("format_version_is_number", lambda: meta(format_version=1), "bad_metadata"),
    ("format_version_2", lambda: meta(format_version="2"), "bad_version"),
    ("kind_is_list", lambda: meta(kind=["prefix"]), "bad_metadata"),
    ("backbone_missing", lambda: meta(backbone=...), "missing_metadata"),
    ("backbone_empty", lambda: meta(backbone=""), "missing_metadata"),
    ("backbone_is_number", lambda: meta(backbone=12), "bad_metadata"),
    ("backbone_is_list", lambda: meta(backbone=["sha256:x"]), "bad_metadata"),
    ("backbone_too_long", lambda: meta(backbone="sha256:" + "a" * 1000), "bad_metadata"),
    ("backbone_control_chars", lambda: meta(backbone="sha256:\n\x00"), "bad_metadata"),
    # -- adapter_config --
    ("config_is_object", lambda: meta(adapter_config=CONFIG), "bad_config"),
    ("config_is_number", lambda: meta(adapter_config=3), "bad_config"),
    ("config_missing", lambda: meta(adapter_config=...), "missing_metadata"),
    ("config_not_json", lambda: meta(adapter_config="{peft_type: PREFIX}"), "bad_config"),
    ("config_json_list", lambda: meta(adapter_config="[1, 2]"), "bad_config"),
    ("config_json_string", lambda: meta(adapter_config='"PREFIX_TUNING"'), "bad_config"),
    ("config_deeply_nested", lambda: meta(adapter_config="[" * 50_000 + "]" * 50_000), "bad_config"),
    ("config_huge_integer", lambda: meta(adapter_config='{"token_dim": 1' + "0" * 5000 + "}"), "bad_config"),
    ("config_repeats_key", lambda: meta(adapter_config=REPEATED_CONFIG.decode()), "duplicate_key"),
    ("peft_type_is_list", lambda: config(peft_type=["PREFIX_TUNING"]), "unsupported_peft_type"),
    ("peft_type_is_object", lambda: config(peft_type={"a": 1}), "unsupported_peft_type"),
    ("peft_type_adalora", lambda: config(peft_type="ADALORA"), "unsupported_peft_type"),
    ("task_type_is_list", lambda: config(task_type=["SEQ_CLS"]), "unsupported_task"),
    ("num_layers_is_bool", lambda: config(num_layers=True), "bad_config"),
    ("token_dim_is_float", lambda: config(token_dim=8.0), "bad_config"),
    ("token_dim_is_zero", lambda: config(token_dim=0), "bad_config"),
    ("heads_do_not_divide", lambda: config(num_attention_heads=3), "bad_config"),
    ("num_virtual_tokens_is_string", lambda: config(num_virtual_tokens="2"), "shape_mismatch"),
    ("num_virtual_tokens_is_bool", lambda: config(num_virtual_tokens=True), "shape_mismatch"),
    # -- labels --
    ("labels_is_number", lambda: meta(labels=5), "bad_labels"),
    ("labels_is_list", lambda: meta(labels=["neg", "pos"]), "bad_labels"),
    ("labels_missing", lambda: meta(labels=...), "missing_metadata"),
    ("labels_not_json", lambda: meta(labels="neg,pos"), "bad_labels"),
    ("labels_json_number", lambda: meta(labels="5"), "bad_labels"),
    ("labels_json_object", lambda: meta(labels='{"0": "neg", "1": "pos"}'), "bad_labels"),
    ("labels_not_strings", lambda: meta(labels="[0, 1]"), "bad_labels"),
    ("labels_with_null", lambda: meta(labels='["neg", null]'), "bad_labels"),
    ("labels_repeated", lambda: meta(labels='["neg", "neg"]'), "bad_labels"),
    ("labels_empty_name", lambda: meta(labels='["neg", ""]'), "bad_labels"),
    ("labels_lone_surrogate", lambda: meta(labels='["\\ud800", "pos"]'), "bad_labels"),
    ("labels_deeply_nested", lambda: meta(labels="[" * 50_000 + "]" * 50_000), "bad_labels"),
    ("labels_count_differs", lambda: meta(labels='["a", "b", "c"]'), "label_mismatch"),
    # -- tensors and head --
    ("extra_tensor", lambda: st_file(raw={"evil": torch.zeros(1)}), "bad_tensors"),
    ("no_virtual_tokens", lambda: st_file(virtual=None), "bad_tensors"),
    ("virtual_1d", lambda: st_file(virtual=torch.zeros(32)), "shape_mismatch"),
    ("virtual_nan", lambda: st_file(virtual=torch.full((P, 2 * H), float("nan"))), "non_finite"),
    ("unknown_head_layout", lambda: st_file(extra=torch.zeros(1)), "bad_head"),
    ("classifier_key_posing_as_pooler", lambda: st_file("bert", raw=CLS_POOLER), "bad_head"),
    ("classifier_0d", lambda: st_file("bert", weight=torch.tensor(1.0)), "shape_mismatch"),
    ("classifier_1d", lambda: st_file("bert", weight=torch.zeros(H)), "shape_mismatch"),
    ("classifier_3d", lambda: st_file("bert", weight=torch.zeros(C, H, 1)), "shape_mismatch"),
    ("classifier_bias_0d", lambda: st_file("bert", bias=torch.tensor(0.0)), "shape_mismatch"),
    ("out_proj_0d", lambda: st_file(out_proj_weight=torch.tensor(1.0)), "shape_mismatch"),
    ("pooler_with_roberta_head", lambda: st_file("roberta", pooler=True), "bad_head"),
    ("pooler_without_bias", lambda: st_file("bert", pooler=True, pooler_bias=None), "bad_head"),
    ("pooler_wrong_shape", lambda: st_file("bert", True, pooler_weight=torch.zeros(H, H + 1)), "shape_mismatch"),
    ("pooler_0d", lambda: st_file("bert", True, pooler_weight=torch.tensor(1.0)), "shape_mismatch"),
    ("pooler_inf", lambda: st_file("bert", True, pooler_weight=torch.full((H, H), float("inf"))), "non_finite"),
]  # fmt: skip


def _code(data: bytes) -> str:
    try:
        load_packed(data)
    except InvalidAdapterError as exc:
        return exc.code
    return "accepted"


@pytest.mark.parametrize("name,build,code", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_is_invalid_adapter_with_its_code(name: str, build: Callable[[], bytes], code: str) -> None:
    data = build()
    for read in (load_packed, inspect_packed):
        with pytest.raises(InvalidAdapterError) as err:  # anything else (TypeError, RecursionError...) is a 500
            read(data)
        assert err.value.code == code, (name, err.value.code, err.value.message)
        assert err.value.status == 422


def test_the_valid_files_are_valid() -> None:
    assert inspect_packed(VALID).head_style == "roberta"
    assert inspect_packed(VALID_BERT).head_style == "bert"
    with_pooler = dump_packed(CONFIG, _tensors("bert", pooler=True), ["neg", "pos"], FP)
    assert inspect_packed(with_pooler).has_pooler and not inspect_packed(VALID_BERT).has_pooler
    assert set(load_packed(with_pooler).head) == {"weight", "bias", "pooler.dense.weight", "pooler.dense.bias"}


def test_a_bert_head_without_a_pooler_needs_one_from_the_backbone() -> None:
    with_pooler = dump_packed(CONFIG, _tensors("bert", pooler=True), ["neg", "pos"], FP)
    spec = BackboneSpec(FP, LAYERS, HEADS, H, "bert", 50, has_pooler=False)
    with pytest.raises(InvalidAdapterError) as err:
        check_compatible(inspect_packed(VALID_BERT), spec)
    assert err.value.code == "needs_pooler" and err.value.status == 422
    check_compatible(inspect_packed(with_pooler), spec)  # it brings its own
    check_compatible(inspect_packed(VALID_BERT), BackboneSpec(FP, LAYERS, HEADS, H, "bert", 50, has_pooler=True))
    check_compatible(inspect_packed(with_pooler), BackboneSpec(FP, LAYERS, HEADS, H, "bert", 50, has_pooler=True))


# ---- fuzz ---------------------------------------------------------------------------------------
def _random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: scalars of every type, odd numbers and strings, and (shallow) containers."""
    scalars: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.random() < 0.5,
        lambda: rng.randint(-(2**70), 2**70),
        lambda: rng.randint(-2, 64),
        lambda: rng.random() * 1e6,
        lambda: "",
        lambda: rng.choice(["F32", "BF16", "PREFIX_TUNING", "SEQ_CLS", "neg"]),
        lambda: "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(6))),
    ]
    containers: list[Callable[[], Any]] = [
        lambda: [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {str(rng.randrange(9)): _random_json(rng, depth + 1) for _ in range(rng.randrange(3))},
        lambda: json.dumps(_random_json(rng, depth + 1)),
        lambda: [rng.randint(-2, 300) for _ in range(rng.randrange(4))],
    ]
    return rng.choice(scalars + (containers if depth < 2 else []))()


def _set_random_value(header: dict[str, Any], rng: random.Random) -> None:
    """Replace one value somewhere in the header (or in the metadata's own JSON) by a random one."""
    key = rng.choice(sorted(header))
    where = rng.randrange(4)
    value = _random_json(rng)
    if where == 0 or not isinstance(header[key], dict):
        header[key] = value
    elif key == "__metadata__" and where == 3:  # inside adapter_config / labels (JSON inside a string)
        inner_key = rng.choice(["adapter_config", "labels"])
        text = header[key].get(inner_key)  # an earlier mutation may have replaced it
        inner = json.loads(text) if isinstance(text, str) else text
        if isinstance(inner, dict):
            inner[rng.choice([*sorted(inner), "extra"])] = value
        elif isinstance(inner, list) and inner:
            inner[rng.randrange(len(inner))] = value
        header[key][inner_key] = json.dumps(inner)
    else:
        header[key][rng.choice([*sorted(header[key]), "extra"])] = value


def _mutate(data: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.randrange(5)
    if kind == 0:  # truncation
        return data[: rng.randrange(len(data))]
    if kind == 1:  # a different header length
        return struct.pack("<Q", rng.choice([0, 1, n - 1, n + 1, rng.randrange(2**64)])) + data[8:]
    if kind in (2, 3):  # byte flips in the header (JSON syntax, names, numbers), or anywhere (tensor bytes too)
        buf = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            buf[8 + rng.randrange(n) if kind == 2 else rng.randrange(len(buf))] = rng.randrange(256)
        return bytes(buf)
    header, body = _split(data)  # random JSON values
    for _ in range(rng.randint(1, 3)):
        _set_random_value(header, rng)
    return frame(json.dumps(header), body)


def test_fuzzed_files_only_ever_raise_invalid_adapter() -> None:
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    for i in range(400):
        data = _mutate(rng.choice([VALID, VALID_BERT]), rng)
        for read in (load_packed, inspect_packed):
            try:
                read(data)
                outcome = "accepted"
            except InvalidAdapterError as exc:
                outcome = exc.code
            except Exception as exc:  # a 500 in the server
                pytest.fail(f"mutation {i}: {type(exc).__name__}: {exc}")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert len(outcomes) > 5, outcomes  # the mutations reach many different checks


# ---- PEFT parts (multipart upload) and folders --------------------------------------------------
MODEL = st_save(_tensors())
GOOD_CONFIG = json.dumps(CONFIG).encode()
PART_CASES: list[tuple[str, bytes, bytes, Any, str]] = [
    ("config_not_utf8", b'{"\xff\xfe": 1}', MODEL, None, "bad_config"),
    ("config_not_json", b"peft_type=PREFIX", MODEL, None, "bad_config"),
    ("config_empty", b"", MODEL, None, "bad_config"),
    ("config_json_list", b"[1, 2]", MODEL, None, "bad_config"),
    ("config_json_string", b'"x"', MODEL, None, "bad_config"),
    ("config_json_null", b"null", MODEL, None, "bad_config"),
    ("config_deeply_nested", b"[" * 100_000 + b"]" * 100_000, MODEL, None, "bad_config"),
    ("config_huge_integer", b'{"token_dim": 1' + b"0" * 5000 + b"}", MODEL, None, "bad_config"),
    ("config_repeats_key", REPEATED_CONFIG, MODEL, None, "duplicate_key"),
    ("peft_type_is_list", json.dumps({**CONFIG, "peft_type": ["X"]}).encode(), MODEL, None, "unsupported_peft_type"),
    ("labels_is_number", GOOD_CONFIG, MODEL, 5, "bad_labels"),
    ("labels_is_string", GOOD_CONFIG, MODEL, "neg,pos", "bad_labels"),
    ("labels_is_dict", GOOD_CONFIG, MODEL, {"neg": 0, "pos": 1}, "bad_labels"),
    ("labels_not_strings", GOOD_CONFIG, MODEL, [0, 1], "bad_labels"),
    ("labels_with_none", GOOD_CONFIG, MODEL, ["neg", None], "bad_labels"),
    ("labels_tuple_of_ints", GOOD_CONFIG, MODEL, (0, 1), "bad_labels"),
    ("labels_wrong_count", GOOD_CONFIG, MODEL, ["a", "b", "c"], "label_mismatch"),
    ("model_random_bytes", GOOD_CONFIG, SEEDED_RANDOM, None, "not_safetensors"),
    ("model_empty", GOOD_CONFIG, b"", None, "not_safetensors"),
    ("model_truncated", GOOD_CONFIG, MODEL[: len(MODEL) // 2], None, "bad_header"),
    ("model_repeats_tensor", GOOD_CONFIG, REPEATED_TENSOR, None, "duplicate_key"),
    ("model_f64", GOOD_CONFIG, st_save({**_tensors(), "prompt_embeddings": F64_VIRTUAL}), None, "bad_dtype"),
]  # fmt: skip


@pytest.mark.parametrize("name,config_json,model,labels,code", PART_CASES, ids=[c[0] for c in PART_CASES])
def test_malformed_peft_parts_are_invalid_adapter(name: str, config_json: bytes, model: bytes, labels: Any, code: str):
    with pytest.raises(InvalidAdapterError) as err:
        pack_parts(config_json, model, labels=labels, fingerprint=FP)
    assert err.value.code == code, (name, err.value.code, err.value.message)


def test_valid_peft_parts_pack() -> None:
    named = pack_parts(GOOD_CONFIG, MODEL, labels=["neg", "pos"], fingerprint=FP)
    assert inspect_packed(named).labels == ("neg", "pos")
    assert inspect_packed(pack_parts(GOOD_CONFIG, MODEL, fingerprint=FP)).labels == ("LABEL_0", "LABEL_1")


def test_fuzzed_peft_parts_only_ever_raise_invalid_adapter() -> None:
    rng = random.Random(99)
    for i in range(200):
        cfg: dict[str, Any] = dict(CONFIG)
        for _ in range(rng.randint(0, 2)):
            cfg[rng.choice([*CONFIG, "prefix_projection", "extra"])] = _random_json(rng)
        config_json = json.dumps(cfg).encode()
        if rng.random() < 0.3:  # byte flips in the config text
            buf = bytearray(config_json)
            buf[rng.randrange(len(buf))] = rng.randrange(256)
            config_json = bytes(buf)
        labels = rng.choice([None, ["neg", "pos"], _random_json(rng)])
        model = _mutate(MODEL, rng) if rng.random() < 0.3 else MODEL
        try:
            pack_parts(config_json, model, labels=labels, fingerprint=FP)
        except InvalidAdapterError:
            pass
        except Exception as exc:
            pytest.fail(f"case {i}: {type(exc).__name__}: {exc} (config {config_json[:200]!r}, labels {labels!r})")


@pytest.mark.parametrize(
    "sidecar,code",
    [
        ("not json", "bad_sidecar"),
        ("[1, 2]", "bad_sidecar"),
        ('{"labels": 5}', "bad_labels"),
        ('{"labels": "neg,pos"}', "bad_labels"),
        ('{"backbone": 12}', "bad_sidecar"),
        ('{"backbone": ["sha256:x"]}', "bad_sidecar"),
    ],
)
def test_bad_sidecar_in_a_peft_folder(tmp_path, sidecar: str, code: str) -> None:
    (tmp_path / "adapter_config.json").write_bytes(GOOD_CONFIG)
    (tmp_path / "adapter_model.safetensors").write_bytes(MODEL)
    (tmp_path / "prefixserve.json").write_text(sidecar)
    with pytest.raises(InvalidAdapterError) as err:
        pack_folder(tmp_path, default_fingerprint=FP)
    assert err.value.code == code, err.value.message

"""The zero-copy cold-load path (:mod:`prefixserve.adapters.transfer`): the same tensors and the same refusals
as the safetensors ``load`` it replaced, views that stay valid, and the copies ``to_device_tensors`` makes.

The reference is ``format.load_packed`` with its tensor step swapped back to ``safetensors.torch.load`` (the
code before the change), so the cases compare both paths on the same bytes. The malformed files of
``test_format_shapes`` keep their codes there; here: what only safetensors' own parser refused, and a fuzz
loop aimed at the tensor step (offsets, shapes, dtypes, raw JSON in the entries, truncations).
"""

from __future__ import annotations

import gc
import json
import random
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load as st_load

from prefixserve.adapters import format as fmt
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.format import dump_packed, load_packed
from prefixserve.adapters.synthetic import random_adapter
from prefixserve.adapters.transfer import _via_staging, serde_refusal, tensors_from_buffer, to_device_tensors

FP = "sha256:test"
KLUE = SimpleNamespace(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, model_type="roberta")
SMALL = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, model_type="roberta")
BERT = SimpleNamespace(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, model_type="bert")
VALID = random_adapter(SMALL, FP, num_virtual_tokens=2)
VALID_BERT = random_adapter(BERT, FP, kind="prompt", num_virtual_tokens=3, own_pooler=True)
_old = load_packed(VALID)
MIXED = dump_packed(  # F16 and BF16 tensors besides F32
    _old.peft_config,
    {k: v.to(torch.bfloat16 if "bias" in k else torch.float16) if "dense" in k else v for k, v in _old.tensors.items()},
    list(_old.meta.labels),
    FP,
)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def frame(header: str | dict, body: bytes) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _st_load_tensors(data: Any, header: dict, dtypes: Any) -> dict[str, torch.Tensor]:
    """The tensor step as it was: safetensors copies every tensor out; any failure is ``bad_tensors``."""
    try:
        return st_load(bytes(data))
    except Exception as exc:
        raise InvalidAdapterError(f"unreadable safetensors payload: {str(exc)[:200]}", code="bad_tensors") from None


@pytest.fixture
def reference(monkeypatch: pytest.MonkeyPatch) -> Callable[..., fmt.AdapterFile]:
    """``load_packed`` as before the change (the test's own ``load_packed`` calls stay zero-copy)."""
    new = fmt.tensors_from_buffer

    def old_load(data: Any, **kw: Any) -> fmt.AdapterFile:
        monkeypatch.setattr(fmt, "tensors_from_buffer", _st_load_tensors)
        try:
            return fmt.load_packed(data, **kw)
        finally:
            monkeypatch.setattr(fmt, "tensors_from_buffer", new)

    return old_load


def _outcome(load: Callable[[bytes], Any], data: bytes) -> str:
    try:
        load(data)
    except InvalidAdapterError as exc:
        return exc.code
    return "accepted"


def _base_ptr(data: bytes | bytearray) -> int:
    return torch.frombuffer(data, dtype=torch.uint8).data_ptr()


# ---- the same tensors, without copies ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["roberta", "bert_prompt_with_pooler", "mixed_dtypes", "klue_p20"])
def test_zero_copy_load_gives_the_tensors_safetensors_gave(name: str, reference: Callable[..., Any]) -> None:
    data = {
        "roberta": VALID,
        "bert_prompt_with_pooler": VALID_BERT,
        "mixed_dtypes": MIXED,
        "klue_p20": random_adapter(KLUE, FP, num_virtual_tokens=20, labels=("neg", "pos")),
    }[name]
    new, old = load_packed(data), reference(data)
    assert new.meta == old.meta and new.peft_config == old.peft_config
    assert sorted(new.tensors) == sorted(old.tensors)
    for key, t in old.tensors.items():
        assert new.tensors[key].dtype == t.dtype and new.tensors[key].shape == t.shape, key
        assert torch.equal(new.tensors[key], t), key


def test_tensors_are_views_of_the_buffer_and_keep_it_alive() -> None:
    data = random_adapter(KLUE, FP, num_virtual_tokens=20, labels=("neg", "pos"))
    base, size = _base_ptr(data), len(data)
    adapter = load_packed(data)
    for t in adapter.tensors.values():  # inside the buffer: nothing was copied
        assert base <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= base + size
        assert t.data_ptr() % t.element_size() == 0
    expected = {k: v.clone() for k, v in adapter.tensors.items()}
    del data  # the views hold the only reference now
    gc.collect()
    junk = [b"\xff" * size for _ in range(4)]  # would land on the buffer's memory had it been freed
    assert junk and all(torch.equal(adapter.tensors[k], v) for k, v in expected.items())


def test_a_misaligned_tensor_is_copied_to_aligned_memory() -> None:
    """safetensors' writer keeps tensors aligned; a hand-made file need not (an odd F16 before an F32)."""
    header = {
        "a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},
    }
    text = json.dumps(header)
    text += " " * (-len(text) % 8)  # 8 + len(text) is 8-aligned, so b starts 2 bytes past an aligned address
    data = frame(text, torch.tensor([1.5], dtype=torch.float16).numpy().tobytes() + b"\x00\x00\x80?\x00\x00\x00@")
    got = tensors_from_buffer(data, header, {"F16": torch.float16, "F32": torch.float32})
    assert got["b"].data_ptr() % 4 == 0 and got["b"].tolist() == [1.0, 2.0] and got["a"].item() == 1.5
    assert all(torch.equal(got[k], v) for k, v in st_load(data).items())


# ---- the same refusals, with the same codes -------------------------------------------------------------
def _entry_field(raw_json: str, base: bytes = VALID) -> bytes:
    """``base`` with one more raw JSON field in its prompt_embeddings entry (readers that accept it ignore it)."""
    header, body = _split(base)
    needle = '"prompt_embeddings": {'
    return frame(json.dumps(header).replace(needle, needle + f'"x": {raw_json}, ', 1), body)


def _replace(old: str, new: str, base: bytes = VALID) -> bytes:
    header, body = _split(base)
    text = json.dumps(header)
    assert old in text
    return frame(text.replace(old, new, 1), body)


def _shift_last(shift: int) -> bytes:
    header, body = _split(VALID)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[last]["data_offsets"] = [x + shift for x in header[last]["data_offsets"]]
    return frame(header, body + b"\0" * max(shift, 0))


def _with_empty_tensor(shape: list[int]) -> bytes:
    header, body = _split(VALID)
    header["base_model.classifier.zz"] = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    return frame(header, body)


def _first_offset() -> str:
    header, _ = _split(VALID)
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return json.dumps({first: header[first]})[1:-1]


SAFETENSORS_CASES: dict[str, Callable[[], bytes]] = {  # only safetensors' parser refused these (or accepts)
    "gap_between_tensors": lambda: _shift_last(4),
    "overlapping_tensors": lambda: _shift_last(-4),
    "bytes_after_the_last_tensor": lambda: VALID + b"\0" * 8,
    "nan_literal_in_an_entry": lambda: _entry_field("NaN"),
    "infinity_literal_in_an_entry": lambda: _entry_field("-Infinity"),
    "float_out_of_range": lambda: _entry_field("1e400"),
    "int_out_of_f64_range": lambda: _entry_field("1" + "0" * 400),
    "lone_surrogate_in_an_entry": lambda: _entry_field('"\\udc00"'),
    "lone_surrogate_in_metadata": lambda: _replace('"kind": "prefix"', '"kind": "\\ud800"'),
    "nested_128_deep": lambda: _entry_field("[" * 126 + "]" * 126),
    "negative_zero_offset": lambda: _replace(_first_offset(), _first_offset().replace("[0,", "[-0,")),
    "empty_tensor_whose_dims_overflow": lambda: _with_empty_tensor([2**40, 2**40, 0]),
    "empty_tensor_too_big_for_torch": lambda: _with_empty_tensor([0, 2**64 - 1]),
    "fine_nested_127_deep": lambda: _entry_field("[" * 125 + "]" * 125),
    "fine_big_int_in_an_entry": lambda: _entry_field("123456789012345678901234567890"),
    "fine_surrogate_pair": lambda: _entry_field('"\\ud83d\\ude00"'),
    "fine_empty_tensor": lambda: _with_empty_tensor([0, 3]),
}


@pytest.mark.parametrize("name", sorted(SAFETENSORS_CASES))
def test_what_safetensors_refused_is_refused_with_the_same_code(name: str, reference: Callable[..., Any]) -> None:
    data = SAFETENSORS_CASES[name]()
    old = _outcome(reference, data)
    assert _outcome(load_packed, data) == old, name
    if name.startswith("fine_"):  # a stray empty head tensor is the head's problem, not the parser's
        assert old in ("accepted", "bad_head"), (name, old)
    else:
        assert old == "bad_tensors", (name, old)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    """Corrupt what the tensor step reads: offsets, shapes, dtypes, the framing, raw JSON in an entry."""
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    entry = header[rng.choice(names)]
    kind = rng.randrange(8)
    if kind == 0:
        entry["data_offsets"] = [max(0, x + rng.choice([-8, -4, -2, 2, 4, 8])) for x in entry["data_offsets"]]
    elif kind == 1:
        entry["shape"] = [max(0, d + rng.choice([-1, 1])) for d in entry["shape"]] or [rng.randrange(3)]
    elif kind == 2:
        entry["dtype"] = rng.choice(["F32", "F16", "BF16"])
    elif kind == 3:
        body = body + b"\0" * rng.choice([2, 4, 8]) if rng.random() < 0.5 else body[: -rng.choice([2, 4, 8])]
    elif kind == 4:
        raw = rng.choice(["NaN", "1e999", '"\\ud800"', "[[[]]]", "-0", "1" + "0" * 30, '"\\ud83d\\ude00"'])
        return _entry_field(raw, frame(header, body))
    elif kind == 5:
        return data[: rng.randrange(8, len(data))]
    else:  # random bytes, or all-ones (NaN in every dtype) at an aligned spot
        flips = bytearray(body)
        for _ in range(3):
            at = rng.randrange(len(flips) // 4) * 4
            flips[at : at + 4] = rng.randbytes(4) if kind == 6 else b"\xff" * 4
        body = bytes(flips)
    return frame(header, body)


def test_fuzzed_files_get_the_same_verdict_and_tensors_as_before(reference: Callable[..., Any]) -> None:
    rng = random.Random(4321)
    seen: dict[str, int] = {}
    for i in range(600):
        data = _mutate(rng.choice([VALID, VALID_BERT, MIXED]), rng)
        old, new = _outcome(reference, data), _outcome(load_packed, data)
        assert new == old, (i, old, new)
        if old == "accepted":
            a, b = load_packed(data).tensors, reference(data).tensors
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), i
        seen[old] = seen.get(old, 0) + 1
    assert min(seen.get(code, 0) for code in ("accepted", "bad_tensors", "non_finite", "bad_header")) > 20, seen


def test_serde_refusal_reasons() -> None:
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    assert serde_refusal('{"a": ' + entry + "}") is None
    assert "NaN" in (serde_refusal('{"a": {"x": NaN}}') or "")
    assert serde_refusal('{"a": {"dtype": "F32", "shape": [-0], "data_offsets": [0, 0]}}')  # -0 is a float there
    assert serde_refusal('{"a": {"dtype": "F32", "shape": [18446744073709551616], "data_offsets": [0, 0]}}')
    assert serde_refusal('{"a\\udfff": ' + entry + "}")
    assert serde_refusal("1" * 5000)  # what Python's int() refuses is a reason, not a crash


# ---- buffer reuse, lifetimes and copies -----------------------------------------------------------------
def test_a_reused_buffer_does_not_corrupt_an_earlier_result_copied_out() -> None:
    first = random_adapter(KLUE, FP, num_virtual_tokens=20, labels=("neg", "pos"), seed=1)
    second = random_adapter(KLUE, FP, num_virtual_tokens=20, labels=("neg", "pos"), seed=2)
    assert len(first) == len(second)
    buf = bytearray(first)  # a receive buffer, reused for the next adapter
    owned = to_device_tensors(load_packed(buf).tensors, "cpu", torch.float32, copy=True)
    views = load_packed(buf).tensors  # what copy=True protects against
    buf[:] = second
    expected = load_packed(first).tensors
    assert all(torch.equal(owned[k], expected[k]) for k in expected)  # untouched
    assert not torch.equal(views["prompt_embeddings"], expected["prompt_embeddings"])  # overwritten


def test_fresh_buffers_do_not_disturb_earlier_adapters() -> None:
    """The serving path: each store read is a new ``bytes``, so adapters kept on the CPU stay as loaded."""
    kept = [to_device_tensors(load_packed(random_adapter(SMALL, FP, seed=s)).tensors, "cpu", torch.float32)
            for s in range(8)]  # fmt: skip
    for s, tensors in enumerate(kept):
        expected = st_load(random_adapter(SMALL, FP, seed=s))
        assert all(torch.equal(tensors[k], expected[k]) for k in expected), s


def test_cpu_transfer_makes_no_copy_when_nothing_changes() -> None:
    tensors = load_packed(VALID).tensors
    same = to_device_tensors(tensors, "cpu", torch.float32)
    assert all(same[k] is tensors[k] for k in tensors)  # float32 on the CPU already: the very tensors
    cast = to_device_tensors(tensors, torch.device("cpu"), torch.bfloat16)
    assert all(cast[k].dtype == torch.bfloat16 and torch.equal(cast[k], tensors[k].bfloat16()) for k in tensors)
    owned = to_device_tensors(tensors, "cpu", torch.float32, copy=True)
    assert all(owned[k].data_ptr() != tensors[k].data_ptr() and torch.equal(owned[k], tensors[k]) for k in tensors)


def test_staging_layout_round_trips_every_dtype_and_shape() -> None:
    """The CUDA path's staging block, run on the CPU unpinned: aligned segments, casts, odd tensors."""
    tensors = dict(load_packed(MIXED).tensors)
    tensors["empty"] = torch.empty(0, 3)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float16)
    tensors["strided"] = torch.arange(12.0).view(3, 4).t()  # not contiguous
    for dtype in (torch.float32, torch.float16):
        out = _via_staging(tensors, torch.device("cpu"), dtype, pin=False)
        assert list(out) == list(tensors)
        for k, t in tensors.items():
            assert out[k].shape == t.shape and out[k].dtype == dtype, k
            assert torch.equal(out[k], t.to(dtype)), k
    same = _via_staging(tensors, torch.device("cpu"), torch.float32, pin=False)
    f32 = sorted(same[k].data_ptr() for k, t in tensors.items() if t.dtype == torch.float32 and t.numel())
    assert len(f32) > 2 and all((p - f32[0]) % 256 == 0 for p in f32)  # one block, 256-byte aligned segments


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_transfer_gives_the_same_tensors() -> None:
    tensors = load_packed(random_adapter(KLUE, FP, num_virtual_tokens=20, labels=("neg", "pos"))).tensors
    for dtype in (torch.float32, torch.float16):
        out = to_device_tensors(tensors, "cuda", dtype)
        for k, t in tensors.items():
            assert out[k].is_cuda and out[k].dtype == dtype
            assert torch.equal(out[k].cpu(), t.to(dtype)), k
        assert len({t.untyped_storage().data_ptr() for t in out.values()}) == len(out)  # each its own memory

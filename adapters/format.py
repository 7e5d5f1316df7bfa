"""The packed adapter file: one ``.safetensors`` per adapter, PEFT-compatible both ways.

Tensors: the kind's body (:mod:`.kinds`: ``prompt_embeddings`` for a prefix or prompt, ``encoder.layer.{i}.*``
for a weight kind) and the head under PEFT's key names, ``base_model.classifier.*`` and, for a BERT-style head
that brings its own pooler, ``base_model.bert.pooler.dense.*`` (see :mod:`.heads`), whatever the kind. ``__metadata__``
(string -> string, as safetensors requires) holds:

=====================  =====================================================================
``format``             ``"prefixserve.adapter"``
``format_version``     ``"1"``
``adapter_config``     PEFT's ``adapter_config.json``, verbatim JSON
``labels``             JSON list of label names (``id2label`` order)
``backbone``           backbone fingerprint (see :mod:`.backbone`): 1..256 printable ASCII, no spaces
``kind``               ``prefix`` | ``prompt`` | ``lora`` | ``ia3`` | ``bottleneck`` (from ``peft_type``, see
                       :mod:`.kinds`; informative)
=====================  =====================================================================

Every read validates before anything is trusted, and every failure is an ``InvalidAdapterError`` (422; the
413 size cap is its subclass) with a specific code - never another exception, which the server would turn
into a 500. Decisions:

* ``not_safetensors``: the framing is not safetensors: fewer than 8 bytes, or the little-endian header
  length is below 2 or larger than the rest of the file (random bytes read as a header length are almost
  always huge). ``header_too_large`` is kept for a header that really is in the file but over the cap.
* ``bad_header``: the header is not UTF-8, not JSON (deep nesting and over-long integers included), not an
  object, or a tensor entry is not ``{"dtype", "shape": [ints >= 0], "data_offsets": [start, end]}`` inside
  the file; ``bad_dtype``: a dtype other than F32/F16/BF16.
* ``duplicate_key``: any JSON object in the header (tensor names, ``__metadata__``, a tensor entry) or in
  the metadata's own JSON repeats a key. ``json.loads`` would silently keep the last one while another
  reader (safetensors itself, PEFT) may keep another: the same bytes must never mean two adapters.
* ``bad_metadata``: ``__metadata__`` is not an object of strings, or the fingerprint is not printable
  ASCII; ``missing_metadata``: a required entry is absent. Problems inside ``adapter_config`` are
  ``bad_config`` (``unsupported_peft_type``/``unsupported_task`` for those two fields) and inside
  ``labels`` ``bad_labels``, whatever their shape (not a string, not JSON, wrong JSON type).
* Numbers in the config must be JSON integers (``true`` is not 1, ``8.0`` is not 8).
* Then the tensors: allowed dtypes, shapes consistent with the config and the head (``shape_mismatch``),
  head layout (``bad_head``), finite values, ``num_virtual_tokens`` within a limit, label count equal to
  the head's outputs, total size cap. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import Tensor

from .errors import AdapterTooLargeError, InvalidAdapterError
from .fit import check_compatible
from .heads import PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX, carries_pooler, head_shapes, head_style, split_head
from .kinds import KIND_OF_PEFT_TYPE, VIRTUAL_KEY, VIRTUAL_KINDS, check_virtual, check_weights
from .meta import AdapterMeta, BackboneSpec
from .transfer import Buffer, tensors_from_buffer

FORMAT = "prefixserve.adapter"
FORMAT_VERSION = "1"
MAX_FINGERPRINT_CHARS = 256
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_FINGERPRINT = re.compile(f"[!-~]{{1,{MAX_FINGERPRINT_CHARS}}}")  # printable ASCII, no spaces
_SURROGATE = re.compile("[\ud800-\udfff]")  # a lone one ("\\ud800" in JSON) is a str but not text: no reply has it
_META_CODES = {"adapter_config": "bad_config", "labels": "bad_labels"}  # metadata entry -> its error code


@dataclass(frozen=True)
class Limits:
    """Caps applied to every adapter read (tune per deployment)."""

    max_bytes: int = 64 * 2**20
    max_header_bytes: int = 256 * 2**10
    max_virtual_tokens: int = 512
    max_labels: int = 1024
    max_label_chars: int = 256


DEFAULT_LIMITS = Limits()


@dataclass
class AdapterFile:
    meta: AdapterMeta
    peft_config: dict
    tensors: dict[str, Tensor] = field(repr=False)

    @property
    def virtual(self) -> Tensor:
        """(P, layers*2*hidden) for a prefix, (Q, hidden) for a prompt."""
        return self.tensors[VIRTUAL_KEY]

    @property
    def body(self) -> dict[str, Tensor]:
        """The kind's own tensors: everything but the head."""
        return _body(self.tensors)

    @property
    def head(self) -> dict[str, Tensor]:
        return split_head(self.tensors)


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _q(value: object) -> str:
    """A short repr for messages (names and values come from the client and may be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _DuplicateKeyError(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKeyError(key)
        obj[key] = value
    return obj


def strict_json(text: str | bytes, what: str, code: str) -> Any:
    """``json.loads`` that refuses repeated keys (``duplicate_key``) and turns every parse failure into ``code``."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKeyError as exc:
        raise _bad(f"{what} repeats the key {_q(exc.args[0])}", "duplicate_key") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, int too long; deep nesting
        raise _bad(f"{what} is not valid JSON: {str(exc)[:200]}", code) from None


def _uints(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)  # bool is not an int here


def read_header(data: Buffer, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """The safetensors header of ``data``, checked: framing, JSON, unique keys, dtypes, shapes and offsets."""
    data = memoryview(data).cast("B")  # bytes, bytearray or a view: sliced without copying the body
    if len(data) > limits.max_bytes:
        raise AdapterTooLargeError(f"adapter is {len(data)} bytes; the limit is {limits.max_bytes}")
    if len(data) < 8:
        raise _bad("not a safetensors file: shorter than its 8-byte header length", "not_safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n < 2 or n > len(data) - 8:
        raise _bad(
            f"not a safetensors file: its first 8 bytes give a header of {n} bytes, the file has {len(data) - 8}",
            "not_safetensors",
        )
    if n > limits.max_header_bytes:
        raise _bad(f"safetensors header is {n} bytes; the cap is {limits.max_header_bytes}", "header_too_large")
    try:
        text = str(data[8 : 8 + n], "utf-8")
    except UnicodeDecodeError as exc:
        raise _bad(f"safetensors header is not UTF-8: {exc}", "bad_header") from None
    header = strict_json(text, "safetensors header", "bad_header")
    if not isinstance(header, dict):
        raise _bad("safetensors header must be a JSON object", "bad_header")
    body = len(data) - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _bad(f"tensor {_q(name)} is not described by a JSON object", "bad_header")
        dtype = entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise _bad(f"tensor {_q(name)} has dtype {_q(dtype)}; allowed: F32, F16, BF16", "bad_dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (_uints(shape) and _uints(offsets) and len(offsets) == 2):
            raise _bad(f"tensor {_q(name)} has a malformed shape or offsets", "bad_header")
        start, end = offsets
        if not start <= end <= body or end - start != math.prod(shape) * _ITEMSIZE[dtype]:
            raise _bad(f"tensor {_q(name)} offsets do not match its shape or the file", "bad_header")
    return header


def _metadata(header: dict[str, Any]) -> dict[str, str]:
    meta = _required(header, "__metadata__")
    if not isinstance(meta, dict):
        raise _bad(f"__metadata__ must be a JSON object of strings, got {type(meta).__name__}", "bad_metadata")
    for key, value in meta.items():
        if not isinstance(value, str):
            code = _META_CODES.get(key, "bad_metadata")
            raise _bad(f"metadata {_q(key)} must be a string (JSON text), got {type(value).__name__}", code)
    return meta


def _required(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise _bad(f"no {key!r} in the file (not a prefixserve adapter? use `prefixserve pack`)", "missing_metadata")
    return meta[key]


def check_fingerprint(fingerprint: object) -> str:
    """A backbone fingerprint as metadata may carry it: ``_FINGERPRINT`` (``sha256:<hex>`` when we made it)."""
    if fingerprint is None or fingerprint == "":
        raise _bad("metadata is missing the backbone fingerprint", "missing_metadata")
    if isinstance(fingerprint, str) and _FINGERPRINT.fullmatch(fingerprint):
        return fingerprint
    raise _bad(
        f"backbone fingerprint must be 1..{MAX_FINGERPRINT_CHARS} printable ASCII characters without spaces, "
        f"got {_q(fingerprint)}",
        "bad_metadata",
    )


def check_labels(labels: object, limits: Limits = DEFAULT_LIMITS) -> list[str]:
    if (
        not isinstance(labels, list)
        or not labels
        or len(labels) > limits.max_labels
        or not all(
            isinstance(x, str) and 0 < len(x) <= limits.max_label_chars and not _SURROGATE.search(x) for x in labels
        )
        or len(set(labels)) != len(labels)
    ):
        raise _bad(f"labels must be a list of 1..{limits.max_labels} distinct non-empty strings", "bad_labels")
    return labels


def _body(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: t for k, t in tensors.items() if not k.startswith((PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX))}


def _check_tensors(config: dict, tensors: dict[str, Tensor], labels: list, limits: Limits) -> dict[str, Any]:
    """Shapes agree with the config and with each other; returns the shape fields of :class:`AdapterMeta`."""
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in KIND_OF_PEFT_TYPE:
        raise _bad(
            f"peft_type {_q(peft_type)} is not served; use one of {', '.join(KIND_OF_PEFT_TYPE)}",
            "unsupported_peft_type",
        )
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise _bad(f"task_type {_q(config.get('task_type'))} is not served; only SEQ_CLS", "unsupported_task")
    kind = KIND_OF_PEFT_TYPE[peft_type]
    body = _body(tensors)
    if kind in VIRTUAL_KINDS:
        shape = check_virtual(kind, config, body, limits.max_virtual_tokens)
    else:
        shape = check_weights(kind, config, body)
    hidden = shape["hidden"]
    head = split_head(tensors)
    try:
        style = head_style(head)
    except KeyError as exc:
        raise _bad(str(exc.args[0]), "bad_head") from None
    has_pooler = carries_pooler(head)
    out_w = head["out_proj.weight" if style == "roberta" else "weight"]  # (C, H)
    if out_w.ndim != 2:
        raise _bad(f"classifier weight must be 2-D, got shape {tuple(out_w.shape)}", "shape_mismatch")
    c = out_w.shape[0]
    if not hidden:  # a weight kind whose tensors never show the hidden width (IA3 on the FFN only): the head's
        hidden = shape["hidden"] = int(out_w.shape[1])
    for name, want in head_shapes(style, hidden, c, has_pooler).items():
        if tuple(head[name].shape) != want:
            raise _bad(f"head tensor {name!r} has shape {tuple(head[name].shape)}, expected {want}", "shape_mismatch")
    if len(labels) != c:
        raise _bad(f"{len(labels)} labels but the head has {c} outputs", "label_mismatch")
    for name, t in tensors.items():  # numpy: single-threaded, immune to OpenMP contention (20x here)
        if not np.isfinite((t.float() if t.dtype == torch.bfloat16 else t).numpy()).all():
            raise _bad(f"tensor {name!r} has NaN or infinite values", "non_finite")
    return shape | {"kind": kind, "head_style": style, "has_pooler": has_pooler}


def load_packed(data: Buffer, *, expect: BackboneSpec | None = None, limits: Limits = DEFAULT_LIMITS) -> AdapterFile:
    """Parse and fully validate a packed adapter; with ``expect``, also check it fits that backbone.

    The tensors are views of ``data``, not copies (:mod:`.transfer`): read-only over ``bytes``, and
    ``data`` must not be overwritten while they live.
    """
    header = read_header(data, limits)
    meta = _metadata(header)
    if meta.get("format") != FORMAT:
        raise _bad(
            f"metadata 'format' must be {FORMAT!r} (use `prefixserve pack` on a PEFT folder)", "missing_metadata"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(
            f"format_version {_q(meta.get('format_version'))} is not supported (want {FORMAT_VERSION})", "bad_version"
        )
    config = strict_json(_required(meta, "adapter_config"), "metadata 'adapter_config'", "bad_config")
    if not isinstance(config, dict):
        raise _bad("adapter_config must be a JSON object", "bad_config")
    labels = check_labels(strict_json(_required(meta, "labels"), "metadata 'labels'", "bad_labels"), limits)
    fingerprint = check_fingerprint(meta.get("backbone"))
    tensors = tensors_from_buffer(data, header, _DTYPES)  # zero-copy; refuses what safetensors refused
    shape = _check_tensors(config, tensors, labels, limits)
    am = AdapterMeta(
        peft_type=config["peft_type"], labels=tuple(labels), fingerprint=fingerprint, format_version=FORMAT_VERSION,
        nbytes=memoryview(data).nbytes, **shape,
    )  # fmt: skip
    if expect is not None:
        check_compatible(am, expect)
    return AdapterFile(am, config, tensors)


def inspect_packed(data: Buffer, *, limits: Limits | None = None, expect: BackboneSpec | None = None) -> AdapterMeta:
    """Validate a packed adapter (structure; and fit if ``expect``) and return its metadata."""
    return load_packed(data, expect=expect, limits=limits or DEFAULT_LIMITS).meta


def dump_packed(peft_config: dict, tensors: dict[str, Tensor], labels: list[str], fingerprint: str) -> bytes:
    """Serialise (and validate) an adapter. Deterministic: same input, same bytes."""
    if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels):
        raise _bad(f"labels must be a list of strings, got {_q(labels)}", "bad_labels")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    peft_type = peft_config.get("peft_type")
    kind = KIND_OF_PEFT_TYPE.get(peft_type, "") if isinstance(peft_type, str) else ""
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "adapter_config": json.dumps(peft_config, sort_keys=True),
        "labels": json.dumps(list(labels)),
        "backbone": check_fingerprint(fingerprint),
    }
    data = _canonical(st_save(tensors, metadata=metadata))
    load_packed(data)  # refuse to write what we would refuse to read
    return data


def _canonical(data: bytes) -> bytes:
    """Re-emit the header with sorted keys: safetensors orders metadata by a (randomised) hash map."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the 8-byte alignment safetensors uses
    return struct.pack("<Q", len(header)) + header + data[8 + n :]

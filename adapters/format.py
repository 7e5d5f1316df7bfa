"""The packed adapter file: one ``.safetensors`` per adapter, PEFT-compatible both ways.

Tensors keep PEFT's key names (``prompt_embeddings`` and ``base_model.classifier.*``).
``__metadata__`` (string -> string, as safetensors requires) holds:

=====================  =====================================================================
``format``             ``"prefixserve.adapter"``
``format_version``     ``"1"``
``adapter_config``     PEFT's ``adapter_config.json``, verbatim JSON
``labels``             JSON list of label names (``id2label`` order)
``backbone``           backbone fingerprint (see :mod:`.backbone`)
``kind``               ``"prefix"`` | ``"prompt"`` (derived from ``peft_type``; informative)
=====================  =====================================================================

Every read validates before anything is trusted: header length cap and well-formed JSON, allowed
dtypes, offsets inside the file, shapes consistent with the config and the head, finite values,
``num_virtual_tokens`` within a limit, label count equal to the head's outputs, total size cap.
Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import asdict, dataclass, field
from typing import TypeGuard

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from .errors import AdapterTooLargeError, FingerprintMismatchError, InvalidAdapterError
from .heads import PEFT_HEAD_PREFIX, head_style, split_head

FORMAT = "prefixserve.adapter"
FORMAT_VERSION = "1"
VIRTUAL_KEY = "prompt_embeddings"
KIND_OF_PEFT_TYPE = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt"}
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class Limits:
    """Caps applied to every adapter read (tune per deployment)."""

    max_bytes: int = 64 * 2**20
    max_header_bytes: int = 256 * 2**10
    max_virtual_tokens: int = 512
    max_labels: int = 1024
    max_label_chars: int = 256


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class BackboneSpec:
    """What an adapter must agree with to run on a backbone."""

    fingerprint: str
    num_layers: int
    num_heads: int
    hidden: int
    head_style: str  # "bert" | "roberta"
    max_virtual_tokens: int  # positions left for a prefix/prompt with at least a few real tokens


@dataclass(frozen=True)
class AdapterMeta:
    kind: str
    peft_type: str
    num_virtual_tokens: int
    labels: tuple[str, ...]
    fingerprint: str
    format_version: str
    nbytes: int
    num_layers: int
    num_heads: int
    hidden: int
    head_style: str

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["labels"] = list(self.labels)
        return d


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
    def head(self) -> dict[str, Tensor]:
        return split_head(self.tensors)


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _read_header(data: bytes, limits: Limits) -> dict:
    if len(data) > limits.max_bytes:
        raise AdapterTooLargeError(f"adapter is {len(data)} bytes; the limit is {limits.max_bytes}")
    if len(data) < 8:
        raise _bad("not a safetensors file: shorter than its 8-byte header length", "bad_header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > limits.max_header_bytes or n > len(data) - 8:
        raise _bad(f"safetensors header length {n} exceeds the cap or the file", "header_too_large")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(f"safetensors header is not valid JSON: {exc}", "bad_header") from None
    if not isinstance(header, dict):
        raise _bad("safetensors header must be a JSON object", "bad_header")
    body = len(data) - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            dtype = entry.get("dtype") if isinstance(entry, dict) else entry
            raise _bad(f"tensor {name!r} has dtype {dtype!r}; allowed: F32, F16, BF16", "bad_dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
        ):
            raise _bad(f"tensor {name!r} has a malformed shape or offsets", "bad_header")
        start, end = offsets
        if not (0 <= start <= end <= body) or end - start != math.prod(shape) * _ITEMSIZE[entry["dtype"]]:
            raise _bad(f"tensor {name!r} offsets do not match its shape or the file", "bad_header")
    return header


def _json_meta(meta: dict, key: str):
    if key not in meta:
        raise _bad(
            f"metadata is missing {key!r} (not a prefixserve adapter? use `prefixserve pack`)", "missing_metadata"
        )
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise _bad(f"metadata {key!r} is not valid JSON: {exc}", "bad_metadata") from None


def _positive_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and value > 0


def _check_tensors(config: dict, tensors: dict[str, Tensor], labels: list, limits: Limits):
    """Shapes agree with the config and with each other; returns (kind, P, layers, heads, hidden, style)."""
    peft_type = config.get("peft_type")
    if peft_type not in KIND_OF_PEFT_TYPE:
        raise _bad(
            f"peft_type {peft_type!r} is not served; use PREFIX_TUNING, PROMPT_TUNING or P_TUNING",
            "unsupported_peft_type",
        )
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise _bad(f"task_type {config.get('task_type')!r} is not served; only SEQ_CLS", "unsupported_task")
    kind = KIND_OF_PEFT_TYPE[peft_type]
    extra = set(tensors) - {VIRTUAL_KEY} - {k for k in tensors if k.startswith(PEFT_HEAD_PREFIX)}
    if VIRTUAL_KEY not in tensors or extra:
        raise _bad(
            f"expected {VIRTUAL_KEY!r} and classifier tensors; missing or unexpected: {sorted(extra) or [VIRTUAL_KEY]}",
            "bad_tensors",
        )
    virtual = tensors[VIRTUAL_KEY]
    if virtual.ndim != 2:
        raise _bad(f"{VIRTUAL_KEY} must be 2-D, got shape {tuple(virtual.shape)}", "shape_mismatch")
    p = virtual.shape[0]
    if p < 1 or p > limits.max_virtual_tokens:
        raise _bad(f"num_virtual_tokens {p} outside 1..{limits.max_virtual_tokens}", "too_many_virtual_tokens")
    if config.get("num_virtual_tokens") != p:
        raise _bad(f"config num_virtual_tokens {config.get('num_virtual_tokens')} != tensor rows {p}", "shape_mismatch")
    hidden, layers, heads = config.get("token_dim"), config.get("num_layers"), config.get("num_attention_heads")
    if not (_positive_int(hidden) and _positive_int(layers) and _positive_int(heads)) or hidden % heads:
        raise _bad(
            "config needs positive token_dim, num_layers, num_attention_heads (token_dim % heads == 0)", "bad_config"
        )
    width = layers * 2 * hidden if kind == "prefix" else hidden
    if virtual.shape[1] != width:
        raise _bad(f"{VIRTUAL_KEY} width {virtual.shape[1]} != expected {width} for a {kind}", "shape_mismatch")
    head = split_head(tensors)
    try:
        style = head_style(head)
    except KeyError as exc:
        raise _bad(str(exc.args[0]), "bad_head") from None
    out_w = head["out_proj.weight"] if style == "roberta" else head["weight"]
    out_b = head["out_proj.bias"] if style == "roberta" else head["bias"]
    c = out_w.shape[0]
    shapes_ok = out_w.shape == (c, hidden) and out_b.shape == (c,)
    if style == "roberta":
        shapes_ok &= head["dense.weight"].shape == (hidden, hidden) and head["dense.bias"].shape == (hidden,)
    if not shapes_ok:
        raise _bad(f"classifier shapes do not match hidden size {hidden}", "shape_mismatch")
    if len(labels) != c:
        raise _bad(f"{len(labels)} labels but the head has {c} outputs", "label_mismatch")
    for name, t in tensors.items():  # numpy: single-threaded, immune to OpenMP contention (20x here)
        if not np.isfinite((t.float() if t.dtype == torch.bfloat16 else t).numpy()).all():
            raise _bad(f"tensor {name!r} has NaN or infinite values", "non_finite")
    return kind, p, layers, heads, hidden, style


def _check_labels(labels, limits: Limits) -> list[str]:
    if (
        not isinstance(labels, list)
        or not labels
        or len(labels) > limits.max_labels
        or not all(isinstance(x, str) and 0 < len(x) <= limits.max_label_chars for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise _bad(f"labels must be a list of 1..{limits.max_labels} distinct non-empty strings", "bad_labels")
    return labels


def check_compatible(meta: AdapterMeta, spec: BackboneSpec) -> None:
    """Raise unless an adapter fits the backbone (fingerprint first: it names both sides)."""
    if meta.fingerprint != spec.fingerprint:
        raise FingerprintMismatchError(
            f"adapter was made for backbone {meta.fingerprint[:23]} but this server runs {spec.fingerprint[:23]}"
        )
    if (meta.num_layers, meta.num_heads, meta.hidden) != (spec.num_layers, spec.num_heads, spec.hidden):
        raise _bad(
            f"adapter shape (layers, heads, hidden)={(meta.num_layers, meta.num_heads, meta.hidden)} "
            f"!= backbone {(spec.num_layers, spec.num_heads, spec.hidden)}",
            "shape_mismatch",
        )
    if meta.head_style != spec.head_style:
        raise _bad(f"adapter has a {meta.head_style}-style head; this backbone needs {spec.head_style}", "bad_head")
    if meta.num_virtual_tokens > spec.max_virtual_tokens:
        raise _bad(
            f"num_virtual_tokens {meta.num_virtual_tokens} leaves no room for text "
            f"(max {spec.max_virtual_tokens} on this backbone)",
            "too_many_virtual_tokens",
        )


def load_packed(data: bytes, *, expect: BackboneSpec | None = None, limits: Limits = DEFAULT_LIMITS) -> AdapterFile:
    """Parse and fully validate a packed adapter; with ``expect``, also check it fits that backbone."""
    header = _read_header(data, limits)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise _bad(
            f"metadata 'format' must be {FORMAT!r} (use `prefixserve pack` on a PEFT folder)", "missing_metadata"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise _bad(
            f"format_version {meta.get('format_version')!r} is not supported (want {FORMAT_VERSION})", "bad_version"
        )
    config = _json_meta(meta, "adapter_config")
    if not isinstance(config, dict):
        raise _bad("adapter_config must be a JSON object", "bad_config")
    labels = _check_labels(_json_meta(meta, "labels"), limits)
    fingerprint = meta.get("backbone", "")
    if not fingerprint:
        raise _bad("metadata is missing the backbone fingerprint", "missing_metadata")
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise _bad(f"unreadable safetensors payload: {exc}", "bad_tensors") from None
    kind, p, layers, heads, hidden, style = _check_tensors(config, tensors, labels, limits)
    am = AdapterMeta(
        kind,
        config["peft_type"],
        p,
        tuple(labels),
        fingerprint,
        FORMAT_VERSION,
        len(data),
        layers,
        heads,
        hidden,
        style,
    )
    if expect is not None:
        check_compatible(am, expect)
    return AdapterFile(am, config, tensors)


def inspect_packed(data: bytes, *, limits: Limits | None = None, expect: BackboneSpec | None = None) -> AdapterMeta:
    """Validate a packed adapter (structure; and fit if ``expect``) and return its metadata."""
    return load_packed(data, expect=expect, limits=limits or DEFAULT_LIMITS).meta


def dump_packed(peft_config: dict, tensors: dict[str, Tensor], labels: list[str], fingerprint: str) -> bytes:
    """Serialise (and validate) an adapter. Deterministic: same input, same bytes."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())}
    kind = KIND_OF_PEFT_TYPE.get(peft_config.get("peft_type", ""), "")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "adapter_config": json.dumps(peft_config, sort_keys=True),
        "labels": json.dumps(list(labels)),
        "backbone": fingerprint,
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

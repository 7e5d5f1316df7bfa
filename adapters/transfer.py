"""Packed bytes -> tensors -> device: the data path of a cold adapter load (a cache miss).

A cache miss is store read + sha256 + ``format.load_packed`` + device copy, and the budget is 5 ms for
a P=20 klue-base prefix (3.8 MB). Decisions:

* **Zero-copy parse.** ``tensors_from_buffer`` makes every tensor a view of the packed bytes
  (``torch.frombuffer``) once ``format.read_header`` has checked the header; safetensors' ``load``
  copied every tensor out first. A view holds a reference to the buffer, so it stays valid for as
  long as it lives; it also *shares* the buffer's memory. Hence: (1) over an immutable ``bytes`` the
  tensors are read-only by contract (serving never writes an adapter; clone before training on one);
  (2) never parse a buffer that will be overwritten later (a reused receive buffer) unless the
  tensors are copied out first: ``to_device_tensors(..., copy=True)``, or any CUDA device, does that.
* **Same acceptance as safetensors.** Every file that safetensors' own parser refused is still
  refused with ``bad_tensors``, at the same step of ``load_packed`` as before, so a stored adapter
  stays readable by PEFT and the safetensors tools: the data offsets must tile the body exactly
  (sorted, no gap, no overlap, nothing after the last tensor), and the header must parse under
  serde_json's rules, which are stricter than Python's (no NaN/Infinity, no number out of f64 range,
  no lone surrogate, at most 127 nested containers, shapes and offsets unsigned 64-bit integers).
* **One copy to a GPU, none on the CPU.** ``to_device_tensors`` returns CPU tensors as they are
  when the dtype already matches (a cast is the one copy). On CUDA the whole adapter is copied once
  into one pinned block (torch's caching host allocator hands the same block back on the next load
  once its copies have finished), each tensor goes by an asynchronous DMA into its own device
  memory (so keeping one tensor never keeps the others alive), is cast there, and the stream is
  synchronized: the tensors are ready for any stream or thread when it returns.
* Little-endian hosts only (safetensors' byte order is little-endian; so is every torch wheel's host).
"""

from __future__ import annotations

import json
import math
import re
import struct
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidAdapterError

Buffer = bytes | bytearray | memoryview
_U64 = 2**64
_SERDE_MAX_DEPTH = 127  # serde_json's recursion limit: a 128th nested array/object is refused
_STAGING_ALIGN = 256  # bytes: each tensor's segment of the pinned/device block starts aligned for any dtype
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # JSON "\ud800" alone: Python keeps it, serde_json refuses it
if sys.byteorder != "little":  # safetensors data is little-endian; torch.frombuffer reads native order
    raise ImportError("prefixserve's zero-copy adapter loading needs a little-endian host")
# torch warns once per process (its words) that a tensor over read-only ``bytes`` could write into it.
# Intended here and documented above: spend that one warning now, silenced, instead of in a request.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(b"\0", dtype=torch.uint8)


class _SerdeRefusal(ValueError):
    pass


def _serde_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e400": Python reads inf, serde_json says "number out of range"
        raise _SerdeRefusal(f"number out of range: {text[:40]}")
    return value


def _serde_int(text: str) -> int | float:
    if text == "-0":  # serde_json reads -0 as the float -0.0 (so it is no usize)
        return -0.0
    value = int(text)
    return value if -(2**63) <= value < _U64 else _serde_float(text)  # past i64/u64: an f64, as serde_json


def _serde_constant(name: str) -> float:
    raise _SerdeRefusal(f"{name} is not JSON")


def serde_refusal(header_text: str) -> str | None:
    """Why safetensors' parser (serde_json) would refuse a header that Python's ``json`` accepted, else None."""
    try:
        root = json.loads(header_text, parse_float=_serde_float, parse_int=_serde_int, parse_constant=_serde_constant)
    except (ValueError, RecursionError) as exc:  # ours above, or Python's own (read_header refuses those first)
        return str(exc)[:200] or type(exc).__name__
    if not isinstance(root, dict):
        return "the header is not a JSON object"
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:  # iterative: Python's json nests deeper than this recursion limit would allow
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > _SERDE_MAX_DEPTH:
                return "recursion limit exceeded"
            if isinstance(value, dict) and any(_LONE_SURROGATE.search(k) for k in value):
                return "lone surrogate in a key"
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
        elif isinstance(value, str) and _LONE_SURROGATE.search(value):
            return "lone surrogate in a string"
    for name, entry in root.items():  # read_header checked the layout; serde also wants usize, no overflow
        if name == "__metadata__":
            continue
        if not all(type(v) is int for v in (*entry["shape"], *entry["data_offsets"])):
            return f"tensor {name[:80]!r}: shape and offsets must be unsigned 64-bit integers"
        elements = 1
        for dim in entry["shape"]:
            elements *= dim
            if elements >= _U64:
                return f"tensor {name[:80]!r}: element count overflows"
    return None


def _refused(reason: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"unreadable safetensors payload: {reason[:200]}", code="bad_tensors")


def tensors_from_buffer(data: Buffer, header: dict[str, Any], dtypes: Mapping[str, torch.dtype]) -> dict[str, Tensor]:
    """Views of ``data``'s tensors, for a header that ``format.read_header`` already checked (see the module doc).

    Raises ``InvalidAdapterError`` ``bad_tensors`` for whatever safetensors' own parser refused.
    """
    view = memoryview(data).cast("B")
    (n,) = struct.unpack("<Q", view[:8])
    reason = serde_refusal(str(view[8 : 8 + n], "utf-8"))
    if reason:
        raise _refused(reason)
    entries = sorted(
        ((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items() if name != "__metadata__")
    )  # safetensors' order: by (start, end); the tensors must tile the body
    covered = 0
    for start, end, name in entries:
        if start != covered:
            raise _refused(f"invalid offset for tensor {name[:80]!r}")
        covered = end
    if covered != len(view) - 8 - n:
        raise _refused("incomplete metadata, file not fully covered")
    tensors = {}
    try:
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = dtypes[entry["dtype"]], entry["shape"], entry["data_offsets"]
            at, count = 8 + n + start, (end - start) // dtype.itemsize
            if count == 0:  # frombuffer refuses an empty view; there is nothing to share anyway
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif at % dtype.itemsize:  # misaligned (odd F16 sizes before it): one copy, so kernels see aligned data
                tensors[name] = torch.frombuffer(bytearray(view[at : 8 + n + end]), dtype=dtype).view(shape)
            else:
                tensors[name] = torch.frombuffer(view, dtype=dtype, count=count, offset=at).view(shape)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:  # dims torch cannot hold (>= 2**63)
        raise _refused(str(exc)) from None
    return tensors


def to_device_tensors(
    tensors: Mapping[str, Tensor], device: torch.device | str, dtype: torch.dtype, *, copy: bool = False
) -> dict[str, Tensor]:
    """``tensors`` on ``device`` in ``dtype``, same keys; see the module doc for the copies made.

    ``copy=True``: the result owns its memory even on the CPU (for tensors that view a buffer that
    will be reused); on CUDA it always does.
    """
    device = torch.device(device)
    if device.type == "cuda" and all(t.device.type == "cpu" for t in tensors.values()):
        return _via_staging(tensors, device, dtype, pin=True)
    # CPU (or already on the device): .to returns the tensor itself when nothing changes
    return {k: t.to(device, dtype, copy=copy) for k, t in tensors.items()}


def _via_staging(tensors: Mapping[str, Tensor], device: torch.device, dtype: torch.dtype, *, pin: bool) -> dict:
    """One host block (pinned when ``pin``) holding every tensor at aligned offsets, then one DMA per tensor."""
    layout: list[tuple[str, Tensor, int, int]] = []  # name, source, offset, bytes
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        layout.append((name, t, size, nbytes))
        size += -(-nbytes // _STAGING_ALIGN) * _STAGING_ALIGN
    host = torch.empty(max(size, 1), dtype=torch.uint8, pin_memory=pin)  # (bytes,)
    out = {}
    for name, t, at, nbytes in layout:
        staged = host[at : at + nbytes].view(t.dtype).view(t.shape)  # t's shape, in the block
        staged.copy_(t)  # the one CPU-side copy
        out[name] = staged.to(device, non_blocking=pin).to(dtype)  # pinned source: an asynchronous DMA
    if device.type == "cuda":  # ready for every stream and thread (the loader is not the forward's thread)
        torch.cuda.current_stream(device).synchronize()
    return out

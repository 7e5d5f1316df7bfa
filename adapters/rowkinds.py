"""Weight adapter kinds (LoRA, IA3, bottleneck) applied per row segment of a packed batch.

The engine sorts a batch's rows by adapter, so each adapter's rows are ONE contiguous range of stream slots
(its *segment*). At each named point of :class:`~.encoder.Layer` the encoder asks :class:`SegmentHooks`,
which calls each weight adapter on its own segment only (``x[s:e]``): segmented matmuls, the backbone's
weights never merged or copied. Prefix and prompt rows have no weight adapter and cost nothing here.

Points of one layer (``H`` hidden, ``I`` intermediate; PEFT's module names under ``encoder.layer.{i}``)::

    "qkv"       x (T, H) -> y (T, 3H)   query | key | value = columns [0:H] | [H:2H] | [2H:3H]
    "attn_out"  a (T, H) -> y (T, H)    attention.output.dense
    "attn_norm" LayerNorm(x + y)        the residual and norm after attention (bottleneck adapters)
    "ffn_in"    x (T, H) -> y (T, I)    intermediate.dense
    "ffn_out"   f (T, I) -> y (T, H)    output.dense
    "ffn_norm"  LayerNorm(x + y)        the residual and norm after the feed-forward (bottleneck adapters)

A kind implements :class:`RowKind` on segment tensors and returns new tensors (never writes its inputs), so
the same code trains under autograd (one segment: the whole stream) and serves under ``inference_mode``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

# PEFT module path under encoder.layer.{i} -> (encoder point, block of the fused qkv output or None)
MODULES: dict[str, tuple[str, int | None]] = {
    "attention.self.query": ("qkv", 0),
    "attention.self.key": ("qkv", 1),
    "attention.self.value": ("qkv", 2),
    "attention.output.dense": ("attn_out", None),
    "intermediate.dense": ("ffn_in", None),
    "output.dense": ("ffn_out", None),
}
LINEAR_POINTS = ("qkv", "attn_out", "ffn_in", "ffn_out")
NORM_POINTS = ("attn_norm", "ffn_norm")


@dataclass(frozen=True)
class BodyShape:
    """What a weight adapter's tensors require of a backbone (checked against it when loaded)."""

    num_layers: int  # the highest layer index it touches + 1
    hidden: int
    intermediate: int = 0  # 0: no tensor involves the feed-forward width


def module_shape(module: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(in_features, out_features) of a PEFT target module in a BERT-family layer."""
    if module == "intermediate.dense":
        return hidden, intermediate
    if module == "output.dense":
        return intermediate, hidden
    return hidden, hidden


def block_columns(module: str, hidden: int) -> slice:
    """The columns of its point's output that a module owns (a third of ``qkv`` for query/key/value)."""
    block = MODULES[module][1]
    return slice(None) if block is None else slice(block * hidden, (block + 1) * hidden)


class RowKind(Protocol):
    """One weight adapter's math on its own rows. All tensors are the segment's rows only (n tokens).
    Returning the very tensor it was given (``x`` / ``y``) means "unchanged": nothing is copied for it."""

    points: frozenset[tuple[int, str]]  # (layer, point) pairs where it acts; elsewhere it is never called

    def before(self, layer: int, point: str, x: Tensor) -> Tensor:
        """Input of a linear point (n, in) -> the input its rows feed the backbone's linear (n, in)."""
        ...

    def after(self, layer: int, point: str, x: Tensor, y: Tensor, linear: nn.Linear) -> Tensor:
        """Input (n, in) and the backbone linear's output (n, out) -> this adapter's output (n, out)."""
        ...

    def norm(self, layer: int, point: str, x: Tensor, h: Tensor, y: Tensor, ln: nn.LayerNorm) -> Tensor:
        """Residual input x, sub-layer output h, backbone ``ln(x + h)`` y, each (n, H) -> the output (n, H)."""
        ...

    def for_serving(self) -> None:
        """Once on the serving device and dtype, before any batch: precompute a faster serving form, if any."""
        ...


class PassThrough:
    """Identity for every method: kinds subclass it and override the points they use."""

    points: frozenset[tuple[int, str]] = frozenset()

    def before(self, layer: int, point: str, x: Tensor) -> Tensor:
        return x

    def after(self, layer: int, point: str, x: Tensor, y: Tensor, linear: nn.Linear) -> Tensor:
        return y

    def norm(self, layer: int, point: str, x: Tensor, h: Tensor, y: Tensor, ln: nn.LayerNorm) -> Tensor:
        return y

    def for_serving(self) -> None:
        return None


@dataclass
class SegmentHooks:
    """What the encoder calls at every point: each weight adapter on its own segment of the stream.

    ``segments``: (start, end, adapter) with disjoint stream ranges. A point's *input* is never written (the
    stream ``x`` is also the residual): ``before`` results go into a copy. Outputs of a linear or norm are
    fresh tensors nobody else holds, so without autograd the adapters' rows are written into them in place."""

    segments: Sequence[tuple[int, int, RowKind]]

    def __post_init__(self) -> None:
        self._at: dict[tuple[int, str], list[tuple[int, int, RowKind]]] = {}
        for s, e, kind in self.segments:
            for key in kind.points:
                self._at.setdefault(key, []).append((s, e, kind))

    def active(self, layer: int, point: str) -> bool:
        return (layer, point) in self._at

    def before(self, layer: int, point: str, x: Tensor) -> Tensor:
        return self._each(layer, point, x, False, lambda k, s, e, seg: k.before(layer, point, seg))

    def after(self, layer: int, point: str, x: Tensor, y: Tensor, linear: nn.Linear) -> Tensor:
        return self._each(layer, point, y, True, lambda k, s, e, seg: k.after(layer, point, x[s:e], seg, linear))

    def norm(self, layer: int, point: str, x: Tensor, h: Tensor, y: Tensor, ln: nn.LayerNorm) -> Tensor:
        return self._each(layer, point, y, True, lambda k, s, e, seg: k.norm(layer, point, x[s:e], h[s:e], seg, ln))

    def _each(
        self, layer: int, point: str, base: Tensor, fresh: bool, run: Callable[[RowKind, int, int, Tensor], Tensor]
    ) -> Tensor:
        """``base`` with each adapter's rows replaced by ``run`` on them. A kind that hands back the segment it
        was given changed nothing: most leave inputs alone (LoRA, output-side IA3), so no copy is made."""
        parts = []
        for s, e, k in self._at.get((layer, point), ()):
            seg = base[s:e]
            out = run(k, s, e, seg)
            if out is not seg:
                parts.append((s, e, out))
        return _spliced(base, parts, fresh=fresh) if parts else base


def _spliced(base: Tensor, parts: list[tuple[int, int, Tensor]], *, fresh: bool) -> Tensor:
    """``base`` with rows [s:e) replaced by each part. ``fresh``: base is a temporary only this point holds,
    written in place unless autograd tracks it; otherwise one copy, then slice writes."""
    if len(parts) == 1 and parts[0][0] == 0 and parts[0][1] == base.shape[0]:
        return parts[0][2]  # one segment over the whole stream (training): no copy at all
    out = base if fresh and not (torch.is_grad_enabled() and base.requires_grad) else base.clone()
    for s, e, part in parts:
        out[s:e] = part
    return out


def adapter_nbytes(module: nn.Module) -> int:
    """Bytes of a device adapter's tensors (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def as_float(t: Tensor, like: Tensor) -> Tensor:
    """``t`` in ``like``'s dtype (adapter tensors follow the serving dtype)."""
    return t if t.dtype == like.dtype else t.to(like.dtype)


__all__ = [
    "BodyShape",
    "LINEAR_POINTS",
    "MODULES",
    "NORM_POINTS",
    "PassThrough",
    "RowKind",
    "SegmentHooks",
    "adapter_nbytes",
    "as_float",
    "block_columns",
    "module_shape",
]

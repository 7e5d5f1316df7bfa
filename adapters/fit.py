"""Whether an adapter fits the served backbone: fingerprint first (it names both sides), then shapes and head."""

from __future__ import annotations

from .errors import FingerprintMismatchError, InvalidAdapterError
from .heads import PEFT_POOLER_PREFIX
from .meta import AdapterMeta, BackboneSpec


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def check_compatible(meta: AdapterMeta, spec: BackboneSpec) -> None:
    """Raise unless an adapter fits the backbone (fingerprint first: it names both sides)."""
    if meta.fingerprint != spec.fingerprint:
        raise FingerprintMismatchError(
            f"adapter was made for backbone {meta.fingerprint[:23]} but this server runs {spec.fingerprint[:23]}"
        )
    if meta.is_weight_kind:
        _check_weight_fit(meta, spec)
    elif (meta.num_layers, meta.num_heads, meta.hidden) != (spec.num_layers, spec.num_heads, spec.hidden):
        raise _bad(
            f"adapter shape (layers, heads, hidden)={(meta.num_layers, meta.num_heads, meta.hidden)} "
            f"!= backbone {(spec.num_layers, spec.num_heads, spec.hidden)}",
            "shape_mismatch",
        )
    if meta.head_style != spec.head_style:
        raise _bad(f"adapter has a {meta.head_style}-style head; this backbone needs {spec.head_style}", "bad_head")
    if meta.head_style == "bert" and not meta.has_pooler and not spec.has_pooler:
        raise _bad(
            "this backbone's checkpoint has no pooler weights, and the adapter's BERT-style head brings none "
            f"(train it with prefixserve, or save PEFT's pooler too: modules_to_save=['classifier', 'pooler'] "
            f"stores {PEFT_POOLER_PREFIX}weight/bias)",
            "needs_pooler",
        )
    if meta.num_virtual_tokens > spec.max_virtual_tokens:
        raise _bad(
            f"num_virtual_tokens {meta.num_virtual_tokens} leaves no room for text "
            f"(max {spec.max_virtual_tokens} on this backbone)",
            "too_many_virtual_tokens",
        )


def _check_weight_fit(meta: AdapterMeta, spec: BackboneSpec) -> None:
    """A weight kind's target modules exist in the backbone with the widths its tensors have."""
    if meta.num_layers > spec.num_layers:
        raise _bad(
            f"adapter targets layer {meta.num_layers - 1}; this backbone has layers 0..{spec.num_layers - 1}",
            "unsupported_target",
        )
    if meta.hidden != spec.hidden or (
        meta.intermediate and spec.intermediate and meta.intermediate != spec.intermediate
    ):
        raise _bad(
            f"adapter widths (hidden, intermediate)={(meta.hidden, meta.intermediate)} "
            f"!= backbone {(spec.hidden, spec.intermediate)}",
            "shape_mismatch",
        )

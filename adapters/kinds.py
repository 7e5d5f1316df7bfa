"""The adapter kinds we serve, in one table, and the check of each kind's body tensors.

=============  ===================================  =====================================================
kind           ``peft_type`` in ``adapter_config``  body tensors in the packed file (besides the head)
=============  ===================================  =====================================================
prefix         PREFIX_TUNING                        ``prompt_embeddings`` (P, layers*2*hidden)
prompt         PROMPT_TUNING, P_TUNING              ``prompt_embeddings`` (Q, hidden)
lora           LORA                                 ``encoder.layer.{i}.{module}.lora_A/B.weight``
ia3            IA3                                  ``encoder.layer.{i}.{module}.ia3_l``
bottleneck     BOTTLENECK (ours: PEFT has none)     ``encoder.layer.{i}.{block}.adapter_down/up.*``
=============  ===================================  =====================================================

*Virtual* kinds (prefix, prompt) add tokens to a row; *weight* kinds (lora, ia3, bottleneck) change the
encoder's computation on a row's tokens (:mod:`.rowkinds`). Each weight kind is a package
``prefixserve.adapters.<kind>`` exporting ``PEFT_TYPE``, ``KIND``, ``check(config, body) -> BodyShape``,
``build(config, body) -> nn.Module`` (a :class:`~.rowkinds.RowKind`) and ``Adapter``, that module's class
(``Adapter.init(cfg, backbone_config)``: a fresh trainable one).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TypeGuard

from torch import Tensor

from .errors import InvalidAdapterError
from .rowkinds import BodyShape

KIND_OF_PEFT_TYPE = {
    "PREFIX_TUNING": "prefix",
    "PROMPT_TUNING": "prompt",
    "P_TUNING": "prompt",
    "LORA": "lora",
    "IA3": "ia3",
    "BOTTLENECK": "bottleneck",
}
VIRTUAL_KINDS = ("prefix", "prompt")
WEIGHT_KINDS = ("lora", "ia3", "bottleneck")
KINDS = (*VIRTUAL_KINDS, *WEIGHT_KINDS)
VIRTUAL_KEY = "prompt_embeddings"


def weight_kind(kind: str) -> ModuleType:
    """The package of a weight kind (``check``, ``build``, its config and model)."""
    if kind not in WEIGHT_KINDS:
        raise ValueError(f"{kind!r} is not a weight adapter kind")
    return importlib.import_module(f"prefixserve.adapters.{kind}")


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _positive_int(value: object) -> TypeGuard[int]:
    return type(value) is int and value > 0


def check_virtual(kind: str, config: dict, body: dict[str, Tensor], max_virtual_tokens: int) -> dict[str, int]:
    """A prefix or prompt body: ``prompt_embeddings`` agreeing with the config. Returns the meta's shape fields."""
    if set(body) != {VIRTUAL_KEY}:
        extra = sorted(set(body) - {VIRTUAL_KEY}) or [VIRTUAL_KEY]
        raise _bad(
            f"expected {VIRTUAL_KEY!r} and classifier tensors; missing or unexpected: {extra[:5]}", "bad_tensors"
        )
    virtual = body[VIRTUAL_KEY]
    if virtual.ndim != 2:
        raise _bad(f"{VIRTUAL_KEY} must be 2-D, got shape {tuple(virtual.shape)}", "shape_mismatch")
    p = virtual.shape[0]
    if p < 1 or p > max_virtual_tokens:
        raise _bad(f"num_virtual_tokens {p} outside 1..{max_virtual_tokens}", "too_many_virtual_tokens")
    declared = config.get("num_virtual_tokens")
    if type(declared) is not int or declared != p:
        raise _bad(f"config num_virtual_tokens {str(declared)[:40]} != tensor rows {p}", "shape_mismatch")
    hidden, layers, heads = config.get("token_dim"), config.get("num_layers"), config.get("num_attention_heads")
    if not (_positive_int(hidden) and _positive_int(layers) and _positive_int(heads)) or hidden % heads:
        raise _bad(
            "config needs integer token_dim, num_layers, num_attention_heads > 0 (token_dim % heads == 0)", "bad_config"
        )
    width = layers * 2 * hidden if kind == "prefix" else hidden
    if virtual.shape[1] != width:
        raise _bad(f"{VIRTUAL_KEY} width {virtual.shape[1]} != expected {width} for a {kind}", "shape_mismatch")
    return {"num_virtual_tokens": p, "num_layers": layers, "num_heads": heads, "hidden": hidden}


def check_weights(kind: str, config: dict, body: dict[str, Tensor]) -> dict[str, int]:
    """A weight kind's body, by its own package. Returns the meta's shape fields (no virtual tokens)."""
    shape: BodyShape = weight_kind(kind).check(config, body)
    return {
        "num_virtual_tokens": 0,
        "num_layers": shape.num_layers,
        "num_heads": 0,  # weight kinds do not depend on the head split
        "hidden": shape.hidden,
        "intermediate": shape.intermediate,
    }

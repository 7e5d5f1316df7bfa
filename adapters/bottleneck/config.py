"""Bottleneck adapter settings, exactly AdapterHub's ``BnConfig`` (``adapters`` library, same JSON keys).

Source read (github adapter-hub/adapters @ 88f18ebd, 2026-03-21):

* ``src/adapters/configuration/adapter_config.py``: ``BnConfig`` (fields, defaults), ``SeqBnConfig``
  (Pfeiffer et al. 2020) and ``DoubleSeqBnConfig`` (Houlsby et al. 2019) presets, ``ADAPTER_CONFIG_MAP``.
* ``src/adapters/methods/modeling.py``: ``Adapter`` (``adapter_down = Sequential(Linear(H, down), act)``,
  ``adapter_up = Linear(down, H)``, ``scaling``, ``pre_forward`` / ``forward`` / ``post_forward``,
  ``init_bert_weights``) and ``Activation_Function_Class`` (``leakyrelu`` or transformers' ``get_activation``).
* ``src/adapters/methods/bottleneck.py``: ``BottleneckLayer.add_adapter`` (``down = int(H // reduction_factor)``,
  a mapping looked up by ``str(layer)`` then ``"default"``; ``Adapter`` clamps ``down`` to >= 1) and
  ``bottleneck_layer_forward`` (pre_forward, the adapter, post_forward of the one active adapter).
* ``src/adapters/configuration/model_adapters_config.py``: ``match`` (no adapter in ``leave_out`` layers, and
  only where ``config[location_key]`` is true: ``mh_adapter`` / ``output_adapter``).
* ``src/adapters/models/bert/modeling_bert.py`` (RoBERTa / XLM-R copy it): ``BertSelfOutputWithAdapters`` and
  ``BertOutputWithAdapters`` call ``bottleneck_layer_forward(dense(hidden), input_tensor, self.LayerNorm)``:
  the "mh_adapter" block is ``attention.output``, the "output_adapter" block is ``output``.

The equations, for one block: ``x`` its residual input (``input_tensor``), ``h`` the dense output (after
dropout, identity in eval), ``LN`` the layer's own LayerNorm, ``rbl = residual_before_ln``::

    residual = h                        if rbl is True
    t        = h + x                    if original_ln_before   (else t = h)
    residual = t                        if original_ln_before and rbl == "post_add"
    t        = LN(t)                    if original_ln_before
    residual = t                        if rbl is False
    out      = up(act(down(t))) * scaling + residual
    out      = LN(out + x)              if original_ln_after    (else out is the block's output)

Pfeiffer (SeqBn): output block only, ``out = LN(up(relu(down(LN(x + h)))) + h + x)``.
Houlsby (DoubleSeqBn): both blocks, ``out = LN(up(swish(down(h))) + h + x)``.
(``adapter_residual_before_ln`` only matters with ``ln_after``; dropout and stochastic depth are training-only.)

Our encoder's norm points ``attn_norm`` / ``ffn_norm`` are these two blocks; ``LN(x + h)`` is the backbone's own
``y`` (the same sum: float addition commutes), reused rather than recomputed.

Config dict stored in the packed file: AdapterHub's ``BnConfig.to_dict()`` (every field, as
``save_adapter`` writes it under ``"config"``) plus ``"peft_type": "BOTTLENECK"`` (our name: PEFT has no
bottleneck type) and ``"task_type": "SEQ_CLS"``. AdapterHub writes no ``architecture`` key for bottleneck
adapters (``BnConfig`` is the ``architecture=None`` class); we accept a missing key, ``null`` or
``"bottleneck"`` and write none, so the dict loads unchanged in AdapterHub.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidAdapterError

PEFT_TYPE = "BOTTLENECK"
# AdapterHub names (lower-cased, as Adapter does) -> kept; each is transformers' get_activation(name)
# except "leakyrelu" (torch's leaky_relu), as Activation_Function_Class maps them.
ACTIVATIONS = ("relu", "swish", "silu", "gelu", "gelu_new", "tanh", "sigmoid", "leakyrelu")
# Fields that change the math when true: refused (unsupported_config), never silently ignored.
UNSUPPORTED_IF_SET = ("ln_before", "ln_after", "use_gating", "is_parallel", "phm_layer", "inv_adapter")
INIT_WEIGHTS = ("bert", "houlsby", "mam_adapter")
# BnConfig fields we do not model, with AdapterHub's defaults: written so an exported dict is a full BnConfig.
OTHER_DEFAULTS: dict[str, Any] = {
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "use_gating": False,
    "adapter_residual_before_ln": False,
    "inv_adapter": None,
    "inv_adapter_reduction_factor": None,
    "cross_adapter": False,
    "dropout": 0.0,
    "phm_layer": False,
    "phm_dim": 4,
    "factorized_phm_W": True,
    "shared_W_phm": False,
    "shared_phm_rule": True,
    "factorized_phm_rule": False,
    "phm_c_init": "normal",
    "phm_init_range": 0.0001,
    "learn_phm": True,
    "hypercomplex_nonlinearity": "glorot-uniform",
    "phm_rank": 1,
    "phm_bias": True,
    "stochastic_depth": 0.0,
}


def _bad(msg: str, code: str = "bad_config") -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _q(value: object) -> str:
    """A short repr for messages (client values may be huge)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class BottleneckConfig:
    """AdapterHub ``BnConfig`` (its JSON keys and defaults); the four fields without defaults are required there too."""

    mh_adapter: bool = field(metadata={"help": "Adapter in the attention output block (after attention.output.dense)."})
    output_adapter: bool = field(metadata={"help": "Adapter in the layer output block (after output.dense)."})
    reduction_factor: float | dict[str, float] = field(
        metadata={"help": "down = int(H // rf), >= 1; or {str(layer): rf, ..., 'default': rf} per layer."}
    )
    non_linearity: str = field(metadata={"help": f"Bottleneck activation, one of {ACTIVATIONS}."})
    original_ln_before: bool = field(
        default=False, metadata={"help": "Feed the adapter LN(x + h) (the layer's LayerNorm) instead of h."}
    )
    original_ln_after: bool = field(
        default=True, metadata={"help": "Apply the residual x and the layer's LayerNorm after the adapter."}
    )
    residual_before_ln: bool | str = field(
        default=True,
        metadata={"help": "Adapter residual: h (True), the adapter input (False) or h + x ('post_add')."},
    )
    scaling: float = field(default=1.0, metadata={"help": "Constant factor on the adapter output (He et al.)."})
    leave_out: list[int] = field(default_factory=list, metadata={"help": "Layers (from 0) without adapters."})
    init_weights: str = field(default="bert", metadata={"help": f"Initialisation, one of {INIT_WEIGHTS}."})
    init_weights_seed: int | None = field(
        default=None, metadata={"help": "Reseed before each adapter module (same init everywhere) if set."}
    )

    @classmethod
    def pfeiffer(cls, **changes: Any) -> BottleneckConfig:
        """AdapterHub ``SeqBnConfig`` ("pfeiffer", "seq_bn")."""
        base: dict[str, Any] = dict(
            mh_adapter=False,
            output_adapter=True,
            reduction_factor=16,
            non_linearity="relu",
            original_ln_before=True,
            original_ln_after=True,
            residual_before_ln=True,
        )
        return cls(**(base | changes))

    @classmethod
    def houlsby(cls, **changes: Any) -> BottleneckConfig:
        """AdapterHub ``DoubleSeqBnConfig`` ("houlsby", "double_seq_bn")."""
        base: dict[str, Any] = dict(
            mh_adapter=True,
            output_adapter=True,
            reduction_factor=16,
            non_linearity="swish",
            original_ln_before=False,
            original_ln_after=True,
            residual_before_ln=True,
        )
        return cls(**(base | changes))

    def reduction_at(self, layer: int) -> float:
        """AdapterHub's lookup: a number, or the mapping's ``str(layer)`` entry, else its ``"default"``."""
        rf = self.reduction_factor
        if not isinstance(rf, Mapping):
            return rf
        if str(layer) in rf:
            return rf[str(layer)]
        if "default" in rf:
            return rf["default"]
        raise _bad(f"reduction_factor has no entry for layer {layer} and no 'default'")

    def down_size(self, layer: int, hidden: int) -> int:
        """Bottleneck width at ``layer``: ``int(H // rf)`` clamped to >= 1 (bottleneck.py + modeling.py)."""
        return max(1, int(hidden // self.reduction_at(layer)))

    def locations(self, num_layers: int) -> list[tuple[int, str]]:
        """(layer, block) where AdapterHub adds a module; block "attention.output" or "output"."""
        out = []
        for i in range(num_layers):
            if i in self.leave_out:
                continue
            if self.mh_adapter:
                out.append((i, "attention.output"))
            if self.output_adapter:
                out.append((i, "output"))
        return out

    def to_adapterhub_dict(self) -> dict[str, Any]:
        """AdapterHub's ``BnConfig.to_dict()``: every field (ours + the defaults of those we do not model)."""
        rf = dict(self.reduction_factor) if isinstance(self.reduction_factor, Mapping) else self.reduction_factor
        own = {
            "mh_adapter": self.mh_adapter,
            "output_adapter": self.output_adapter,
            "reduction_factor": rf,
            "non_linearity": self.non_linearity,
            "original_ln_before": self.original_ln_before,
            "original_ln_after": self.original_ln_after,
            "residual_before_ln": self.residual_before_ln,
            "scaling": float(self.scaling),  # AdapterHub's Adapter only accepts a Python float
            "leave_out": list(self.leave_out),
            "init_weights": self.init_weights,
            "init_weights_seed": self.init_weights_seed,
        }
        return OTHER_DEFAULTS | own

    def to_config_dict(self, task_type: str = "SEQ_CLS") -> dict[str, Any]:
        """The packed file's ``adapter_config``."""
        return self.to_adapterhub_dict() | {"peft_type": PEFT_TYPE, "task_type": task_type}

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> BottleneckConfig:
        """Validate an AdapterHub / packed config dict (BnConfig defaults for absent optional fields).

        Raises ``InvalidAdapterError``: ``bad_config`` (missing or malformed field), ``unsupported_config``
        (a valid AdapterHub setting that changes the math and that we do not implement)."""
        if not isinstance(config, Mapping):
            raise _bad("adapter_config must be a JSON object")
        arch = config.get("architecture")
        if arch not in (None, "bottleneck"):
            raise _bad(f"architecture {_q(arch)} is not a bottleneck adapter", "unsupported_config")
        for key in UNSUPPORTED_IF_SET:
            if config.get(key) not in (None, False):
                raise _bad(f"{key}={_q(config[key])} is not supported; train without it", "unsupported_config")
        for key in ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity"):
            if key not in config:
                raise _bad(f"adapter_config needs {key!r} (a required BnConfig field)")
        flags = {}
        for key, default in (
            ("mh_adapter", None),
            ("output_adapter", None),
            ("original_ln_before", False),
            ("original_ln_after", True),
        ):
            value = config.get(key, default)
            if not isinstance(value, bool):
                raise _bad(f"{key} must be true or false, got {_q(value)}")
            flags[key] = value
        if not (flags["mh_adapter"] or flags["output_adapter"]):
            raise _bad("mh_adapter and output_adapter are both false: the adapter would do nothing")

        rf = config["reduction_factor"]
        if isinstance(rf, Mapping):
            if not rf:
                raise _bad("reduction_factor mapping is empty")
            for k, v in rf.items():
                if not (k == "default" or (isinstance(k, str) and k.isdigit() and str(int(k)) == k)):
                    raise _bad(f"reduction_factor keys are layer numbers or 'default', got {_q(k)}")
                if not _is_number(v) or v <= 0:
                    raise _bad(f"reduction_factor[{_q(k)}] must be a number > 0, got {_q(v)}")
            rf = {str(k): v for k, v in rf.items()}
        elif not _is_number(rf) or rf <= 0:
            raise _bad(f"reduction_factor must be a number > 0 or a mapping, got {_q(rf)}")

        act = config["non_linearity"]
        if not isinstance(act, str):
            raise _bad(f"non_linearity must be a string, got {_q(act)}")
        if act.lower() not in ACTIVATIONS:
            raise _bad(f"non_linearity {_q(act)} is not supported: one of {ACTIVATIONS}", "unsupported_config")

        scaling = config.get("scaling", 1.0)
        if isinstance(scaling, str) and scaling in ("learned", "channel"):
            raise _bad(f"scaling={scaling!r} is not supported; use a constant", "unsupported_config")
        if not _is_number(scaling):
            raise _bad(f"scaling must be a finite number, got {_q(scaling)}")

        rbl = config.get("residual_before_ln", True)
        if rbl not in (True, False, "post_add") or not isinstance(rbl, bool | str):
            raise _bad(f"residual_before_ln must be true, false or 'post_add', got {_q(rbl)}")
        if rbl == "post_add" and not flags["original_ln_before"]:  # AdapterHub never sets the residual then
            raise _bad("residual_before_ln='post_add' needs original_ln_before=true")

        leave_out = config.get("leave_out", [])
        if leave_out is None:
            leave_out = []
        if not isinstance(leave_out, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in leave_out
        ):
            raise _bad(f"leave_out must be a list of layer numbers, got {_q(leave_out)}")
        if any(i < 0 for i in leave_out):
            raise _bad(f"leave_out layers start at 0, got {_q(leave_out)}")

        init = config.get("init_weights", "bert")
        if init not in INIT_WEIGHTS:
            raise _bad(f"init_weights must be one of {INIT_WEIGHTS}, got {_q(init)}")
        seed = config.get("init_weights_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise _bad(f"init_weights_seed must be an integer or null, got {_q(seed)}")
        return cls(
            mh_adapter=flags["mh_adapter"],
            output_adapter=flags["output_adapter"],
            reduction_factor=rf,
            non_linearity=act.lower(),
            original_ln_before=flags["original_ln_before"],
            original_ln_after=flags["original_ln_after"],
            residual_before_ln=rbl,
            scaling=float(scaling),
            leave_out=sorted(set(leave_out)),
            init_weights=init,
            init_weights_seed=seed,
        )

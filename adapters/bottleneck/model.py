"""Bottleneck adapters (AdapterHub Pfeiffer / Houlsby) at the encoder's two residual norms.

One adapter block per (layer, AdapterHub block): ``attention.output`` -> our ``attn_norm`` point,
``output`` -> ``ffn_norm``. The equations are in :mod:`.config`'s docstring (AdapterHub's ``Adapter``).

Packed body tensors (backbone-neutral, AdapterHub's block paths under ``encoder.layer.{i}``)::

    encoder.layer.{i}.{attention.output|output}.adapter_down.weight   (down, H)
    encoder.layer.{i}.{attention.output|output}.adapter_down.bias     (down,)
    encoder.layer.{i}.{attention.output|output}.adapter_up.weight     (H, down)
    encoder.layer.{i}.{attention.output|output}.adapter_up.bias       (H,)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import get_activation

from ..errors import InvalidAdapterError
from ..rowkinds import BodyShape, PassThrough, as_float
from .config import BottleneckConfig, _q

POINT_OF_BLOCK = {"attention.output": "attn_norm", "output": "ffn_norm"}  # AdapterHub block -> our norm point
BLOCK_OF_POINT = {v: k for k, v in POINT_OF_BLOCK.items()}
PARTS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")
_KEY = re.compile(
    r"encoder\.layer\.(0|[1-9][0-9]{0,2})\.(attention\.output|output)\.(adapter_(?:down|up)\.(?:weight|bias))"
)


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """AdapterHub's ``Activation_Function_Class``: ``leakyrelu`` is torch's, the rest transformers' ACT2FN."""
    name = name.lower()
    return F.leaky_relu if name == "leakyrelu" else get_activation(name)


def key(layer: int, block: str, part: str) -> str:
    return f"encoder.layer.{layer}.{block}.{part}"


class Block(nn.Module):
    """``up(act(down(t)))``: AdapterHub's ``adapter_down = Sequential(Linear, act)`` then ``adapter_up``."""

    def __init__(self, hidden: int, down: int, act: str):
        super().__init__()
        self.adapter_down = nn.Linear(hidden, down)
        self.adapter_up = nn.Linear(down, hidden)
        self.act = activation(act)

    def forward(self, t: Tensor) -> Tensor:
        d, u = self.adapter_down, self.adapter_up
        z = self.act(F.linear(t, as_float(d.weight, t), as_float(d.bias, t)))  # (n, down)
        return F.linear(z, as_float(u.weight, t), as_float(u.bias, t))  # (n, H)


class BottleneckAdapter(nn.Module, PassThrough):
    """One tenant's bottleneck adapter as a :class:`~..rowkinds.RowKind` (``norm`` at its blocks only)."""

    def __init__(self, config: BottleneckConfig, hidden: int, downs: Mapping[tuple[int, str], int]):
        super().__init__()
        self.config = config
        self.hidden = hidden
        self.blocks = nn.ModuleDict(
            {_name(i, b): Block(hidden, d, config.non_linearity) for (i, b), d in sorted(downs.items())}
        )
        self.points = frozenset((i, POINT_OF_BLOCK[b]) for i, b in downs)

    def norm(self, layer: int, point: str, x: Tensor, h: Tensor, y: Tensor, ln: nn.LayerNorm) -> Tensor:
        """x residual input, h dense output, y = ln(x + h), all (n, H) -> AdapterHub's block output (n, H)."""
        c = self.config
        block = self.blocks[_name(layer, BLOCK_OF_POINT[point])]
        residual = h  # residual_before_ln True (pre_forward)
        if c.original_ln_before:
            if c.residual_before_ln == "post_add":
                residual = h + x  # (n, H)
            t = y  # LN(h + x): the backbone already computed it
        else:
            t = h
        if c.residual_before_ln is False:
            residual = t
        up = block(t) * c.scaling  # (n, H)
        out = up + residual  # (n, H): Adapter.forward's residual connection
        return ln(out + x) if c.original_ln_after else out  # (n, H): post_forward

    def body(self) -> dict[str, Tensor]:
        """The packed body tensors (inverse of :func:`build`): detached CPU copies."""
        out: dict[str, Tensor] = {}
        for name, block in self.blocks.items():
            layer, b = _parse_name(name)
            for part in PARTS:
                mod, attr = part.split(".")
                out[key(layer, b, part)] = getattr(getattr(block, mod), attr).detach().cpu().clone().contiguous()
        return out

    @classmethod
    def init(cls, cfg: BottleneckConfig, backbone_config: PretrainedConfig) -> BottleneckAdapter:
        """A fresh trainable adapter, initialised as AdapterHub's ``Adapter.__init__`` does (``init_weights``)."""
        hidden, layers = int(backbone_config.hidden_size), int(backbone_config.num_hidden_layers)
        downs = {(i, b): cfg.down_size(i, hidden) for i, b in cfg.locations(layers)}
        adapter = cls(cfg, hidden, downs)
        with torch.no_grad():
            for block in adapter.blocks.values():
                assert isinstance(block, Block)
                if cfg.init_weights_seed:  # fix_seed: `if seed:` (0 does not reseed)
                    torch.manual_seed(cfg.init_weights_seed)
                _init_block(block, cfg.init_weights)
        return adapter


def _init_block(block: Block, how: str) -> None:
    down, up = block.adapter_down, block.adapter_up
    if how == "bert":  # Adapter.init_bert_weights: normal(0, 0.02) weights, zero biases
        for lin in (down, up):
            lin.weight.normal_(mean=0.0, std=0.02)
            lin.bias.zero_()
    elif how == "houlsby":
        for lin in (down, up):
            nn.init.trunc_normal_(lin.weight, mean=0, std=1e-2, a=-2e-2, b=2e-2)
            nn.init.zeros_(lin.bias)
    else:  # mam_adapter: the adapter starts as the identity (up is zero)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)
        nn.init.zeros_(up.bias)


def _name(layer: int, block: str) -> str:
    return f"{layer}_{'mh' if block == 'attention.output' else 'output'}"  # ModuleDict keys cannot hold dots


def _parse_name(name: str) -> tuple[int, str]:
    layer, b = name.split("_", 1)
    return int(layer), "attention.output" if b == "mh" else "output"


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _layout(config: BottleneckConfig, body: Mapping[str, Tensor]) -> tuple[int, dict[tuple[int, str], int]]:
    """Check names and shapes; -> (hidden, {(layer, block): down})."""
    if not body:
        raise _bad("a bottleneck adapter needs adapter_down / adapter_up tensors; none found", "bad_tensors")
    found: dict[tuple[int, str], set[str]] = {}
    for name in body:
        m = _KEY.fullmatch(name) if isinstance(name, str) else None
        if m is None:
            raise _bad(
                f"unexpected tensor {_q(name)}: want encoder.layer.N.(attention.output|output).adapter_*", "bad_tensors"
            )
        found.setdefault((int(m[1]), m[2]), set()).add(m[3])
    num_layers = max(i for i, _ in found) + 1
    want = set(config.locations(num_layers))
    extra = sorted(set(found) - want)
    if extra:
        raise _bad(f"tensors at layer {extra[0][0]} {extra[0][1]}, where this config puts no adapter", "bad_tensors")
    for loc in sorted(want):
        missing = set(PARTS) - found.get(loc, set())
        if missing:
            raise _bad(f"missing {key(loc[0], loc[1], sorted(missing)[0])}", "bad_tensors")
    first = body[key(*min(want), "adapter_up.weight")]
    if first.dim() != 2:
        raise _bad(f"adapter_up.weight must be 2-D (H, down), got {tuple(first.shape)}", "shape_mismatch")
    hidden = int(first.shape[0])
    downs: dict[tuple[int, str], int] = {}
    for layer, b in sorted(want):
        d = config.down_size(layer, hidden)
        shapes = {"adapter_down.weight": (d, hidden), "adapter_down.bias": (d,), "adapter_up.weight": (hidden, d)}
        shapes["adapter_up.bias"] = (hidden,)
        for part, shape in shapes.items():
            got = tuple(body[key(layer, b, part)].shape)
            if got != shape:
                raise _bad(
                    f"{key(layer, b, part)} has shape {got}, expected {shape} (hidden {hidden}, "
                    f"reduction_factor {config.reduction_at(layer)!r})",
                    "shape_mismatch",
                )
        downs[(layer, b)] = d
    return hidden, downs


def check(config: Mapping[str, Any], body: Mapping[str, Tensor]) -> BodyShape:
    """Validate an adapter_config and the body tensors; -> what they need of a backbone."""
    cfg = BottleneckConfig.from_config_dict(config)
    hidden, downs = _layout(cfg, body)
    return BodyShape(num_layers=max(i for i, _ in downs) + 1, hidden=hidden)


def build(config: Mapping[str, Any], body: Mapping[str, Tensor]) -> BottleneckAdapter:
    """The adapter module holding fp32 CPU copies of ``body`` (checked first)."""
    cfg = BottleneckConfig.from_config_dict(config)
    hidden, downs = _layout(cfg, body)
    with torch.random.fork_rng(devices=[]):  # its Linear layers' default init is overwritten: leave the RNG alone
        adapter = BottleneckAdapter(cfg, hidden, downs)
    with torch.no_grad():
        for name, block in adapter.blocks.items():
            layer, b = _parse_name(name)
            for part in PARTS:
                mod, attr = part.split(".")
                getattr(getattr(block, mod), attr).copy_(body[key(layer, b, part)].detach().float())
    return adapter

"""IA3 on the encoder's linear points: a learned vector scales a module's output, or its input (feed-forward)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from .. import peft_weights as pw
from ..rowkinds import MODULES, PassThrough, as_float, block_columns
from .config import KIND, SUFFIX, IA3Config, check_config, expected_shape, plan, resolve


def _key(layer: int, module: str) -> str:
    return f"{layer}_{module.replace('.', '_')}"  # a ParameterDict key may not contain dots


class IA3Adapter(nn.Module, PassThrough):
    """One tenant's IA3. ``targets``: (layer, module) -> (ia3_l, feed-forward?) with PEFT's shapes:
    (out, 1) scales the output ``y * l`` (bias included, as PEFT), (1, in) the input ``linear(x * l)``."""

    kind = KIND

    def __init__(self, config: dict[str, Any], targets: dict[tuple[int, str], tuple[Tensor, bool]], hidden: int):
        super().__init__()
        self.config = dict(config)
        self.hidden = hidden
        self.ia3_l = nn.ParameterDict(
            {_key(*t): nn.Parameter(v.detach().float().clone()) for t, (v, _) in targets.items()}
        )
        self.feedforward = {_key(*t): ff for t, (_, ff) in targets.items()}
        self.modules_at: dict[tuple[int, str], list[tuple[str, str]]] = {}  # (layer, point) -> [(module, key)]
        for layer, module in sorted(targets):
            self.modules_at.setdefault((layer, MODULES[module][0]), []).append((module, _key(layer, module)))
        self.points = frozenset(self.modules_at)
        self.names = {_key(layer, module): (layer, module) for layer, module in targets}
        self.served: dict[int, Tensor] = {}  # layer -> fused qkv output scale (see for_serving)

    def _l(self, key: str, like: Tensor) -> Tensor:
        return as_float(self.ia3_l[key], like=like).flatten()  # (out,) or (in,)

    def before(self, layer: int, point: str, x: Tensor) -> Tensor:
        if point == "qkv":  # q, k and v share their input: a feed-forward block is recomputed in after()
            return x
        key = self.modules_at[(layer, point)][0][1]
        return x * self._l(key, x) if self.feedforward[key] else x  # (n, in)

    @torch.no_grad()
    def for_serving(self) -> None:
        """The engine's form (after ``.to(device, dtype)``): at a qkv point whose targets all scale outputs, one
        (3H,) vector (ones where no module is targeted) instead of a split, per-block products and a concatenation."""
        for (layer, point), hits in self.modules_at.items():
            if point != "qkv" or any(self.feedforward[key] for _, key in hits):
                continue
            first = self.ia3_l[hits[0][1]]
            scale = first.new_ones(3 * self.hidden)  # (3H,)
            for module, key in hits:
                scale[block_columns(module, self.hidden)] = self.ia3_l[key].flatten()
            self.register_buffer(f"served_qkv{layer}", scale)
            self.served[layer] = scale

    def after(self, layer: int, point: str, x: Tensor, y: Tensor, linear: nn.Linear) -> Tensor:
        if point == "qkv" and layer in self.served:
            return y * self.served[layer]  # (n, 3H)
        hits = self.modules_at[(layer, point)]
        if point != "qkv":
            key = hits[0][1]
            return y if self.feedforward[key] else y * self._l(key, y)  # (n, out)
        blocks = list(y.split(self.hidden, dim=1))  # query | key | value, each (n, H)
        for module, key in hits:
            block = MODULES[module][1]
            assert block is not None
            if self.feedforward[key]:  # linear(x * l) restricted to this block's rows of W and b
                cols = block_columns(module, self.hidden)
                bias = None if linear.bias is None else linear.bias[cols]
                blocks[block] = F.linear(x * self._l(key, x), linear.weight[cols], bias)  # (n, H)
            else:
                blocks[block] = blocks[block] * self._l(key, y)  # (n, H)
        return torch.cat(blocks, dim=1)  # (n, 3H)

    def body(self) -> dict[str, Tensor]:
        """The packed body tensors (detached CPU copies): ``encoder.layer.{i}.{module}.ia3_l``."""
        return {
            pw.body_name(layer, module, SUFFIX): self.ia3_l[key].detach().cpu().clone().contiguous()
            for key, (layer, module) in sorted(self.names.items(), key=lambda kv: kv[1])
        }

    @classmethod
    def init(cls, cfg: IA3Config, backbone_config: PretrainedConfig) -> IA3Adapter:
        """A fresh trainable IA3, initialised as PEFT does (ones; N(0, 1) with init_ia3_weights=False)."""
        config = cfg.to_config_dict()
        check_config(config)
        attr = pw.attr_of(backbone_config.model_type)
        hidden, inter = backbone_config.hidden_size, backbone_config.intermediate_size
        resolved, others = resolve(config, attr, backbone_config.num_hidden_layers)
        pw.require_targets(resolved, others)
        targets = {}
        for (layer, module), ff in resolved.items():
            shape = expected_shape(module, ff, hidden, inter)
            v = torch.ones(shape) if config["init_ia3_weights"] else torch.randn(shape)  # (out, 1) or (1, in)
            targets[(layer, module)] = (v, ff)
        return cls(config, targets, hidden)


def build(config: dict[str, Any], body: dict[str, Tensor]) -> IA3Adapter:
    """The IA3 module for a checked config + body (fp32 CPU copies)."""
    shape, ff = plan(config, body)
    targets = {(layer, module): (body[pw.body_name(layer, module, SUFFIX)], f) for (layer, module), f in ff.items()}
    return IA3Adapter(config, targets, shape.hidden).eval()

"""LoRA on the encoder's linear points: ``y + scale * (x @ A.T) @ B.T`` on the adapter's own rows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig

from .. import peft_weights as pw
from ..rowkinds import MODULES, PassThrough, as_float, block_columns, module_shape
from .config import KIND, SUFFIX_A, SUFFIX_B, LoraConfig, check_config, plan, scales


def _key(layer: int, module: str) -> str:
    return f"{layer}_{module.replace('.', '_')}"  # a ParameterDict key may not contain dots


@dataclass(frozen=True)
class ServedLora:
    """One point's LoRA in serving form (see :meth:`LoraAdapter.for_serving`); B has the scale folded in."""

    a: Tensor  # (R, in): the point's lora_A stacked
    b: Tensor  # (out, R); or (k, r, H) with ``index``
    index: Tensor | None = None  # (k,) the qkv blocks of the stacked B's

    def apply(self, x: Tensor, y: Tensor, hidden: int) -> Tensor:
        d = x @ self.a.T  # (n, R)
        if self.index is None:
            return y + d @ self.b.T  # (n, out)
        k, r, _ = self.b.shape
        delta = torch.bmm(d.view(-1, k, r).transpose(0, 1), self.b)  # (k, n, H)
        return y.view(-1, 3, hidden).index_add(1, self.index, delta.transpose(0, 1)).view(y.shape)  # (n, 3H)


class LoraAdapter(nn.Module, PassThrough):
    """One tenant's LoRA. ``targets``: (layer, module) -> (A (r, in), B (out, r), scale), PEFT's lora_A / lora_B."""

    kind = KIND

    def __init__(
        self, config: dict[str, Any], targets: dict[tuple[int, str], tuple[Tensor, Tensor, float]], hidden: int
    ):
        super().__init__()
        self.config = dict(config)
        self.hidden = hidden
        self.dropout = float(config.get("lora_dropout", 0.0))  # training only (self.training)
        self.lora_A = nn.ParameterDict(
            {_key(*t): nn.Parameter(a.detach().float().clone()) for t, (a, _, _) in targets.items()}
        )
        self.lora_B = nn.ParameterDict(
            {_key(*t): nn.Parameter(b.detach().float().clone()) for t, (_, b, _) in targets.items()}
        )
        self.scale = {_key(*t): s for t, (_, _, s) in targets.items()}
        self.modules_at: dict[tuple[int, str], list[tuple[str, str]]] = {}  # (layer, point) -> [(module, key)]
        for layer, module in sorted(targets):
            self.modules_at.setdefault((layer, MODULES[module][0]), []).append((module, _key(layer, module)))
        self.points = frozenset(self.modules_at)
        self.names = {_key(layer, module): (layer, module) for layer, module in targets}
        self.served: dict[tuple[int, str], ServedLora] | None = None  # see for_serving

    def _delta(self, key: str, x: Tensor) -> Tensor:
        a = as_float(self.lora_A[key], like=x)  # (r, in)
        b = as_float(self.lora_B[key], like=x)  # (out, r)
        if self.training and self.dropout > 0:
            x = F.dropout(x, self.dropout)  # (n, in)
        return (x @ a.T) @ b.T * self.scale[key]  # (n, r) -> (n, out)

    @torch.no_grad()
    def for_serving(self) -> None:
        """The engine's form (call after ``.to(device, dtype)``; the module can no longer train or export): the
        scale folded into B, and each point's modules in one stacked A, so a point costs one matmul for all its
        modules' ``x @ A.T`` and no split or concatenation of the fused qkv output:

        * one module at the point: ``y + (x @ A.T) @ B.T``;
        * several qkv blocks of one rank r (query + value): ``d = x @ [A_q; A_v].T`` (n, k*r), then one batched
          matmul with the stacked (k, r, H) B's, added into the blocks with ``index_add`` (no zero padding);
        * several blocks of different ranks (rank_pattern): one B (3H, R) with zeros outside each block.
        """
        served: dict[tuple[int, str], ServedLora] = {}
        for (layer, point), hits in self.modules_at.items():
            a = torch.cat([self.lora_A[key] for _, key in hits]).contiguous()  # (R, in)
            bs = [self.lora_B[key] * self.scale[key] for _, key in hits]  # each (out_module, r)
            blocks = [MODULES[module][1] for module, _ in hits]
            if len(hits) == 1 and point != "qkv":
                served[(layer, point)] = ServedLora(a, bs[0].contiguous())
            elif len({b.shape[1] for b in bs}) == 1 and None not in blocks:
                index = torch.tensor(blocks, dtype=torch.long, device=a.device)  # (k,) qkv blocks
                stacked = torch.stack([b.T for b in bs]).contiguous()  # (k, r, H)
                served[(layer, point)] = ServedLora(a, stacked, index)
            else:
                width = 3 * self.hidden if point == "qkv" else bs[0].shape[0]
                b = a.new_zeros(width, a.shape[0])  # (out, R)
                r0 = 0
                for (module, _), part in zip(hits, bs):
                    b[block_columns(module, self.hidden), r0 : r0 + part.shape[1]] = part
                    r0 += part.shape[1]
                served[(layer, point)] = ServedLora(a, b)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # the served tensors replace them
        for i, sv in enumerate(served.values()):
            self.register_buffer(f"served_a{i}", sv.a)
            self.register_buffer(f"served_b{i}", sv.b)
        self.served = served

    def after(self, layer: int, point: str, x: Tensor, y: Tensor, linear: nn.Linear) -> Tensor:
        if self.served is not None:
            return self.served[(layer, point)].apply(x, y, self.hidden)
        hits = self.modules_at[(layer, point)]
        if point != "qkv":
            return y + self._delta(hits[0][1], x)  # (n, out)
        blocks = list(y.split(self.hidden, dim=1))  # query | key | value, each (n, H)
        for module, key in hits:
            block = MODULES[module][1]
            assert block is not None
            blocks[block] = blocks[block] + self._delta(key, x)  # (n, H)
        return torch.cat(blocks, dim=1)  # (n, 3H)

    def body(self) -> dict[str, Tensor]:
        """The packed body tensors (detached CPU copies): ``encoder.layer.{i}.{module}.lora_{A,B}.weight``."""
        out: dict[str, Tensor] = {}
        for key, (layer, module) in sorted(self.names.items(), key=lambda kv: kv[1]):
            out[pw.body_name(layer, module, SUFFIX_A)] = self.lora_A[key].detach().cpu().clone().contiguous()
            out[pw.body_name(layer, module, SUFFIX_B)] = self.lora_B[key].detach().cpu().clone().contiguous()
        return out

    @classmethod
    def init(cls, cfg: LoraConfig, backbone_config: PretrainedConfig) -> LoraAdapter:
        """A fresh trainable LoRA, initialised as PEFT does (A kaiming-uniform(a=sqrt 5), B zeros)."""
        config = cfg.to_config_dict()
        check_config(config)
        attr = pw.attr_of(backbone_config.model_type)
        hidden, inter = backbone_config.hidden_size, backbone_config.intermediate_size
        resolved, others = scales(config, attr, backbone_config.num_hidden_layers)
        pw.require_targets(resolved, others)
        init = config["init_lora_weights"]
        if init not in (True, False, "gaussian"):
            raise pw.bad(
                f"init_lora_weights = {pw.short(init)}: use true, false or 'gaussian' to train", "unsupported_config"
            )
        targets = {}
        for (layer, module), (rank, scale) in resolved.items():
            fan_in, fan_out = module_shape(module, hidden, inter)
            a = torch.empty(rank, fan_in)  # (r, in)
            b = torch.empty(fan_out, rank)  # (out, r)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default, as PEFT's lora_A
            if init == "gaussian":
                nn.init.normal_(a, std=1 / rank)
            if init is False:  # PEFT keeps nn.Linear's default init for both: the update is not zero
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)
            targets[(layer, module)] = (a, b, scale)
        return cls(config, targets, hidden)


def build(config: dict[str, Any], body: dict[str, Tensor]) -> LoraAdapter:
    """The LoRA module for a checked config + body (fp32 CPU copies, eval mode: no dropout)."""
    shape, scale = plan(config, body)
    targets = {
        (layer, module): (body[pw.body_name(layer, module, SUFFIX_A)], body[pw.body_name(layer, module, SUFFIX_B)], s)
        for (layer, module), s in scale.items()
    }
    return LoraAdapter(config, targets, shape.hidden).eval()

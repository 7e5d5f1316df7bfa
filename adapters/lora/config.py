"""LoRA settings (PEFT's ``LoraConfig`` JSON keys) and the check of a packed LoRA config + body."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .. import peft_weights as pw
from ..errors import InvalidAdapterError
from ..rowkinds import BodyShape

PEFT_TYPE = "LORA"
KIND = "lora"
MAX_RANK = 64
SUFFIX_A, SUFFIX_B = "lora_A.weight", "lora_B.weight"
# init_lora_weights values that leave the backbone as it is (pissa/olora/corda/loftq/lora_ga rewrite its
# weights, so the adapter would only fit the rewritten backbone; "mica" is a forward variant)
SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal")
# fields that change what a LoRA layer computes (or where it goes): only their "off" value is served
OFF_FIELDS = (
    "use_dora",
    "fan_in_fan_out",
    "lora_bias",
    "trainable_token_indices",
    "layer_replication",
    "target_parameters",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "arrow_config",
    "monteclora_config",
    "velora_config",
    "kasa_config",
    "megatron_config",
    "loftq_config",
)
# fields with no effect on the inference math (training-time or bookkeeping), validated where they matter
FREE_FIELDS = (
    *pw.BOOKKEEPING_FIELDS,
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "init_lora_weights",
    "bias",
)


@dataclass
class LoraConfig:
    """LoRA settings, mirroring PEFT's ``LoraConfig`` (same JSON keys; the fields a BERT-family encoder uses)."""

    r: int = field(default=8, metadata={"help": f"Rank of every update (1..{MAX_RANK})."})
    lora_alpha: float = field(default=8, metadata={"help": "Scale numerator: alpha / r (alpha / sqrt(r) with rsLoRA)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the update's input (training only)."})
    target_modules: list[str] | str = field(
        default_factory=lambda: ["query", "value"],
        metadata={"help": "Module names (suffix match), full paths or a regex; PEFT's default for BERT/RoBERTa."},
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scale alpha / sqrt(r)."})
    rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Module regex -> rank override."})
    alpha_pattern: dict[str, float] = field(default_factory=dict, metadata={"help": "Module regex -> alpha override."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Only these layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name before the layer index."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never targeted."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra whole modules ('pooler' for a BERT without one); the head always."}
    )
    init_lora_weights: bool | str = field(
        default=True, metadata={"help": "True: A kaiming-uniform, B zeros; 'gaussian': A ~ N(0, 1/r); False: random B."}
    )
    base_model_name_or_path: str = field(default="", metadata={"help": "Recorded for PEFT."})

    def to_config_dict(self) -> dict[str, Any]:
        """The ``adapter_config`` PEFT writes and ``PeftModel.from_pretrained`` reads for this config."""
        saved = [*(self.modules_to_save or []), "classifier", "score"]
        return {
            "peft_type": PEFT_TYPE,
            "task_type": "SEQ_CLS",
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": list(self.target_modules)
            if isinstance(self.target_modules, list)
            else self.target_modules,
            "use_rslora": self.use_rslora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": list(dict.fromkeys(saved)),
            "init_lora_weights": self.init_lora_weights,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "inference_mode": True,
        }


def _number(value: object) -> bool:
    """A JSON number that is a finite float (a huge int would overflow the scale)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _rank(value: object, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise pw.bad(f"adapter_config.{where} must be a positive integer, got {pw.short(value)}", "bad_config")
    if value > MAX_RANK:
        raise pw.bad(f"adapter_config.{where} = {value}: LoRA rank is at most {MAX_RANK}", "rank_too_large")
    return value


def check_config(config: dict[str, Any]) -> None:
    """Every field of a LoRA ``adapter_config``: types, ranges, and no feature we do not serve."""
    pw.check_type(config, PEFT_TYPE)
    for name in OFF_FIELDS:
        if not pw.empty(config.get(name)):
            raise pw.bad(
                f"adapter_config.{name} = {pw.short(config[name])} is not supported; remove it", "unsupported_config"
            )
    for name, value in config.items():
        if name not in FREE_FIELDS and name not in OFF_FIELDS and not pw.empty(value):
            raise pw.bad(f"adapter_config.{pw.short(name, 40)} is not a LoRA field we support", "unsupported_config")
    if config.get("bias", "none") != "none":
        raise pw.bad(
            f"adapter_config.bias = {pw.short(config['bias'])} is not supported: use 'none'", "unsupported_config"
        )
    init = config.get("init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in SAFE_INITS):
        raise pw.bad(
            f"init_lora_weights = {pw.short(init)} is not supported (it rewrites the backbone)", "unsupported_config"
        )
    _rank(config.get("r", 8), "r")
    for key, value in pw.check_pattern_dict(config, "rank_pattern").items():
        _rank(value, f"rank_pattern[{pw.short(key, 40)}]")
    for key, value in pw.check_pattern_dict(config, "alpha_pattern").items():
        if not _number(value):
            raise pw.bad(f"adapter_config.alpha_pattern[{pw.short(key, 40)}] must be a number", "bad_config")
    if not _number(config.get("lora_alpha", 8)):
        raise pw.bad("adapter_config.lora_alpha must be a number", "bad_config")
    dropout = config.get("lora_dropout", 0.0)
    if not _number(dropout) or not 0 <= dropout < 1:
        raise pw.bad("adapter_config.lora_dropout must be a number in [0, 1)", "bad_config")
    if not isinstance(config.get("use_rslora", False), bool):
        raise pw.bad("adapter_config.use_rslora must be true or false", "bad_config")
    pw.check_names(config, "target_modules", required=True)
    pw.check_names(config, "exclude_modules")
    pw.check_layers(config)
    pw.check_modules_to_save(config)


Plan = dict[tuple[int, str], tuple[int, float]]  # (layer, module) -> (rank, scale)


def scales(config: dict[str, Any], attr: str, num_layers: int) -> tuple[Plan, list[str]]:
    """(layer, module) -> (rank, scale) as PEFT builds them on backbone attribute ``attr``; other matched names."""
    targets, others = pw.resolve(config, attr, num_layers)
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    out: Plan = {}
    for layer, module in targets:
        key = pw.layer_key(attr, layer, module)
        rank = pw.pattern_value(config.get("rank_pattern") or {}, key, r)
        a = pw.pattern_value(config.get("alpha_pattern") or {}, key, alpha)
        out[(layer, module)] = (rank, float(a) / (math.sqrt(rank) if config.get("use_rslora") else rank))
    return out, others


def plan(config: dict[str, Any], body: dict[str, Tensor]) -> tuple[BodyShape, dict[tuple[int, str], float]]:
    """Check a LoRA config + body; the body's shape needs and each (layer, module)'s scale.

    The backbone attribute (``bert.`` / ``roberta.``) is not in a packed file: a config is resolved for both,
    and the resolution that names exactly the body's modules, with its ranks, is used. Backbone-neutral configs
    (names like ``query``) resolve the same for both; if two resolutions fit but scale differently, we refuse.
    """
    if not isinstance(config, dict):
        raise pw.bad("adapter_config must be a JSON object", "bad_config")
    check_config(config)
    pairs: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, t in body.items():
        parsed = pw.parse_body(name, PEFT_TYPE)
        if parsed is None:
            raise pw.bad(f"unexpected tensor {pw.short(name)} in a LoRA adapter", "bad_tensors")
        layer, module, suffix = parsed
        if t.dim() != 2:
            raise pw.bad(f"{name} must be 2-D, got shape {tuple(t.shape)}", "shape_mismatch")
        pairs.setdefault((layer, module), {})[suffix] = t
    if not pairs:
        raise pw.bad("a LoRA adapter needs lora_A/lora_B tensors", "bad_tensors")
    for (layer, module), ab in pairs.items():
        for suffix in (SUFFIX_A, SUFFIX_B):
            if suffix not in ab:
                raise pw.bad(f"missing tensor {pw.body_name(layer, module, suffix)}", "bad_tensors")
    hidden, inter = _dims(pairs)
    num_layers = max(layer for layer, _ in pairs) + 1
    fits: dict[str, dict[tuple[int, str], float]] = {}
    errors: list[InvalidAdapterError] = []
    for attr in pw.ATTRS:
        try:
            fits[attr] = _fit(config, attr, pairs, num_layers)
        except InvalidAdapterError as e:
            errors.append(e)
    if not fits:
        raise pw.first_error(errors)
    found = list(fits.values())
    if any(f != found[0] for f in found[1:]):
        msg = "alpha_pattern scales differ on BERT and RoBERTa: write patterns without 'bert.'/'roberta.'"
        raise pw.bad(msg, "unsupported_config")
    return BodyShape(num_layers, hidden, inter), found[0]


def _fit(
    config: dict[str, Any], attr: str, pairs: dict[tuple[int, str], dict[str, Tensor]], num_layers: int
) -> dict[tuple[int, str], float]:
    """Each module's scale when the config, resolved on backbone attribute ``attr``, fits the body."""
    resolved, others = scales(config, attr, num_layers)
    pw.match_targets(set(resolved), set(pairs), others, SUFFIX_A)
    for (layer, module), (rank, _) in resolved.items():
        got = pairs[(layer, module)][SUFFIX_A].shape[0]
        if got != rank:
            raise pw.bad(f"encoder.layer.{layer}.{module} has rank {got}, the config says {rank}", "shape_mismatch")
    return {k: s for k, (_, s) in resolved.items()}


def _dims(pairs: dict[tuple[int, str], dict[str, Tensor]]) -> tuple[int, int]:
    """Hidden and intermediate widths all tensors agree on (intermediate 0 when no FFN module is targeted)."""
    hs: set[int] = set()
    inters: set[int] = set()
    for (layer, module), ab in pairs.items():
        a, b = ab[SUFFIX_A], ab[SUFFIX_B]  # (r, in), (out, r)
        if a.shape[0] != b.shape[1]:
            raise pw.bad(
                f"encoder.layer.{layer}.{module}: lora_A rank {a.shape[0]} != lora_B rank {b.shape[1]}",
                "shape_mismatch",
            )
        if a.shape[0] > MAX_RANK:
            raise pw.bad(f"encoder.layer.{layer}.{module}: rank {a.shape[0]} > {MAX_RANK}", "rank_too_large")
        fan_in, fan_out = a.shape[1], b.shape[0]
        if module == "intermediate.dense":
            hs.add(fan_in)
            inters.add(fan_out)
        elif module == "output.dense":
            inters.add(fan_in)
            hs.add(fan_out)
        else:
            hs.update((fan_in, fan_out))
    if len(hs) != 1 or len(inters) > 1:
        raise pw.bad(
            f"LoRA tensors disagree on the model widths (hidden {sorted(hs)}, ffn {sorted(inters)})", "shape_mismatch"
        )
    return hs.pop(), (inters.pop() if inters else 0)


def check(config: dict[str, Any], body: dict[str, Tensor]) -> BodyShape:
    """Validate a LoRA adapter_config and its body tensors (raises InvalidAdapterError with a specific code)."""
    return plan(config, body)[0]

"""IA3 settings (PEFT's ``IA3Config`` JSON keys) and the check of a packed IA3 config + body."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .. import peft_weights as pw
from ..errors import InvalidAdapterError
from ..rowkinds import BodyShape, module_shape

PEFT_TYPE = "IA3"
KIND = "ia3"
SUFFIX = "ia3_l"
FREE_FIELDS = (
    *pw.BOOKKEEPING_FIELDS,
    "target_modules",
    "feedforward_modules",
    "exclude_modules",
    "modules_to_save",
    "init_ia3_weights",
    "fan_in_fan_out",
)


@dataclass
class IA3Config:
    """IA3 settings, mirroring PEFT's ``IA3Config``; the defaults are PEFT's for BERT / RoBERTa."""

    target_modules: list[str] | str = field(
        default_factory=lambda: ["key", "value", "output.dense"],
        metadata={"help": "Scaled modules: names (suffix match), full paths or a regex."},
    )
    feedforward_modules: list[str] | str = field(
        default_factory=lambda: ["output.dense"],
        metadata={"help": "Targets whose INPUT is scaled (plain suffix match: 'output.dense' includes attention's)."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules never targeted."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra whole modules ('pooler' for a BERT without one); the head always."}
    )
    init_ia3_weights: bool = field(default=True, metadata={"help": "True: ones (identity); False: N(0, 1)."})
    base_model_name_or_path: str = field(default="", metadata={"help": "Recorded for PEFT."})

    def to_config_dict(self) -> dict[str, Any]:
        """The ``adapter_config`` PEFT writes and ``PeftModel.from_pretrained`` reads for this config."""
        saved = [*(self.modules_to_save or []), "classifier", "score"]
        names = (self.target_modules, self.feedforward_modules)
        target, ff = (list(n) if isinstance(n, list) else n for n in names)
        return {
            "peft_type": PEFT_TYPE,
            "task_type": "SEQ_CLS",
            "base_model_name_or_path": self.base_model_name_or_path,
            "target_modules": target,
            "feedforward_modules": ff,
            "exclude_modules": self.exclude_modules,
            "modules_to_save": list(dict.fromkeys(saved)),
            "init_ia3_weights": self.init_ia3_weights,
            "fan_in_fan_out": False,
            "inference_mode": True,
        }


def check_config(config: dict[str, Any]) -> None:
    """Every field of an IA3 ``adapter_config``: types, and no feature we do not serve."""
    pw.check_type(config, PEFT_TYPE)
    for name, value in config.items():
        if name not in FREE_FIELDS and not pw.empty(value):
            raise pw.bad(f"adapter_config.{pw.short(name, 40)} is not an IA3 field we support", "unsupported_config")
    if config.get("fan_in_fan_out"):
        raise pw.bad(
            "adapter_config.fan_in_fan_out is not supported (BERT's layers are nn.Linear)", "unsupported_config"
        )
    if not isinstance(config.get("init_ia3_weights", True), bool):
        raise pw.bad("adapter_config.init_ia3_weights must be true or false", "bad_config")
    pw.check_names(config, "target_modules", required=True)
    pw.check_names(config, "feedforward_modules", required=True)
    pw.check_names(config, "exclude_modules")
    pw.check_modules_to_save(config)
    target, ff = config["target_modules"], config["feedforward_modules"]
    if isinstance(target, list) and isinstance(ff, list) and not set(ff) <= set(target):
        raise pw.bad("feedforward_modules must be a subset of target_modules (as PEFT requires)", "bad_config")


def resolve(config: dict[str, Any], attr: str, num_layers: int) -> tuple[dict[tuple[int, str], bool], list[str]]:
    """(layer, module) -> is feed-forward, as PEFT builds it on backbone attribute ``attr``; other matched names."""
    targets, others = pw.resolve(config, attr, num_layers)
    return {t: pw.is_feedforward(config, pw.layer_key(attr, *t)) for t in targets}, others


def expected_shape(module: str, feedforward: bool, hidden: int, inter: int) -> tuple[int, int]:
    """PEFT's ``ia3_l`` shape: (1, in) scales a feed-forward module's input, (out, 1) any other's output."""
    fan_in, fan_out = module_shape(module, hidden, inter)
    return (1, fan_in) if feedforward else (fan_out, 1)


def plan(config: dict[str, Any], body: dict[str, Tensor]) -> tuple[BodyShape, dict[tuple[int, str], bool]]:
    """Check an IA3 config + body; the body's shape needs and which (layer, module) scales its input.

    As for LoRA, the config is resolved for both backbone attributes; the resolution whose modules and vector
    orientations fit the body is used (the orientation tells feed-forward apart, so at most one can fit
    differently)."""
    if not isinstance(config, dict):
        raise pw.bad("adapter_config must be a JSON object", "bad_config")
    check_config(config)
    vectors: dict[tuple[int, str], Tensor] = {}
    for name, t in body.items():
        parsed = pw.parse_body(name, PEFT_TYPE)
        if parsed is None:
            raise pw.bad(f"unexpected tensor {pw.short(name)} in an IA3 adapter", "bad_tensors")
        if t.dim() != 2 or 1 not in t.shape:
            raise pw.bad(f"{name} must be (out, 1) or (1, in), got {tuple(t.shape)}", "shape_mismatch")
        vectors[parsed[:2]] = t
    if not vectors:
        raise pw.bad("an IA3 adapter needs ia3_l tensors", "bad_tensors")
    num_layers = max(layer for layer, _ in vectors) + 1
    errors: list[InvalidAdapterError] = []
    for attr in pw.ATTRS:
        resolved, others = resolve(config, attr, num_layers)
        try:
            pw.match_targets(set(resolved), set(vectors), others, SUFFIX)
            hidden, inter = _dims(vectors, resolved)
        except InvalidAdapterError as e:
            errors.append(e)
            continue
        return BodyShape(num_layers, hidden, inter), resolved
    raise pw.first_error(errors)


def _dims(vectors: dict[tuple[int, str], Tensor], ff: dict[tuple[int, str], bool]) -> tuple[int, int]:
    hs: set[int] = set()
    inters: set[int] = set()
    for (layer, module), t in vectors.items():
        feedforward = ff[(layer, module)]
        if feedforward != (t.shape[0] == 1 and t.shape[1] != 1):
            want = "(1, in): feed-forward" if feedforward else "(out, 1)"
            raise pw.bad(f"encoder.layer.{layer}.{module}.ia3_l is {tuple(t.shape)}, expected {want}", "shape_mismatch")
        width = t.shape[1] if feedforward else t.shape[0]  # the module's in (feed-forward) or out features
        ffn_side = "output.dense" if feedforward else "intermediate.dense"  # where that width is the FFN's
        (inters if module == ffn_side else hs).add(width)
    if len(hs) > 1 or len(inters) > 1:
        raise pw.bad(
            f"IA3 vectors disagree on the model widths (hidden {sorted(hs)}, ffn {sorted(inters)})", "shape_mismatch"
        )
    return (hs.pop() if hs else 0), (inters.pop() if inters else 0)


def check(config: dict[str, Any], body: dict[str, Tensor]) -> BodyShape:
    """Validate an IA3 adapter_config and its body tensors (raises InvalidAdapterError with a specific code)."""
    return plan(config, body)[0]

"""PEFT's names for the weight-adapter kinds (LoRA, IA3): which encoder modules a config targets, and the
tensor names of a PEFT folder <-> our packed names.

PEFT matches a config against every module name of the whole ``*ForSequenceClassification`` model
(``bert.encoder.layer.0.attention.self.query``, ``roberta.…``, ``classifier``, ...). :func:`resolve` applies
the same rules (peft 0.21: ``tuners_utils.check_target_module_exists``, ``utils.other.get_pattern_key``, IA3's
``_check_target_module_feedforward``) to the names of a BERT / RoBERTa classifier, without importing PEFT
(a server need not install it). Only the six linear modules of :data:`.rowkinds.MODULES` can be served: any
other match (embeddings, pooler, LayerNorm, a container) is an ``unsupported_target``.

Folder names (verified against ``save_pretrained`` of peft 0.21.2, task_type SEQ_CLS)::

    base_model.model.{bert|roberta}.encoder.layer.{i}.{module}.lora_A.weight   (r, in)
    base_model.model.{bert|roberta}.encoder.layer.{i}.{module}.lora_B.weight   (out, r)
    base_model.model.{bert|roberta}.encoder.layer.{i}.{module}.ia3_l           (out, 1) or (1, in) feed-forward
    base_model.model.classifier.*                                              the head (modules_to_save)
    base_model.model.bert.pooler.dense.{weight,bias}                           modules_to_save=["pooler"]

Packed names drop ``base_model.model.{attr}.`` from the body (``encoder.layer.{i}.…``, backbone-neutral) and
use the prompt-learning head names of :mod:`.heads` (``base_model.classifier.*``, ``base_model.bert.pooler.*``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from .errors import InvalidAdapterError
from .heads import BERT_KEYS, PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX, ROBERTA_KEYS, ROBERTA_LIKE
from .rowkinds import MODULES

ATTRS = ("bert", "roberta")  # the backbone attribute of BertFor… / RobertaFor… (XLM-R, CamemBERT: roberta)
MAX_LAYERS = 256  # a layer index beyond this in a tensor name is refused (bounds the names we match)
MAX_ITEMS = 1024  # list / dict fields of a config
MAX_CHARS = 512  # one module name or pattern
SUFFIXES = {"LORA": ("lora_A.weight", "lora_B.weight"), "IA3": ("ia3_l",)}
_MODULE_RE = "|".join(re.escape(m) for m in MODULES)
BODY_RE = re.compile(rf"encoder\.layer\.(0|[1-9][0-9]{{0,3}})\.({_MODULE_RE})\.(lora_A\.weight|lora_B\.weight|ia3_l)")
PEFT_BODY_PREFIX = "base_model.model."
# Names under one encoder layer / around the encoder, as transformers 5 builds them (containers included:
# PEFT matches those too, then refuses them)
_LAYER_NAMES = (
    "",
    "attention",
    "attention.self",
    *(f"attention.self.{n}" for n in ("query", "key", "value", "dropout")),
    "attention.output",
    *(f"attention.output.{n}" for n in ("dense", "LayerNorm", "dropout")),
    "intermediate",
    "intermediate.dense",
    "intermediate.intermediate_act_fn",
    "output",
    *(f"output.{n}" for n in ("dense", "LayerNorm", "dropout")),
)
_EMBED_NAMES = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm", "dropout")
_HEAD_NAMES = {
    "bert": ("bert.pooler", "bert.pooler.dense", "bert.pooler.activation", "dropout", "classifier"),
    "roberta": ("classifier", "classifier.dense", "classifier.dropout", "classifier.out_proj"),
}
_LINEAR_OUTSIDE = {"bert": ("bert.pooler.dense",), "roberta": ("classifier.dense", "classifier.out_proj")}


# adapter_config fields that never change the math (bookkeeping PEFT writes for every type)
BOOKKEEPING_FIELDS = (
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "auto_mapping",
    "inference_mode",
)


def check_type(config: Mapping[str, Any], peft_type: str) -> None:
    """The config is a SEQ_CLS adapter of ``peft_type``."""
    if config.get("peft_type") != peft_type:
        raise bad(f"peft_type must be {peft_type!r}, got {short(config.get('peft_type'))}", "bad_config")
    if config.get("task_type") != "SEQ_CLS":
        raise bad(f"task_type {short(config.get('task_type'))} is not supported: SEQ_CLS only", "unsupported_config")


def require_targets(resolved: Mapping[tuple[int, str], Any], others: list[str]) -> None:
    """A fresh adapter's targets: some of the encoder's linear modules, and nothing else."""
    if others:
        raise bad(f"target_modules also matches {short(others[0], 60)}: not supported", "unsupported_target")
    if not resolved:
        raise bad("target_modules matches none of the encoder's linear modules", "unsupported_target")


def bad(message: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(message, code=code)


def short(value: object, n: int = 80) -> str:
    """A client value for a message, never longer than ~n characters."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def attr_of(model_type: str) -> str:
    """The backbone attribute PEFT's module names start with for this ``config.model_type``."""
    return "roberta" if model_type in ROBERTA_LIKE else "bert"


def module_names(attr: str, num_layers: int) -> list[str]:
    """Every non-root module name of a ``{Bert|Roberta}ForSequenceClassification`` (PEFT's match candidates)."""
    names = [attr, f"{attr}.embeddings", *(f"{attr}.embeddings.{n}" for n in _EMBED_NAMES)]
    names += [f"{attr}.encoder", f"{attr}.encoder.layer"]
    for i in range(num_layers):
        names += [f"{attr}.encoder.layer.{i}" + (f".{n}" if n else "") for n in _LAYER_NAMES]
    return names + list(_HEAD_NAMES[attr])


def layer_key(attr: str, layer: int, module: str) -> str:
    return f"{attr}.encoder.layer.{layer}.{module}"


# ---- config fields ---------------------------------------------------------------------------------
def check_names(config: Mapping[str, Any], field: str, *, required: bool = False, regex: bool = True) -> None:
    """``field`` is None, a regex string, or a list of module names (PEFT's ``target_modules`` forms)."""
    value = config.get(field)
    if value is None:
        if required:
            raise bad(f"adapter_config.{field} is required (a list of module names or a regex)", "bad_config")
        return
    if isinstance(value, str):
        if not regex:
            raise bad(f"adapter_config.{field} must be a list of names", "bad_config")
        _compile(value, field)
        return
    if not isinstance(value, list) or len(value) > MAX_ITEMS:
        raise bad(f"adapter_config.{field} must be a list of module names or a regex string", "bad_config")
    for name in value:
        if not isinstance(name, str) or not name or len(name) > MAX_CHARS:
            raise bad(f"adapter_config.{field} has a bad entry {short(name)}", "bad_config")


def check_layers(config: Mapping[str, Any]) -> None:
    """``layers_to_transform`` (int or list of ints) and ``layers_pattern`` (str or list of str), as PEFT."""
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = layers if isinstance(layers, list) else [layers]
        if len(items) > MAX_ITEMS or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise bad("adapter_config.layers_to_transform must be an int or a list of ints", "bad_config")
    pattern = config.get("layers_pattern")
    if pattern is not None:
        items = pattern if isinstance(pattern, list) else [pattern]
        if not all(isinstance(p, str) for p in items) or len(items) > MAX_ITEMS:
            raise bad("adapter_config.layers_pattern must be a string or a list of strings", "bad_config")
        for p in items:
            _compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", "layers_pattern")  # as _layer_index uses it
        if layers is None and pattern:
            raise bad("adapter_config.layers_pattern needs layers_to_transform (PEFT refuses it alone)", "bad_config")
    if isinstance(config.get("target_modules"), str) and (layers is not None or pattern is not None):
        raise bad("layers_to_transform/layers_pattern cannot be used with a regex target_modules", "bad_config")


def check_modules_to_save(config: Mapping[str, Any]) -> None:
    """Only the head (and BERT's pooler) may be saved whole: anything else would change the backbone."""
    value = config.get("modules_to_save")
    if value is None:
        return
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise bad("adapter_config.modules_to_save must be a list of module names", "bad_config")
    extra = [m for m in value if m not in ("classifier", "score", "pooler")]
    if extra:
        raise bad(f"modules_to_save {short(extra)} is not supported: only classifier, pooler", "unsupported_config")


def check_pattern_dict(config: Mapping[str, Any], field: str) -> dict[str, Any]:
    value = config.get(field) or {}
    if not isinstance(value, dict) or len(value) > MAX_ITEMS:
        raise bad(f"adapter_config.{field} must be an object of pattern -> value", "bad_config")
    for key in value:
        _compile(rf"(.*\.)?({key})$", field)  # as pattern_value uses it
    return value


def _compile(pattern: str, field: str) -> re.Pattern[str]:
    if len(pattern) > MAX_CHARS + 40:
        raise bad(f"adapter_config.{field}: a pattern longer than {MAX_CHARS} characters", "bad_config")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise bad(f"adapter_config.{field}: bad regex {short(pattern)} ({e})", "bad_config") from None


# ---- PEFT's matching rules ---------------------------------------------------------------------------
def _excluded(config: Mapping[str, Any], key: str) -> bool:
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return True
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return True
    # PEFT never puts an adapter on a module it saves whole (SEQ_CLS adds classifier and score)
    saved = list(config.get("modules_to_save") or [])
    if config.get("task_type") == "SEQ_CLS":
        saved += ["classifier", "score"]
    return any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in saved)


def _layer_index(config: Mapping[str, Any], key: str) -> int | None:
    pattern = config.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def matches_target(config: Mapping[str, Any], key: str, linear: Iterable[str] = ()) -> bool:
    """PEFT's ``check_target_module_exists`` (``linear``: the names ``"all-linear"`` stands for)."""
    if _excluded(config, key):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        if targets.lower() == "all-linear":
            return key in linear
        return re.fullmatch(targets, key) is not None
    targets = targets or []
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(config, key)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: Mapping[str, Any], key: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first pattern matching a suffix of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return patterns[pattern]
    return default


def is_feedforward(config: Mapping[str, Any], key: str) -> bool:
    """IA3's feed-forward test: a regex fullmatch, or a plain suffix (no dot: ``output.dense`` also matches
    ``attention.output.dense``, exactly as PEFT does)."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, key) is not None
    return any(key.endswith(t) for t in ff)


def resolve(config: Mapping[str, Any], attr: str, num_layers: int) -> tuple[list[tuple[int, str]], list[str]]:
    """The (layer, module) targets among the six modules, and every other module name the config matches."""
    linear = {layer_key(attr, i, m) for i in range(num_layers) for m in MODULES} | set(_LINEAR_OUTSIDE[attr])
    six = {layer_key(attr, i, m): (i, m) for i in range(num_layers) for m in MODULES}
    targets: list[tuple[int, str]] = []
    others: list[str] = []
    for key in module_names(attr, num_layers):
        if matches_target(config, key, linear):
            if key in six:
                targets.append(six[key])
            else:
                others.append(key)
    return targets, others


def match_targets(
    resolved: set[tuple[int, str]], present: set[tuple[int, str]], others: list[str], suffix: str
) -> None:
    """The modules a config resolves to are exactly those with tensors, all among the six we serve."""
    if others:
        raise bad(
            f"target_modules matches {short(others[0], 60)}: only encoder {', '.join(MODULES)}", "unsupported_target"
        )
    if not resolved:
        raise bad("target_modules matches none of the encoder's linear modules", "unsupported_target")
    for side, names in (("missing", resolved - present), ("unexpected", present - resolved)):
        if names:
            raise bad(f"{side} tensor {body_name(*min(names), suffix)} (see target_modules)", "bad_tensors")


def first_error(errors: list[InvalidAdapterError]) -> InvalidAdapterError:
    """Of the errors for each backbone attribute, the most specific (a missing tensor says least)."""
    return next((e for e in errors if e.code != "bad_tensors"), errors[0])


# ---- body names ---------------------------------------------------------------------------------------
def parse_body(name: str, peft_type: str) -> tuple[int, str, str] | None:
    """``encoder.layer.{i}.{module}.{suffix}`` -> (i, module, suffix), or None for any other name."""
    match = BODY_RE.fullmatch(name)
    if match is None or match.group(3) not in SUFFIXES[peft_type] or int(match.group(1)) >= MAX_LAYERS:
        return None
    return int(match.group(1)), match.group(2), match.group(3)


def body_name(layer: int, module: str, suffix: str) -> str:
    return f"encoder.layer.{layer}.{module}.{suffix}"


def _peft_type(config: Mapping[str, Any]) -> str:
    peft_type = config.get("peft_type")
    if peft_type not in SUFFIXES:
        raise bad(f"peft_type {short(peft_type)} is not a weight adapter (LORA, IA3)", "bad_config")
    return str(peft_type)


def from_peft(config: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A PEFT folder's ``adapter_model.safetensors`` names -> packed names (tensors are not copied)."""
    peft_type = _peft_type(config)
    out: dict[str, Tensor] = {}
    attrs: set[str] = set()
    for key, value in tensors.items():
        head = key.removeprefix(PEFT_BODY_PREFIX + "classifier.")
        if head != key and head in ROBERTA_KEYS + BERT_KEYS:
            out[PEFT_HEAD_PREFIX + head] = value
            continue
        pooler = key.removeprefix(PEFT_BODY_PREFIX + "bert.pooler.dense.")
        if pooler != key and pooler in BERT_KEYS:
            out[PEFT_POOLER_PREFIX + pooler] = value
            continue
        attr, _, rest = key.removeprefix(PEFT_BODY_PREFIX).partition(".")
        if key.startswith(PEFT_BODY_PREFIX) and attr in ATTRS and parse_body(rest, peft_type) is not None:
            attrs.add(attr)
            out[rest] = value
        elif any(part.startswith(("lora_", "ia3_")) for part in key.split(".")):
            raise bad(
                f"adapter tensor {short(key)}: only encoder {', '.join(MODULES)} are served", "unsupported_target"
            )
        else:
            raise bad(f"unexpected tensor {short(key)} in a {peft_type} adapter", "bad_tensors")
    if len(attrs) > 1:
        raise bad("adapter tensors name both a bert and a roberta backbone", "bad_tensors")
    return out


def to_peft(config: Mapping[str, Any], tensors: Mapping[str, Tensor], head_style: str) -> dict[str, Tensor]:
    """Packed names -> the names ``PeftModel.from_pretrained`` loads (``head_style`` picks the backbone attribute)."""
    peft_type = _peft_type(config)
    if head_style not in ATTRS:
        raise ValueError(f"head_style must be 'roberta' or 'bert', got {head_style!r}")
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if parse_body(key, peft_type) is not None:
            out[f"{PEFT_BODY_PREFIX}{head_style}.{key}"] = value
        elif key.startswith(PEFT_HEAD_PREFIX):
            out[PEFT_BODY_PREFIX + "classifier." + key[len(PEFT_HEAD_PREFIX) :]] = value
        elif key.startswith(PEFT_POOLER_PREFIX) and head_style == "bert":
            out[PEFT_BODY_PREFIX + "bert.pooler.dense." + key[len(PEFT_POOLER_PREFIX) :]] = value
        else:
            raise bad(f"unexpected tensor {short(key)} in a packed {peft_type} adapter", "bad_tensors")
    return out


def empty(value: object) -> bool:
    """A config value that asks for nothing (unknown keys with these values are harmless)."""
    return value is None or value is False or value == {} or value == [] or value == ""


__all__ = [
    "ATTRS",
    "MAX_LAYERS",
    "attr_of",
    "bad",
    "body_name",
    "check_layers",
    "check_modules_to_save",
    "check_names",
    "check_pattern_dict",
    "empty",
    "first_error",
    "from_peft",
    "is_feedforward",
    "match_targets",
    "matches_target",
    "module_names",
    "parse_body",
    "pattern_value",
    "resolve",
    "short",
    "to_peft",
]

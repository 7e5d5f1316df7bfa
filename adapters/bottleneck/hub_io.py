"""AdapterHub folders <-> packed (config dict, tensors), for bottleneck adapters with a classification head.

What ``model.save_adapter(dir, name, with_head=True, use_safetensors=True)`` writes (adapter-hub/adapters
@ 88f18ebd; ``src/adapters/utils.py`` L45-50 file names, ``loading.py`` ``AdapterLoader.save`` /
``PredictionHeadLoader.save`` / ``WeightsLoaderHelper.save_weights_config`` (json, indent 2, sorted keys),
``configuration/model_adapters_config.py`` ``build_full_config``)::

    adapter_config.json     {"config": BnConfig.to_dict(), "hidden_size", "model_class", "model_name",
                             "model_type", "name", "version": "adapters.<v>"}
    adapter.safetensors     the model's state-dict entries holding ".adapters.{name}.", e.g.
                            bert.encoder.layer.{i}.attention.output.adapters.{name}.adapter_down.0.weight
                            (``adapter_down`` is ``Sequential(Linear, act)``: its Linear is ``.0``; RoBERTa /
                            XLM-R models prefix ``roberta.``; a plain ``adapters.init`` model no prefix)
    head_config.json        the same envelope, "config": the head's config (head_type, num_labels, layers,
                            activation_function, label2id, use_pooler, bias, dropout_prob)
    model_head.safetensors  heads.{name}.{index}.weight/bias: ``PredictionHead`` is a Sequential of
                            [Dropout, Linear, act]*(layers-1) + [Dropout, Linear] (``heads/base.py`` build), so a
                            2-layer head has Linears 1 and 4 (``head_utils.py`` maps RobertaForSequenceClassification's
                            classifier.dense / out_proj to exactly those), a 1-layer head Linear 1.

Heads we serve: 2 layers, tanh, no pooler (= RoBERTa's classifier: ``dense`` / ``out_proj``) and 1 layer on
the pooler (= BERT's: ``classifier`` on ``bert.pooler``); anything else is ``bad_head``. A static-head model's
head (``head_config["config"] is None``: ``classifier.*`` keys) is read the same way.
Only safetensors are read: a folder with only ``pytorch_adapter.bin`` / ``pytorch_model_head.bin`` is refused
(``pickle_refused``); nothing is ever unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import InvalidAdapterError
from ..heads import PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX, carries_pooler, head_style, split_head
from .config import PEFT_TYPE, BottleneckConfig, _q
from .model import _KEY, check

CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME = "adapter_config.json", "adapter.safetensors", "pytorch_adapter.bin"
HEAD_CONFIG_NAME, HEAD_WEIGHTS_NAME = "head_config.json", "model_head.safetensors"
HEAD_PICKLE_NAME = "pytorch_model_head.bin"
VERSION = "adapters.1.2.0"  # a "version" must be present: without one AdapterHub renames gelu -> gelu_new
PRESETS = {"pfeiffer": "pfeiffer", "seq_bn": "pfeiffer", "houlsby": "houlsby", "double_seq_bn": "houlsby"}
ACTIVATION_RENAME = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # utils.py: applied to configs without "version"
LEGACY_BLOCKS = (  # AdapterLoader.legacy_weights_mapping (loading.py): old block names -> "adapters"
    "attention_text_task_adapters",
    "attention_text_lang_adapters",
    "layer_text_task_adapters",
    "layer_text_lang_adapters",
)
OURS = {"peft_type", "task_type", "architecture"}  # packed-config keys that are not BnConfig fields
# our head name (stripped) <- AdapterHub flex-head index, per style
HUB_HEAD = {
    "roberta": {"dense": 1, "out_proj": 4},
    "bert": {"": 1},
}
PARAMS = ("weight", "bias")
MODELS = {  # model_type -> (state-dict prefix, AdapterHub flex model class)
    "bert": ("bert", "BertAdapterModel"),
    "roberta": ("roberta", "RobertaAdapterModel"),
    "xlm-roberta": ("roberta", "XLMRobertaAdapterModel"),
}


def _bad(msg: str, code: str) -> InvalidAdapterError:
    return InvalidAdapterError(msg, code=code)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"{path.name} is unreadable or not JSON ({type(exc).__name__})", "bad_config") from None
    if not isinstance(data, dict):
        raise _bad(f"{path.name} must be a JSON object", "bad_config")
    return data


def _tensors(folder: Path, safe: str, pickled: str) -> dict[str, Tensor]:
    if not (folder / safe).is_file():
        if (folder / pickled).is_file():
            raise _bad(
                f"{pickled} is a pickle and is never loaded; re-save with use_safetensors=True", "pickle_refused"
            )
        raise _bad(f"{safe} is missing from the AdapterHub folder", "bad_tensors")
    try:
        return load_file(str(folder / safe), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _bad(f"{safe} is not a readable safetensors file ({type(exc).__name__})", "bad_tensors") from None


def _name(meta: Mapping[str, Any], file: str) -> str:
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise _bad(f"{file} needs the adapter 'name'", "bad_config")
    return name


def from_hub_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """An AdapterHub ``save_adapter`` folder -> (packed adapter_config, packed tensors: body + head)."""
    folder = Path(folder)
    meta = _json(folder / CONFIG_NAME)
    name = _name(meta, CONFIG_NAME)
    raw = meta.get("config")
    if isinstance(raw, str) and raw.lower() in PRESETS:  # an ADAPTER_CONFIG_MAP identifier
        hub = getattr(BottleneckConfig, PRESETS[raw.lower()])().to_adapterhub_dict()
    elif isinstance(raw, dict):
        hub = dict(raw)
    else:
        raise _bad(f"adapter_config.json 'config' must be a bottleneck config, got {_q(raw)}", "bad_config")
    if "version" not in meta and hub.get("non_linearity") in ACTIVATION_RENAME:  # load_weights_config
        hub["non_linearity"] = ACTIVATION_RENAME[hub["non_linearity"]]
    config = hub | {"peft_type": PEFT_TYPE, "task_type": "SEQ_CLS"}
    BottleneckConfig.from_config_dict(config)  # refuse what we cannot serve before reading tensors

    body: dict[str, Tensor] = {}
    pattern = re.compile(
        r"(?:(?:bert|roberta)\.)?(encoder\.layer\.\d+\.(?:attention\.output|output))\.adapters\."
        + re.escape(name)
        + r"\.(adapter_down\.0|adapter_up)\.(weight|bias)"
    )
    for k, v in _tensors(folder, WEIGHTS_NAME, PICKLE_NAME).items():
        for old in LEGACY_BLOCKS:  # AdapterLoader._rename_legacy_weights
            k = k.replace(old, "adapters")
        m = pattern.fullmatch(k)
        if m is None:
            code = "unsupported_config" if f".adapters.{name}." in k else "bad_tensors"
            raise _bad(f"unexpected AdapterHub tensor {_q(k)}", code)
        ours = f"{m[1]}.{m[2].removesuffix('.0')}.{m[3]}"
        if ours in body:
            raise _bad(f"two AdapterHub tensors map to {_q(ours)}", "bad_tensors")
        body[ours] = v
    check(config, body)  # names, layers and shapes against the config
    tensors = dict(body)
    if (folder / HEAD_CONFIG_NAME).is_file() or (folder / HEAD_PICKLE_NAME).is_file():
        tensors |= _read_head(folder)
    return config, tensors


def _read_head(folder: Path) -> dict[str, Tensor]:
    meta = _json(folder / HEAD_CONFIG_NAME)
    hc = meta.get("config")
    weights = _tensors(folder, HEAD_WEIGHTS_NAME, HEAD_PICKLE_NAME)
    if hc is None:  # a static-head model: transformers' own classifier names
        own = {k.removeprefix("classifier."): v for k, v in weights.items() if k.startswith("classifier.")}
        if len(own) != len(weights):
            raise _bad(f"unknown static head tensors: {_q(sorted(weights))}", "bad_head")
    else:
        if not isinstance(hc, dict) or hc.get("head_type") != "classification":
            got = hc.get("head_type") if isinstance(hc, dict) else hc
            raise _bad(f"only a 'classification' head can be served, got {_q(got)}", "bad_head")
        layers, act, pooler = hc.get("layers"), hc.get("activation_function"), hc.get("use_pooler", False)
        if hc.get("bias", True) is not True:
            raise _bad("a classification head without bias cannot be served", "bad_head")
        if layers == 2 and act == "tanh" and pooler is False:
            style = "roberta"
        elif layers == 1 and pooler is True:
            style = "bert"
        else:
            raise _bad(
                f"head layers={_q(layers)} activation={_q(act)} use_pooler={_q(pooler)}: only 2 layers + tanh "
                "(RoBERTa's classifier) or 1 layer on the pooler (BERT's) can be served",
                "bad_head",
            )
        prefix = f"heads.{_name(meta, HEAD_CONFIG_NAME)}."
        want = {  # AdapterHub key -> our stripped head key
            f"{prefix}{i}.{p}": (f"{ours}.{p}" if ours else p) for ours, i in HUB_HEAD[style].items() for p in PARAMS
        }
        if set(weights) != set(want):
            raise _bad(f"head tensors {_q(sorted(weights))} do not match a {layers}-layer head", "bad_head")
        own = {want[k]: v for k, v in weights.items()}
    try:
        head_style(own)
    except KeyError:
        raise _bad(f"unknown classification head layout: {_q(sorted(own))}", "bad_head") from None
    return {PEFT_HEAD_PREFIX + k: v for k, v in own.items()}


def hub_labels(folder: str | Path) -> list[str] | None:
    """Label names in id order from ``head_config.json``'s ``label2id`` (None when absent)."""
    path = Path(folder) / HEAD_CONFIG_NAME
    if not path.is_file():
        return None
    meta = _json(path)
    hc = meta.get("config")
    label2id = hc.get("label2id") if isinstance(hc, dict) else meta.get("label2id")
    if not isinstance(label2id, dict) or not label2id:
        return None
    ids = list(label2id.values())
    if not all(isinstance(i, int) for i in ids) or sorted(ids) != list(range(len(ids))):
        raise _bad("label2id ids must be 0..n-1", "bad_labels")
    return [k for k, _ in sorted(label2id.items(), key=lambda kv: kv[1])]


def to_hub_folder(
    config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    folder: str | Path,
    head_style: str,
    *,
    name: str = "adapter",
    model_type: str | None = None,
    model_name: str | None = None,
    labels: list[str] | None = None,
) -> Path:
    """Write what AdapterHub's ``save_adapter(folder, name, with_head=True, use_safetensors=True)`` writes.

    ``head_style`` ("bert" | "roberta") picks the model (``bert.`` / ``roberta.`` keys) unless ``model_type``
    is given; the head's tensors must have that style. A bert head carrying its own pooler has no AdapterHub
    layout (AdapterHub's pooler belongs to the base model): ``bad_head``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"adapter name must be 1-64 of [A-Za-z0-9_-], got {name!r}")
    cfg = BottleneckConfig.from_config_dict(config)
    mt = model_type or head_style
    if mt not in MODELS or head_style not in HUB_HEAD:
        raise ValueError(f"model_type {mt!r} / head_style {head_style!r} not one of {sorted(MODELS)}")
    prefix, model_class = MODELS[mt]
    head = split_head(dict(tensors))
    body = {k: v for k, v in tensors.items() if _KEY.fullmatch(k)}
    rest = set(tensors) - set(body) - {k for k in tensors if k.startswith((PEFT_HEAD_PREFIX, PEFT_POOLER_PREFIX))}
    if rest:
        raise _bad(f"unexpected tensor {_q(sorted(rest)[0])}", "bad_tensors")
    if not body:
        raise _bad("no bottleneck tensors to write", "bad_tensors")
    hidden = int(next(v for k, v in body.items() if k.endswith("adapter_up.weight")).shape[0])

    hub_cfg = {k: v for k, v in config.items() if k not in OURS}
    hub_cfg["scaling"] = float(cfg.scaling)  # AdapterHub's Adapter refuses an int scaling
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    envelope = {"hidden_size": hidden, "model_class": model_class, "model_name": model_name, "model_type": mt}
    envelope |= {"name": name, "version": VERSION}
    _write_json(folder / CONFIG_NAME, envelope | {"config": hub_cfg})
    hub: dict[str, Tensor] = {}
    for k, v in body.items():
        m = _KEY.fullmatch(k)
        assert m is not None
        part = m[3].replace("adapter_down.", "adapter_down.0.")
        hub[f"{prefix}.encoder.layer.{m[1]}.{m[2]}.adapters.{name}.{part}"] = v.detach().contiguous()
    save_file(hub, str(folder / WEIGHTS_NAME))
    if head:
        _write_head(folder, head, head_style, envelope, name, labels)
    return folder


def _write_head(
    folder: Path, head: dict[str, Tensor], style: str, envelope: dict[str, Any], name: str, labels: list[str] | None
) -> None:
    try:
        actual = head_style(head)
    except KeyError:
        raise _bad(f"unknown classification head layout: {_q(sorted(head))}", "bad_head") from None
    if actual != style:
        raise _bad(f"the head is {actual}-style, not {style}", "bad_head")
    if carries_pooler(head):
        raise _bad("a head with its own pooler has no AdapterHub layout (the pooler is the base model's)", "bad_head")
    out = head["out_proj.weight" if style == "roberta" else "weight"]  # (C, H)
    num_labels = int(out.shape[0])
    hc = {
        "head_type": "classification",
        "num_labels": num_labels,
        "layers": 2 if style == "roberta" else 1,
        "activation_function": "tanh" if style == "roberta" else None,
        "label2id": {lab: i for i, lab in enumerate(labels)} if labels else None,
        "use_pooler": style == "bert",
        "bias": True,
        "dropout_prob": None,
    }
    hub = {}
    for ours, i in HUB_HEAD[style].items():
        for p in PARAMS:
            hub[f"heads.{name}.{i}.{p}"] = head[f"{ours}.{p}" if ours else p].detach().contiguous()
    _write_json(folder / HEAD_CONFIG_NAME, envelope | {"config": hc})
    save_file(hub, str(folder / HEAD_WEIGHTS_NAME))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")  # as save_weights_config

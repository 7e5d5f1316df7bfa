"""PEFT (and AdapterHub) folder <-> packed file, lossless both ways.

A PEFT folder is what ``PeftModel.save_pretrained`` writes: ``adapter_config.json`` and
``adapter_model.safetensors`` (``adapter_model.bin`` is refused: we never unpickle). PEFT does not
save label names or the backbone, so ``unpack`` also writes ``prefixserve.json`` (labels,
fingerprint) which ``pack`` reads back; PEFT ignores it.

Per kind: prefix and prompt keep PEFT's tensor names in the packed file; LoRA and IA3 are renamed to
backbone-neutral ``encoder.layer.{i}.*`` names and back (:mod:`.peft_weights`); bottleneck adapters come
from and go to an AdapterHub ``save_adapter`` folder (``adapter.safetensors``, ``model_head.safetensors``:
:mod:`.bottleneck.hub_io`), which ``pack_folder`` recognises by those file names.

A BERT-style head may carry its own pooler (``base_model.bert.pooler.dense.*``, what PEFT saves with
``modules_to_save=["classifier", "pooler"]``); it packs and unpacks like the classifier (see :mod:`.heads`).

Projected prefixes (``prefix_projection=True``): PEFT saves the *materialised* K/V, so the packed
file always holds ``prompt_embeddings`` of shape (P, layers*2*hidden) and loads in PEFT with
``inference_mode`` like any prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .bottleneck import hub_io
from .errors import BadRequestError, InvalidAdapterError
from .format import DEFAULT_LIMITS, AdapterFile, dump_packed, load_packed, read_header, strict_json
from .heads import split_head
from .peft_weights import from_peft, to_peft

RENAMED = ("LORA", "IA3")  # peft_types whose tensors are renamed between PEFT and the packed file

SIDECAR = "prefixserve.json"


def default_labels(tensors) -> list[str]:
    head = split_head(tensors)
    weight = head.get("out_proj.weight", head.get("weight"))  # (C, H)
    if weight is None:
        raise InvalidAdapterError("adapter has no classification head (task_type must be SEQ_CLS)", code="bad_head")
    if weight.ndim != 2:
        raise InvalidAdapterError(f"classifier weight must be 2-D, got {tuple(weight.shape)}", code="shape_mismatch")
    if weight.shape[0] > DEFAULT_LIMITS.max_labels:  # before making that many names
        raise InvalidAdapterError(
            f"the head has {weight.shape[0]} outputs; at most {DEFAULT_LIMITS.max_labels} labels", code="bad_labels"
        )
    return [f"LABEL_{i}" for i in range(weight.shape[0])]


def pack_parts(
    config_json: bytes, model_bytes: bytes, *, labels: list[str] | None = None, fingerprint: str | None = None
) -> bytes:
    """Pack the two files PEFT writes (as bytes, e.g. from an HTTP upload) into one adapter.

    Every malformed part is an ``InvalidAdapterError`` with a code (``bad_config``, ``duplicate_key``,
    ``bad_labels``, ``not_safetensors``, ...), as for a packed file (see :mod:`.format`).
    """
    if len(model_bytes) > DEFAULT_LIMITS.max_bytes:
        raise InvalidAdapterError("adapter_model is larger than the size cap", code="adapter_too_large", status=413)
    config = strict_json(config_json, "adapter_config.json", "bad_config")
    if not isinstance(config, dict):
        raise InvalidAdapterError("adapter_config.json must be a JSON object", code="bad_config")
    if labels is not None and (not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) for x in labels)):
        raise InvalidAdapterError("labels must be a list of strings", code="bad_labels")
    read_header(model_bytes)  # framing, JSON, repeated tensor names, dtypes: the same codes as a packed file
    try:
        tensors = st_load(model_bytes)
    except Exception as exc:
        raise InvalidAdapterError(
            f"adapter_model is not a readable safetensors file: {str(exc)[:200]}", code="bad_tensors"
        ) from None
    if not fingerprint:
        raise BadRequestError("a backbone fingerprint is required to pack (pass --backbone)")
    if config.get("peft_type") in RENAMED:
        tensors = from_peft(config, tensors)
    return dump_packed(config, tensors, list(labels) if labels else default_labels(tensors), fingerprint)


def _read_sidecar(folder: Path) -> dict:
    """Our ``prefixserve.json`` beside a PEFT folder (``{}`` when absent), checked."""
    path = folder / SIDECAR
    if not path.is_file():
        return {}
    side = strict_json(path.read_bytes(), SIDECAR, "bad_sidecar")
    if not isinstance(side, dict):
        raise InvalidAdapterError(f"{SIDECAR} must be a JSON object", code="bad_sidecar")
    if not isinstance(side.get("backbone", ""), str):
        raise InvalidAdapterError(f"{SIDECAR} 'backbone' must be a fingerprint string", code="bad_sidecar")
    if side.get("labels") is not None and not isinstance(side["labels"], list):
        raise InvalidAdapterError(f"{SIDECAR} 'labels' must be a list of strings", code="bad_labels")
    return side


def pack_folder(
    folder: str | Path,
    *,
    labels: list[str] | None = None,
    fingerprint: str | None = None,
    default_fingerprint: str | None = None,
) -> bytes:
    """Pack a PEFT folder. Fingerprint: explicit, else the sidecar's, else ``default_fingerprint``."""
    folder = Path(folder)
    if is_hub_folder(folder):
        return _pack_hub_folder(folder, labels=labels, fingerprint=fingerprint, default_fingerprint=default_fingerprint)
    if (folder / "adapter_model.bin").exists() and not (folder / "adapter_model.safetensors").exists():
        raise InvalidAdapterError(
            "adapter_model.bin (pickle) is refused; save with safe_serialization=True", code="pickle_refused"
        )
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (folder / name).is_file():
            raise InvalidAdapterError(f"{folder} has no {name}", code="not_a_peft_folder")
    side = _read_sidecar(folder)
    return pack_parts(
        (folder / "adapter_config.json").read_bytes(),
        (folder / "adapter_model.safetensors").read_bytes(),
        labels=labels or side.get("labels"),
        fingerprint=fingerprint or side.get("backbone") or default_fingerprint,
    )


def is_hub_folder(folder: Path) -> bool:
    """An AdapterHub ``save_adapter`` folder (its weights file names differ from PEFT's)."""
    return any((folder / n).exists() for n in (hub_io.WEIGHTS_NAME, hub_io.PICKLE_NAME)) and not any(
        (folder / n).exists() for n in ("adapter_model.safetensors", "adapter_model.bin")
    )


def _pack_hub_folder(
    folder: Path, *, labels: list[str] | None, fingerprint: str | None, default_fingerprint: str | None
) -> bytes:
    config, tensors = hub_io.from_hub_folder(folder)
    side = _read_sidecar(folder)
    fingerprint = fingerprint or side.get("backbone") or default_fingerprint
    if not fingerprint:
        raise BadRequestError("a backbone fingerprint is required to pack (pass --backbone)")
    labels = labels or side.get("labels") or hub_io.hub_labels(folder) or default_labels(tensors)
    return dump_packed(config, tensors, list(labels), fingerprint)


def unpack(adapter: AdapterFile | bytes, folder: str | Path) -> Path:
    """Write a folder the reference library loads, plus our sidecar: PEFT's ``PeftModel.from_pretrained`` for
    prefix, prompt, LoRA and IA3; AdapterHub's ``load_adapter`` for a bottleneck adapter."""
    if isinstance(adapter, (bytes, bytearray)):
        adapter = load_packed(bytes(adapter))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = adapter.meta
    if meta.kind == "bottleneck":
        hub_io.to_hub_folder(adapter.peft_config, adapter.tensors, folder, meta.head_style, labels=list(meta.labels))
    else:
        tensors = adapter.tensors
        if adapter.peft_config.get("peft_type") in RENAMED:
            tensors = to_peft(adapter.peft_config, tensors, meta.head_style)
        (folder / "adapter_config.json").write_text(json.dumps(adapter.peft_config, indent=2, sort_keys=True))
        (folder / "adapter_model.safetensors").write_bytes(st_save(dict(sorted(tensors.items()))))
    (folder / SIDECAR).write_text(json.dumps({"labels": list(meta.labels), "backbone": meta.fingerprint}, indent=2))
    return folder


def read_adapter(path: str | Path, *, default_fingerprint: str | None = None) -> bytes:
    """Packed bytes from a packed ``.safetensors`` file or a PEFT folder.

    A PEFT folder without our sidecar records no backbone; ``default_fingerprint`` (the backbone in
    use) is then assumed, as PEFT itself would assume.
    """
    path = Path(path)
    if path.is_dir():
        return pack_folder(path, default_fingerprint=default_fingerprint)
    if not path.is_file():
        raise InvalidAdapterError(f"adapter {str(path)!r} does not exist", code="adapter_not_found", status=404)
    return path.read_bytes()

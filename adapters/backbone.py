"""The frozen shared encoder: load any BERT / RoBERTa / XLM-R from a hub id or a folder.

Decisions:
* Loaded with ``AutoModel`` in fp32 (transformers reads the config, the weights and the tokenizer),
  fingerprinted, then copied into our :class:`~.encoder.PackedEncoder` (the transformers module is dropped),
  cast to the serving dtype, frozen and put in eval mode on CUDA when available (else CPU).
* Serving dtype ``auto``: bf16 where the hardware computes it natively (CUDA with bf16; CPUs with
  AVX512-BF16 or AMX), else fp32 (bf16 emulated on AVX2 runs slower than fp32). Logits are float32 anyway.
* **The same backbone is the same function in every process**: nothing freshly (randomly) initialised
  survives the load. RoBERTa-style checkpoints load with ``add_pooling_layer=False`` (their SEQ_CLS head
  does not use a pooler). A BERT checkpoint keeps its pooler only when every pooler tensor came from the
  checkpoint (``from_pretrained``'s missing keys say so); a checkpoint without pooler weights
  (multilingual-e5, many sentence-transformers exports) gets its random pooler **removed** right after
  the load (``model.pooler = None``, exactly what ``add_pooling_layer=False`` builds), so no head can use
  it. ``Backbone.has_pooler`` / ``BackboneSpec.has_pooler`` record which case it is; a BERT-style head on a
  pooler-less backbone must bring its own pooler (see :mod:`.heads`), or it is refused (``needs_pooler``).
* The **fingerprint** hashes the model type, the shape-defining config and every tensor that came
  from the checkpoint (names, shapes, fp32 bytes) - never freshly initialised ones, which differ at
  every load. The pooler is therefore in it exactly when the backbone has one: a checkpoint with pooler
  weights and the same checkpoint without them have different fingerprints, and no separate marker is
  hashed, so every fingerprint computed before this rule (and every cached one) is unchanged.
  It is independent of the serving dtype and device. Cached beside a local checkpoint
  (``.prefixserve-fingerprint.json``, keyed by file sizes and mtimes) because hashing ~0.5 GB
  takes a second or two.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .encoder import SUPPORTED, PackedEncoder
from .errors import BadRequestError
from .format import BackboneSpec
from .heads import ROBERTA_LIKE, expected_head_style

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "vocab_size",
    "type_vocab_size",
    "pad_token_id",
    "layer_norm_eps",
    "hidden_act",
    "position_embedding_type",
)
_SIDECAR = ".prefixserve-fingerprint.json"
MIN_TEXT_TOKENS = 8  # an adapter must leave at least this many positions for real tokens


@dataclass
class Backbone:
    encoder: PackedEncoder
    tokenizer: object
    name: str
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self):
        return self.encoder.config

    @property
    def has_pooler(self) -> bool:
        """A pooler from the checkpoint (BERT with pooler weights); never a randomly initialised one."""
        return self.encoder.pooler is not None

    @property
    def spec(self) -> BackboneSpec:
        c = self.config
        return BackboneSpec(
            fingerprint=self.fingerprint,
            num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads,
            hidden=c.hidden_size,
            head_style=expected_head_style(self.encoder),
            max_virtual_tokens=self.encoder.max_text_tokens(0) - MIN_TEXT_TOKENS,
            has_pooler=self.has_pooler,
            intermediate=c.intermediate_size,
        )


def resolve_device(device: str = "auto") -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX); without them bf16 is emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell cheaply, stay exact
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA GPUs with native bf16 (sm80+) and on CPUs with AVX512-BF16 / AMX, fp32 elsewhere."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise BadRequestError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cuda":  # native bf16 (and the flash varlen kernels) from Ampere (sm80) on
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


def compute_fingerprint(config, state: dict[str, torch.Tensor], from_checkpoint: set[str]) -> str:
    """sha256 over the shape-defining config and the checkpoint's own tensors (fp32 bytes)."""
    h = hashlib.sha256()
    cfg = {k: getattr(config, k, None) for k in _CONFIG_KEYS}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in sorted(from_checkpoint):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _sidecar_key(folder: Path) -> dict:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json") and p.name != _SIDECAR)
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def _cached_fingerprint(folder: Path | None) -> str | None:
    if folder is None or not (folder / _SIDECAR).is_file():
        return None
    try:
        saved = json.loads((folder / _SIDECAR).read_text())
        return saved["fingerprint"] if saved.get("files") == _sidecar_key(folder) else None
    except (OSError, ValueError, KeyError):
        return None


def _save_fingerprint(folder: Path | None, fingerprint: str) -> None:
    if folder is None:
        return
    try:
        (folder / _SIDECAR).write_text(json.dumps({"fingerprint": fingerprint, "files": _sidecar_key(folder)}))
    except OSError:  # read-only model cache: just recompute next time
        pass


def load_backbone(name_or_path: str, *, device: str = "auto", dtype: str = "float32") -> Backbone:
    """Load, fingerprint, convert to the packed encoder, freeze. ``name_or_path`` is a hub id or a local folder.

    ``dtype``: ``auto`` (the server's default, see :func:`resolve_dtype`) or a name in ``DTYPES``; the
    trainer keeps the default float32.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in SUPPORTED:
        raise BadRequestError(f"backbone {name_or_path!r} is a {config.model_type!r}; supported: {sorted(SUPPORTED)}")
    kwargs = {"add_pooling_layer": False} if config.model_type in ROBERTA_LIKE else {}
    model, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, dtype=torch.float32, **kwargs)
    missing = set(info.get("missing_keys", []))
    if getattr(model, "pooler", None) is not None and any(k.startswith("pooler.") for k in missing):
        model.pooler = None  # randomly initialised: drop it (what add_pooling_layer=False builds), see docstring
        log.warning(
            "backbone %s has no pooler weights: loaded without one; BERT heads must bring their own", name_or_path
        )
    folder = Path(name_or_path) if os.path.isdir(name_or_path) else None
    fingerprint = _cached_fingerprint(folder)
    state = model.state_dict()
    if fingerprint is None:
        fingerprint = compute_fingerprint(config, state, set(state) - missing)
        _save_fingerprint(folder, fingerprint)
    encoder = PackedEncoder.from_hf(model).to_serving(dev, torch_dtype)
    del model, state  # one copy of the weights: the packed encoder's
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return Backbone(encoder, tokenizer, str(name_or_path), fingerprint, dev, torch_dtype)

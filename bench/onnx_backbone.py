"""BENCH-ONLY: the plain backbone in ONNX Runtime (fp32, CPU), what a CPU user would run instead of us.

Decisions:
* Exported once per backbone folder with ``torch.onnx.export`` (the dynamo exporter, dynamic batch and
  sequence axes, its graph optimizer on) from ``AutoModel.from_pretrained(dir)`` in fp32, inputs
  ``input_ids`` and ``attention_mask``, output the last hidden state; cached beside the synthetic backbones
  (``--cache-dir``), keyed by the folder's name and file sizes/mtimes, so a run pays the ~30 s export once.
* Session: ``CPUExecutionProvider``, graph optimizations ``ORT_ENABLE_ALL``, intra-op threads = torch's
  threads, one inter-op thread (the same cores our engine gets). Tried and dropped: onnxruntime's
  transformer optimizer (``optimize_model(model_type="bert")``) fuses SkipLayerNorm/BiasGelu but not the
  exporter's attention pattern here, and changed nothing measurable (6.3-7.1 s vs 6.0-6.7 s per 32x64 batch).
* Served as usual: batches in arrival order, ``tokenizer(batch, padding=True)``, no adapter, no head.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def _key(folder: Path) -> str:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    stamp = json.dumps({p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}, sort_keys=True)
    return hashlib.sha256(stamp.encode()).hexdigest()[:12]


class _LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)


def export(model_dir: str | Path, cache_dir: str | Path) -> Path:
    """The fp32 ONNX file of ``model_dir``'s encoder (exported on the first call, then reused)."""
    import contextlib
    import io
    import logging

    from transformers import AutoConfig, AutoModel

    from prefixserve.adapters.heads import ROBERTA_LIKE

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"ONNX export needs a local backbone folder, got {model_dir!r}")
    out = Path(cache_dir) / "onnx" / f"{folder.name}-{_key(folder)}" / "model.onnx"
    done = out.with_suffix(".complete")
    if done.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.from_pretrained(folder)
    kwargs = {"add_pooling_layer": False} if config.model_type in ROBERTA_LIKE else {}
    model = _LastHidden(AutoModel.from_pretrained(folder, dtype=torch.float32, **kwargs).eval())
    ids = torch.randint(5, 100, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("seq", min=2, max=4096)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter narrates each step
        torch.onnx.export(
            model,
            (ids, mask),
            str(out),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            optimize=True,
            external_data=True,
        )
    done.write_text("ok")
    return out


def session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session over ``path`` with ``threads`` intra-op threads (default: torch's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_padded(sess, tokenizer, texts: list[str]):
    """One padded batch, as usual: ``tokenizer(texts, padding=True)`` -> the session -> hidden (B, T, H)."""
    enc = tokenizer(texts, padding=True, return_tensors="np")
    feeds = {"input_ids": enc["input_ids"].astype("int64"), "attention_mask": enc["attention_mask"].astype("int64")}
    return sess.run(None, feeds)[0]  # (B, T, H) float32

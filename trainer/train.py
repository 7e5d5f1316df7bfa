"""``prefixserve train``: fit one tenant's adapter (prefix, prompt, LoRA, IA3, bottleneck) + head on a frozen
shared backbone.

Decisions (defaults after P-Tuning v2, tuned on Rotten Tomatoes with all-MiniLM-L6-v2, see bench/accuracy.py):
* AdamW, three parameter groups: virtual tokens (``lr``, high: 3e-2 - above P-Tuning v2's 5e-3..1e-2
  because CPU budgets allow few steps; 1e-2 learnt almost nothing in 4 epochs of 400 Rotten Tomatoes rows -
  no weight decay: shrinking K/V towards 0 is not a prior we want; weight kinds: the per-kind defaults of
  :data:`~.config.KIND_LR`, no weight decay either - IA3's vectors start at 1), head (``head_lr`` 1e-2,
  ``weight_decay`` on matrices), backbone (``backbone_lr`` 3e-5, full fine-tuning only). Linear warmup
  (``warmup`` < 1 is a fraction of all steps, else a step count) then linear decay to 0. Gradient norm
  clipped at 1.0.
* Per-epoch eval (accuracy, macro-F1); the best epoch by accuracy (ties: macro-F1, then earlier) is kept and
  exported; ``patience`` epochs without improvement stop training (0 = never stop early).
* The prefix starts from the keys/values the frozen encoder computes for random real tokens
  (``prefix_init="tokens"``, Li & Liang 2021): 70.0 vs 69.0 % with PEFT's N(0, 1) in the same quick run.
* Deterministic for a seed: seeded init, seeded shuffling, backbone in eval mode (no backbone dropout).
* The frozen backbone is checksummed (sha256 of every parameter and buffer) before and after; a change is an
  internal error. Full fine-tuning trains a deep copy, so the shared backbone is never touched.
* Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the process' peak RSS (``ru_maxrss``) -
  a process-wide high-water mark, so later rows of one experiment report at least the earlier rows' peak.
* :class:`TrainHooks` (optional; the training service's runner, ``server/training_runner.py``): ``on_epoch``
  gets each epoch's history record as soon as it is made; ``should_stop`` is asked before every optimizer
  step and a reason it returns ends training with :class:`TrainingStopped` (nothing exported). It must be
  cheap: the caller throttles its own store reads. Without hooks, training runs exactly as before.
"""

from __future__ import annotations

import copy
import hashlib
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixserve.adapters.errors import BadRequestError, PrefixServeError

from .config import DEFAULT_NUM_VIRTUAL_TOKENS, KIND_LR, VIRTUAL_TOKEN_LR, TrainConfig  # TrainConfig: public too

if TYPE_CHECKING:
    import torch
    from torch import nn

    from prefixserve.adapters.backbone import Backbone

    from .data import Example
    from .model import AdapterModel, TokenizedRow


@dataclass
class TrainResult:
    model: AdapterModel
    labels: list[str]
    history: list[dict[str, Any]]
    best: dict[str, Any]  # the kept epoch's history record
    packed: bytes | None  # None: head only or fine-tuned backbone, nothing servable
    log: dict[str, Any] = field(repr=False, default_factory=dict)
    eval_examples: list[Example] = field(repr=False, default_factory=list)  # the held-out rows each epoch scored


@dataclass(frozen=True)
class TrainHooks:
    """Callbacks into :func:`train`: progress after each epoch, and a stop check before each step."""

    on_epoch: Callable[[dict[str, Any]], None] | None = None  # a copy of the epoch's history record
    should_stop: Callable[[], str | None] | None = None  # a reason (e.g. "cancelled") stops training


class TrainingStopped(Exception):
    """``TrainHooks.should_stop`` returned ``reason``: training ended early and exported nothing."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def backbone_checksum(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, shapes, bytes): detects any change at all."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(list(module.named_parameters()) + list(module.named_buffers()), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peak_memory_bytes(device: torch.device) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def metrics(pred: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (classes absent from both gold and predictions are left out of the mean)."""
    n = len(gold)
    acc = sum(p == g for p, g in zip(pred, gold)) / n if n else 0.0
    f1s = []
    for c in range(num_labels):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def evaluate(
    model: AdapterModel,
    rows: list[TokenizedRow],
    batch_size: int,
    device: torch.device | str,
    num_labels: int,
) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics incl. mean loss, logits (N, C) on CPU) in eval mode, no gradients."""
    import torch
    from torch.nn import functional as F

    from .model import batches

    was_training = model.training
    model.eval()
    all_logits: list[torch.Tensor] = []
    loss_sum = 0.0
    with torch.inference_mode():
        for ids, types, labels in batches(rows, batch_size, device):
            logits = model(ids, types).float()  # (B, C)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            all_logits.append(logits.cpu())
    model.train(was_training)
    logits = torch.cat(all_logits) if all_logits else torch.zeros(0, num_labels)  # (N, C)
    m = metrics(logits.argmax(-1).tolist(), [r[2] for r in rows], num_labels)
    m["loss"] = loss_sum / max(1, len(rows))
    return m, logits


def _optimizer(
    model: AdapterModel, cfg: TrainConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    import torch

    groups = model.trainable_parameters()
    lr = cfg.lr if cfg.lr is not None else KIND_LR.get(cfg.kind or "", VIRTUAL_TOKEN_LR)
    param_groups: list[dict[str, Any]] = []
    if groups[model.body_group]:
        param_groups.append({"params": groups[model.body_group], "lr": lr, "weight_decay": 0.0})
    for name, group_lr in (("head", cfg.head_lr), ("backbone", cfg.backbone_lr)):
        decay = [p for p in groups[name] if p.ndim >= 2]
        no_decay = [p for p in groups[name] if p.ndim < 2]  # biases, LayerNorm
        if decay:
            param_groups.append({"params": decay, "lr": group_lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            param_groups.append({"params": no_decay, "lr": group_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(param_groups)
    warm = int(cfg.warmup * total_steps) if cfg.warmup < 1 else int(cfg.warmup)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _better(m: dict[str, Any], best: dict[str, Any] | None) -> bool:
    return best is None or (m["accuracy"], m["macro_f1"]) > (best["accuracy"], best["macro_f1"])


def train(cfg: TrainConfig, backbone: Backbone | None = None, hooks: TrainHooks | None = None) -> TrainResult:
    """Train, keep the best epoch, export (prefix/prompt, frozen backbone) and write ``<out>.log.json``.

    ``hooks``: see :class:`TrainHooks`; a stop raises :class:`TrainingStopped` out of this call."""
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    from prefixserve.adapters.backbone import load_backbone

    from .data import load_datasets
    from .model import AdapterModel, batches, tokenize, tokenizer_of
    from .pretrain import load_prefix_init

    if cfg.kind is not None and cfg.kind not in KIND_LR:
        raise BadRequestError(f"--kind must be one of {', '.join(KIND_LR)}, got {cfg.kind!r}", code="bad_kind")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise BadRequestError("--epochs and --batch-size must be >= 1", code="bad_args")
    started = time.time()
    torch.manual_seed(cfg.seed)
    if backbone is None:
        backbone = load_backbone(cfg.backbone, device=cfg.device)
    device = backbone.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_ds, eval_ds, labels = load_datasets(cfg)

    init = None
    if cfg.init_from:
        if cfg.kind != "prefix":
            raise BadRequestError("--init-from starts a prefix: use it with --kind prefix", code="bad_init")
        init = load_prefix_init(cfg.init_from, backbone, cfg.num_virtual_tokens)
        if cfg.prefix_projection:
            raise BadRequestError(
                "--init-from gives a materialised prefix; it cannot seed --prefix-projection", code="bad_init"
            )
    p = cfg.num_virtual_tokens or (init.shape[0] if init is not None else DEFAULT_NUM_VIRTUAL_TOKENS)
    p = p if cfg.kind in ("prefix", "prompt") else 0  # weight kinds and head only: no virtual tokens
    room = backbone.encoder.text_room(p, cfg.max_length)
    if room < 3:
        raise BadRequestError(f"--num-virtual-tokens {p} leaves no room for text on this backbone", code="too_long")
    before = backbone_checksum(backbone.encoder)
    encoder = copy.deepcopy(backbone.encoder) if cfg.train_backbone else backbone.encoder
    model = AdapterModel(
        encoder,
        len(labels),
        kind=cfg.kind,
        num_virtual_tokens=p,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size,
        init=init,
        head_dropout=cfg.head_dropout,
        train_backbone=cfg.train_backbone,
        seed=cfg.seed,
        prefix_init=cfg.prefix_init,
        weight_options=cfg,
    )
    tokenizer = tokenizer_of(backbone)
    train_rows = tokenize(tokenizer, train_ds.examples, labels, room)
    eval_rows = tokenize(tokenizer, eval_ds.examples, labels, room) if eval_ds and len(eval_ds) else []
    steps_per_epoch = -(-len(train_rows) // cfg.batch_size)
    opt, sched = _optimizer(model, cfg, steps_per_epoch * cfg.epochs)
    trainable = {k: sum(p.numel() for p in v) for k, v in model.trainable_parameters().items()}
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    kept: dict[str, torch.Tensor] | None = None
    stale = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, loss_sum, seen = time.time(), 0.0, 0
        bar = tqdm(
            batches(train_rows, cfg.batch_size, device, gen),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{cfg.epochs}",
            disable=not cfg.progress,
            file=sys.stderr,
            leave=False,
        )
        for ids, types, y in bar:
            reason = hooks.should_stop() if hooks is not None and hooks.should_stop is not None else None
            if reason:
                raise TrainingStopped(reason)
            logits = model(ids, types)  # (B, C)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.max_grad_norm)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        record = {"epoch": epoch, "train_loss": loss_sum / max(1, seen), "epoch_time_s": time.time() - t0}
        if eval_rows:
            m, _ = evaluate(model, eval_rows, cfg.batch_size * 2, device, len(labels))
            record.update({"eval_" + k: v for k, v in m.items()})
            m_best = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}
        else:  # no eval set: the last epoch is the one kept
            m_best = {"accuracy": epoch, "macro_f1": 0.0}
        history.append(record)
        if hooks is not None and hooks.on_epoch is not None:
            hooks.on_epoch(dict(record))
        if cfg.progress:
            print(json.dumps(record), file=sys.stderr)
        if _better(m_best, best):
            best, kept, stale = {**m_best, "epoch": epoch}, model.state_to_keep(), 0
        else:
            stale += 1
            if cfg.patience and stale >= cfg.patience:
                break
    assert best is not None and kept is not None  # epochs >= 1, and the first epoch always beats None
    model.load_kept(kept)
    model.eval()
    train_time = time.time() - started

    if not cfg.train_backbone and backbone_checksum(backbone.encoder) != before:
        raise PrefixServeError("the frozen backbone changed during training", code="backbone_changed")
    packed = None
    if cfg.kind and not cfg.train_backbone:
        packed = model.export(labels, backbone.fingerprint, base_model=str(cfg.backbone))
    best_record = next(r for r in history if r["epoch"] == best["epoch"])
    backbone_params = sum(p.numel() for p in backbone.encoder.parameters())
    log = {
        "args": {k: v for k, v in asdict(cfg).items()},
        "labels": labels,
        "fingerprint": backbone.fingerprint,
        "device": str(device),
        "num_virtual_tokens": p,
        "text_room": room,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "bad_rows": {"train": dict(train_ds.bad), "eval": dict(eval_ds.bad) if eval_ds else {}},
        "epochs": history,
        "best": best_record,
        "train_time_s": train_time,
        "peak_memory_bytes": peak_memory_bytes(device),
        "trainable_params": trainable,
        "trainable_params_total": sum(trainable.values()),
        "backbone_params": backbone_params,
        "backbone_unchanged": None if cfg.train_backbone else True,
        "backbone_has_pooler": backbone.has_pooler,
        "head_has_pooler": model.head.pooler is not None,  # trained and exported with the head
    }
    if cfg.out and packed is not None:
        out = Path(cfg.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(packed)
        Path(str(out) + ".log.json").write_text(json.dumps(log, indent=2, ensure_ascii=False, default=str))
    return TrainResult(model, labels, history, best_record, packed, log, eval_ds.examples if eval_ds else [])

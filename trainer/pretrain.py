"""``prefixserve pretrain``: a task-agnostic prefix learnt by masked-language modelling on raw text.

After "Pre-trained Prefix Prompting": the backbone (encoder AND its MLM head) stays frozen; only the prefix
is trained to make the frozen MLM better at predicting masked tokens of an in-domain corpus. The result seeds
task prefixes (``prefixserve train --init-from``).

The served encoder (:class:`~prefixserve.adapters.encoder.PackedEncoder`, packed batches) computes the hidden
states; the checkpoint's LM head (``.cls`` / ``.lm_head`` of ``AutoModelForMaskedLM``) maps the masked tokens'
states (only those) to vocabulary logits.
A checkpoint without MLM-head weights (e.g. a sentence-embedding model) is refused with ``no_mlm_head``.

Masking (BERT's recipe): ``mlm_prob`` of the non-special tokens of each line are chosen; 80 % become
``[MASK]``, 10 % a random token, 10 % stay. ``loss_before``/``loss_after`` are measured on the same fixed
masked sample (first <= 256 lines, fixed mask seed), so they compare like with like.

File format (one ``.safetensors``): tensor ``prompt_embeddings`` (P, layers*2*hidden) fp32 - the
materialised prefix, exactly PEFT's layout - and ``__metadata__``:
``format="prefixserve.pretrained_prefix"``, ``format_version="1"``, ``kind="prefix"``, ``backbone`` (fingerprint),
``adapter_config`` (PEFT ``PREFIX_TUNING`` config JSON, ``prefix_projection=false`` since materialised),
``pretraining`` (JSON: objective, mlm_prob, steps, losses, corpus lines). It has no head and is not servable.
``--init-from`` also accepts a packed prefix adapter (its ``prompt_embeddings`` are reused, head dropped).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefixserve.adapters.errors import BadRequestError, FingerprintMismatchError, InvalidAdapterError, PrefixServeError

from .config import PretrainConfig  # public here too

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedModel

    from prefixserve.adapters.backbone import Backbone
    from prefixserve.adapters.prefix import PrefixConfig

EncodedLine = tuple[list[int], list[int]]  # (input_ids, special_tokens_mask)

PRETRAINED_FORMAT = "prefixserve.pretrained_prefix"
PRETRAINED_VERSION = "1"


def load_mlm(name: str, device: torch.device) -> tuple[PreTrainedModel, nn.Module]:
    """``AutoModelForMaskedLM`` (frozen, eval) or ``PrefixServeError(no_mlm_head)``; returns (model, lm_head)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForMaskedLM

    from prefixserve.adapters.backbone import SUPPORTED

    config = AutoConfig.from_pretrained(name)
    if config.model_type not in SUPPORTED:
        raise BadRequestError(f"backbone {name!r} is a {config.model_type!r}; supported: {sorted(SUPPORTED)}")
    model, info = AutoModelForMaskedLM.from_pretrained(name, output_loading_info=True, dtype=torch.float32)
    missing = [k for k in info.get("missing_keys", []) if k.startswith(("cls.", "lm_head."))]
    if missing:
        raise PrefixServeError(
            f"checkpoint {name!r} has no masked-LM head (missing {sorted(missing)[:3]}...); "
            "prefix pre-training needs a checkpoint saved with its MLM head",
            code="no_mlm_head",
            status=400,
        )
    head = getattr(model, "lm_head", None) or getattr(model, "cls", None)  # RoBERTa | BERT naming
    if not isinstance(head, nn.Module):
        raise PrefixServeError(f"{type(model).__name__} has no lm_head/cls module", code="no_mlm_head", status=400)
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, head


def mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int, prob: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking. ids/special: (B, T). Returns (inputs (B, T), labels (B, T) with -100 where not masked)."""
    import torch

    chosen = (torch.rand(ids.shape, generator=gen) < prob) & ~special  # (B, T)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))  # (B, T)
    roll = torch.rand(ids.shape, generator=gen)  # (B, T)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, mask_id), ids)  # (B, T)
    rand_tok = torch.randint(0, vocab, ids.shape, generator=gen)  # (B, T)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), rand_tok, inputs)  # (B, T)
    return inputs, labels


def _batches(
    encoded: Sequence[EncodedLine], batch_size: int, pad_id: int, order: list[int]
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """(ids (B, T), special (B, T), lengths): padded only for masking; the encoder gets each row unpadded."""
    import torch

    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        t_max = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), t_max), pad_id, dtype=torch.long)  # (B, T)
        special = torch.ones((len(rows), t_max), dtype=torch.bool)  # (B, T): padding counts as special
        for i, (x, s) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            special[i, : len(x)] = torch.tensor(s, dtype=torch.bool)
        yield ids, special, [len(r[0]) for r in rows]


def pretrain(cfg: PretrainConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Train the prefix by MLM; returns {"prefix": (P, width) tensor, "bytes": file, "log": dict}.
    ``backbone``: the already loaded ``cfg.backbone`` (an experiment pre-trains several lengths on one)."""
    import torch
    from torch.nn import functional as F
    from tqdm.auto import tqdm

    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.packing import prefix_to_kv
    from prefixserve.adapters.prefix import PrefixConfig, PrefixEncoder

    from .model import encoder_config, tokenizer_of

    started = time.time()
    torch.manual_seed(cfg.seed)
    if backbone is None:  # fingerprint + tokenizer of the served encoder
        backbone = load_backbone(cfg.backbone, device=cfg.device)
    device = backbone.device
    mlm, lm_head = load_mlm(cfg.backbone, device)  # only its LM head is used: the encoder is the served one
    encoder, tok = backbone.encoder, tokenizer_of(backbone)
    lines = [ln.strip() for ln in Path(cfg.corpus).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not lines:
        raise BadRequestError(f"corpus {cfg.corpus!r} has no non-empty line", code="empty_dataset")
    c = encoder.config
    pc = PrefixConfig(
        cfg.num_virtual_tokens,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.hidden_size,
        cfg.prefix_projection,
        cfg.encoder_hidden_size,
    )
    prefix = PrefixEncoder(pc).to(device)
    room = encoder.text_room(cfg.num_virtual_tokens, cfg.max_length)
    enc = tok(lines, truncation=True, max_length=room, return_special_tokens_mask=True)
    encoded = list(zip(enc["input_ids"], enc["special_tokens_mask"]))
    vocab: int = encoder_config(mlm).vocab_size

    def mlm_loss(ids: torch.Tensor, special: torch.Tensor, lengths: list[int], gen: torch.Generator) -> torch.Tensor:
        inputs, labels = mask_tokens(ids, special, tok.mask_token_id, vocab, cfg.mlm_prob, gen)  # (B, T) x 2
        rows = [inputs[i, :n].tolist() for i, n in enumerate(lengths)]
        targets = torch.cat([labels[i, :n] for i, n in enumerate(lengths)]).to(device)  # (T_real,) stream order
        kv = prefix_to_kv(prefix(), c.num_hidden_layers, c.num_attention_heads)  # (layers, 2, P, heads, hd)
        batch = encoder.pack(rows, prefixes=[kv] * len(rows))
        hidden = encoder(batch)  # (T_real, H): no prompt, so stream slot = token
        chosen = targets != -100  # (T_real,)
        logits = lm_head(hidden[chosen])  # (M, V): the masked tokens only
        return F.cross_entropy(logits.float(), targets[chosen])

    def fixed_loss() -> float:  # same lines, same masks every time
        gen = torch.Generator().manual_seed(cfg.seed + 7)
        losses = []
        with torch.no_grad():
            for ids, special, lengths in _batches(
                encoded, cfg.batch_size, tok.pad_token_id, list(range(min(256, len(encoded))))
            ):
                losses.append(float(mlm_loss(ids, special, lengths, gen)))
        return sum(losses) / len(losses)

    per_epoch = -(-len(encoded) // cfg.batch_size)
    total = cfg.steps or per_epoch * cfg.epochs
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    opt = torch.optim.AdamW(prefix.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    loss_before = fixed_loss()
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses = 0, []
    bar = tqdm(total=total, desc="pretrain", disable=not cfg.progress, file=sys.stderr, leave=False)
    while step < total:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for ids, special, lengths in _batches(encoded, cfg.batch_size, tok.pad_token_id, order):
            loss = mlm_loss(ids, special, lengths, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(prefix.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if step >= total:
                break
    bar.close()
    loss_after = fixed_loss()
    flat = prefix.materialise().float().cpu()  # (P, layers*2*hidden)
    log = {
        "args": asdict(cfg),
        "fingerprint": backbone.fingerprint,
        "steps": step,
        "lines": len(lines),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_losses_first_last": [losses[0], losses[-1]],
        "train_time_s": time.time() - started,
    }
    data = dump_pretrained_prefix(flat, pc, backbone.fingerprint, log, base_model=str(cfg.backbone))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_bytes(data)
        Path(cfg.out + ".log.json").write_text(json.dumps(log, indent=2, default=str))
    return {"prefix": flat, "bytes": data, "log": log}


def dump_pretrained_prefix(
    flat: torch.Tensor, config: PrefixConfig, fingerprint: str, log: dict[str, Any], base_model: str = ""
) -> bytes:
    from safetensors.torch import save

    from prefixserve.adapters.prefix import PrefixConfig

    peft = PrefixConfig(
        config.num_virtual_tokens, config.num_layers, config.num_attention_heads, config.token_dim, False
    ).to_peft_dict(base_model)
    stats = {k: log.get(k) for k in ("steps", "lines", "loss_before", "loss_after")}
    stats.update(objective="mlm", mlm_prob=log.get("args", {}).get("mlm_prob"))
    meta = {
        "format": PRETRAINED_FORMAT,
        "format_version": PRETRAINED_VERSION,
        "kind": "prefix",
        "backbone": fingerprint,
        "adapter_config": json.dumps(peft, sort_keys=True),
        "pretraining": json.dumps(stats, sort_keys=True),
    }
    return save({"prompt_embeddings": flat.contiguous()}, metadata=meta)


def load_prefix_init(path: str, backbone: Backbone, num_virtual_tokens: int | None = None) -> torch.Tensor:
    """The (P, layers*2*hidden) prefix in ``path`` (pre-trained prefix or packed prefix adapter), validated."""
    import torch
    from safetensors import safe_open

    from prefixserve.adapters.format import FORMAT, load_packed

    p = Path(path)
    if not p.is_file():
        raise BadRequestError(f"--init-from {path!r} does not exist", code="file_not_found")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
            tensors = {k: f.get_tensor(k) for k in names if k == "prompt_embeddings"}
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidAdapterError(f"--init-from {path!r} is not a safetensors file: {exc}", code="bad_init") from None
    fmt = meta.get("format")
    if fmt == FORMAT:
        packed = load_packed(p.read_bytes())
        if packed.meta.kind != "prefix":
            raise InvalidAdapterError(
                f"--init-from {path!r} is a {packed.meta.kind} adapter, not a prefix", code="bad_init"
            )
        meta = {"backbone": packed.meta.fingerprint}
    elif fmt != PRETRAINED_FORMAT:
        raise InvalidAdapterError(
            f"--init-from {path!r}: metadata format {fmt!r} is neither {PRETRAINED_FORMAT!r} nor {FORMAT!r}",
            code="bad_init",
        )
    if meta.get("backbone") != backbone.fingerprint:
        raise FingerprintMismatchError(
            f"--init-from {path!r} was made for backbone {str(meta.get('backbone'))[:23]}"
            f" but training uses {backbone.fingerprint[:23]}"
        )
    flat = tensors.get("prompt_embeddings")
    c = backbone.config
    width = c.num_hidden_layers * 2 * c.hidden_size
    if flat is None or flat.ndim != 2 or flat.shape[1] != width:
        raise InvalidAdapterError(
            f"--init-from {path!r}: prompt_embeddings shape "
            f"{None if flat is None else tuple(flat.shape)} != (P, {width})",
            code="shape_mismatch",
        )
    if num_virtual_tokens and flat.shape[0] != num_virtual_tokens:
        raise BadRequestError(
            f"--init-from {path!r} has {flat.shape[0]} virtual tokens but --num-virtual-tokens is {num_virtual_tokens}",
            code="shape_mismatch",
        )
    if not torch.isfinite(flat).all():
        raise InvalidAdapterError(f"--init-from {path!r} has NaN or infinite values", code="non_finite")
    return flat.float()

"""Workloads shared by the engine and memory benches: random adapters and the serving variants.

Every variant is a callable ``fn(rep) -> sequences`` that serves one batch of ``batch`` texts, so
:func:`bench.common.interleaved` can time them side by side. Row ``j`` of repetition ``rep`` uses
adapter ``(rep*batch + j) % distinct``: a batch of 32 over 1,000 adapters holds 32 different ones,
and successive batches walk the whole set (round-robin, the cache's worst order).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from prefixserve.adapters.engine import Engine, Row
from prefixserve.adapters.synthetic import random_adapter

NUM_LABELS = 2


def random_packed(backbone, kind: str, p: int, seed: int, num_labels: int = NUM_LABELS) -> bytes:
    """A valid packed adapter with seeded random virtual tokens and its own random head."""
    return random_adapter(
        backbone.config,
        backbone.fingerprint,
        kind=kind,
        num_virtual_tokens=p,
        labels=[f"label{i}" for i in range(num_labels)],
        seed=seed,
        base_model=backbone.name,
    )


def raw_tensor_bytes(packed: bytes) -> int:
    """Bytes of the tensors inside a packed file (what a perfect device copy would need)."""
    from prefixserve.adapters.format import load_packed

    return sum(t.numel() * t.element_size() for t in load_packed(packed).tensors.values())


def in_memory(packed: bytes) -> Callable[[], bytes]:
    """An ``Engine.adapter`` loader for bytes already held (bound now, not when a loop variable moves on)."""
    return lambda: packed


class AdapterSet:
    """``distinct`` adapter keys served by one Engine whose cache holds at most ``resident`` of them.

    Keys below ``resident`` are pre-loaded (built one at a time, never all held as bytes). On a miss
    the loader hands back packed bytes from an in-memory ``pool`` (key i -> pool[i % len(pool)]):
    the cost of a miss (parse + validate + device copy) does not depend on the bytes' values.
    """

    def __init__(
        self,
        backbone,
        kind: str,
        p: int,
        *,
        resident: int,
        pool: int | None = None,
        progress: bool = True,
        keep_packed: int = 0,
        cache_slack: float = 0.5,
    ):
        from tqdm.auto import tqdm

        self.backbone, self.kind, self.p = backbone, kind, p
        pool = pool if pool is not None else min(64, max(resident, 1))
        self.pool = [random_packed(backbone, kind, p, seed=i) for i in range(pool)]
        probe = Engine(backbone, cache_bytes=2**62).to_device("probe", self.pool[0])
        self.adapter_bytes = probe.nbytes
        # Budget for exactly `resident` adapters (slack < one adapter, so never one more).
        self.engine = Engine(backbone, cache_bytes=int((resident + cache_slack) * probe.nbytes))
        self.resident = resident
        self.packed_bytes = len(self.pool[0])
        self.kept: list[bytes] = []  # the first `keep_packed` adapters' bytes (PEFT folders are made from them)
        for i in tqdm(range(resident), desc=f"load {resident} {kind} P={p}", disable=not progress, leave=False):
            packed = self.pool[i] if i < len(self.pool) else random_packed(backbone, kind, p, seed=i)
            if i < keep_packed:
                self.kept.append(packed)
            self.engine.adapter(self.key(i), in_memory(packed))
        self.engine.cache.stats.hits = self.engine.cache.stats.misses = 0

    @staticmethod
    def key(i: int) -> str:
        return f"tenant{i}/adapter@1"

    def get(self, i: int):
        return self.engine.adapter(self.key(i), lambda: self.pool[i % len(self.pool)])


# ---- the serving variants ---------------------------------------------------------------------------
def batch_texts(texts: list[str], rep: int, batch: int) -> list[str]:
    return [texts[(rep * batch + j) % len(texts)] for j in range(batch)]


def backbone_only(backbone, texts: list[str], batch: int):
    """Plain backbone: our packed encoder with no adapter and no head (tokenize + pack + one forward).

    The same encoder, packing and attention plan the engine uses, so ``mixed / backbone-only`` is the cost
    of the adapters alone (prefix keys, gathering, heads, cache lookups).
    """
    encoder, tok = backbone.encoder, backbone.tokenizer

    @torch.inference_mode()
    def run(rep: int) -> int:
        enc = tok(batch_texts(texts, rep, batch))  # no padding: the stream holds real tokens only
        types = enc.get("token_type_ids")
        encoder(encoder.pack(enc["input_ids"], types))  # (T, H)
        return batch

    return run


def mixed(aset: AdapterSet, texts: list[str], batch: int, distinct: int):
    """The engine: every row resolves its adapter through the cache, one forward for the batch."""

    def run(rep: int) -> int:
        rows = [Row(aset.get((rep * batch + j) % distinct), t) for j, t in enumerate(batch_texts(texts, rep, batch))]
        aset.engine.forward(rows)
        return batch

    return run


def one_at_a_time(aset: AdapterSet, texts: list[str], batch: int, distinct: int):
    """No batching across requests: the same rows, one engine forward each."""

    def run(rep: int) -> int:
        for j, t in enumerate(batch_texts(texts, rep, batch)):
            aset.engine.forward([Row(aset.get((rep * batch + j) % distinct), t)])
        return batch

    return run


class PeftServer:
    """HF PEFT served the way a user would: one PeftModel, ``load_adapter`` per tenant, and per batch
    the requests grouped by adapter, ``set_adapter`` + one forward per group."""

    def __init__(self, backbone_name: str, backbone, packed: list[bytes], progress: bool = True):
        from peft import PeftModel
        from tqdm.auto import tqdm
        from transformers import AutoModelForSequenceClassification

        from prefixserve.adapters.peft_io import unpack

        self.tmp = tempfile.TemporaryDirectory(prefix="bench-peft-")
        self.device, self.tok = backbone.device, backbone.tokenizer
        base = AutoModelForSequenceClassification.from_pretrained(backbone_name, num_labels=NUM_LABELS)
        self.one_type = base.config.type_vocab_size < 2
        model = None
        for i, data in enumerate(
            tqdm(packed, desc=f"PEFT load_adapter x{len(packed)}", disable=not progress, leave=False)
        ):
            folder = unpack(data, Path(self.tmp.name) / f"t{i}")
            if model is None:
                model = PeftModel.from_pretrained(base, str(folder), adapter_name="t0")
            else:
                model.load_adapter(str(folder), adapter_name=f"t{i}")
        if model is None:
            raise ValueError("PeftServer needs at least one packed adapter")
        self.model = model.to(self.device, backbone.dtype).eval()  # the engine's dtype: a like-for-like comparison
        self.tenants = len(packed)

    def variant(self, texts: list[str], batch: int, tenants: int):
        assert tenants <= self.tenants

        @torch.inference_mode()
        def run(rep: int) -> int:
            groups: dict[int, list[str]] = {}
            for j, t in enumerate(batch_texts(texts, rep, batch)):
                groups.setdefault((rep * batch + j) % tenants, []).append(t)
            for tenant, group in groups.items():
                self.model.set_adapter(f"t{tenant}")
                enc = self.tok(group, padding=True, return_tensors="pt")
                if self.one_type:
                    enc.pop("token_type_ids", None)
                self.model(**{k: v.to(self.device) for k, v in enc.items()})  # logits (n, C)
            return batch

        return run

    def close(self) -> None:
        self.tmp.cleanup()

"""All five adapter kinds in one batch: mixed throughput, the cost of each kind, memory per adapter.

    python -m bench.kinds --quick    # < 3 min on 2 CPU cores (one batch of 32 rows, 20 adapters of each kind)
    python -m bench.kinds            # 256 rows in batches of 32, 1,000 adapters (200 of each kind)

The rows are the realistic mix (:mod:`bench.mix`: lognormal lengths, median 18) in arrival batches of 32.
Resident in ONE engine: ``--per-kind`` (200) seeded random adapters of each kind (:func:`random_adapter`):
prefix P=20, prompt Q=20, LoRA r=8 on query/value, IA3 (PEFT's defaults), bottleneck (Pfeiffer, reduction 16),
each with its own RoBERTa head. Variants, interleaved batch by batch (:func:`bench.common.interleaved_steps`):

* ``backbone-only``: the fair floor. The same packed encoder on the same rows (tokenize + pack + forward)
  and ONE shared head on token 0 (a classifier serves nothing without one): what serving the batch costs
  with no adapter at all. The engine itself cannot run adapter-less rows, so this is not ``Engine.forward``;
* ``mixed-all-kinds``: the engine, row j on adapter j of an order that interleaves the kinds (prefix,
  prompt, lora, ia3, bottleneck, prefix, ...): every batch of 32 holds 32 adapters, 6-7 of each kind;
* ``mixed-weight-kinds``: the same over the LoRA / IA3 / bottleneck adapters only;
* ``only-<kind>``: every row of every batch of that kind, over its ``--per-kind`` adapters.

Prefix rows attend over P extra keys per layer and prompt rows carry Q extra tokens through every layer: they
legitimately cost more than a plain row, which is why the weight-kinds and per-kind ratios are reported too.
Throughput counts real tokens (specials included), never virtual ones. On CPU the clock is process CPU time and
torch runs ONE thread by default (``--threads``): on a shared 2-core box an OpenMP thread waiting for a
descheduled partner spins, so two threads inflate a batch's CPU time 2-3x whenever other jobs run (seen here:
the same batch at 2.2 s or 7 s); one thread does the same work (CPU time, not wall, is what is compared)
without that noise. Memory: packed file bytes and
``DeviceAdapter.nbytes`` (the cache's unit) per kind, in fp32 and bf16, with the head's share split out.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from prefixserve.adapters.kinds import KINDS

from . import common
from .kinds_report import plot, report
from .mix import Mix, make_mix

NAME = "kinds"
WEIGHT_KINDS = ("lora", "ia3", "bottleneck")
BASE = "backbone-only"
TARGET = 0.9  # mixed-all-kinds / backbone-only on CPU
_R = f"ratio_vs_{BASE}"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.kinds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--dtype", default="auto", help="serving dtype of the timed runs: auto | float32 | bfloat16")
    p.add_argument("--rows", type=int, default=None, help="rows of the mix (default 256; quick 32)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--per-kind", type=int, default=None, help="resident adapters of each kind (default 200; quick 20)")
    p.add_argument("--p", type=int, default=20, help="prefix length P")
    p.add_argument("--q", type=int, default=20, help="prompt length Q")
    p.add_argument("--median", type=float, default=18)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default on CPU: 1, see the docstring; 0: torch's default)",
    )
    p.add_argument(
        "--render-only", action="store_true", help="measure nothing: rewrite kinds.md and the PNG from kinds.json"
    )
    args = p.parse_args(argv)
    args.reps = args.reps or 3
    args.rows = args.rows or (32 if args.quick else 256)
    args.per_kind = args.per_kind or (20 if args.quick else 200)
    return args


# ---- the resident adapters -------------------------------------------------------------------------------
class Adapters:
    """One engine holding ``per_kind`` adapters of every kind (keys ``<kind>/<i>``), and their sizes."""

    def __init__(self, bb, args):
        from tqdm.auto import tqdm

        from prefixserve.adapters.engine import Engine
        from prefixserve.adapters.rowkinds import adapter_nbytes

        self.bb, self.args = bb, args
        self.engine = Engine(bb, cache_bytes=2**62)  # all resident: this bench is not about misses
        self.keys: dict[str, list[str]] = {k: [f"{k}/{i}" for i in range(args.per_kind)] for k in KINDS}
        self.first: dict[str, bytes] = {}  # seed-0 packed bytes of each kind (the memory table re-loads them)
        bar = tqdm(total=len(KINDS) * args.per_kind, desc="load adapters", disable=args.no_progress, leave=False)
        for kind in KINDS:
            for i, key in enumerate(self.keys[kind]):
                packed = packed_adapter(bb, kind, i, args)
                if i == 0:
                    self.first[kind] = packed
                self.engine.adapter(key, functools.partial(_same, packed))
                bar.update(1)
        bar.close()
        self.engine.cache.stats.hits = self.engine.cache.stats.misses = 0  # count the timed lookups only
        self.head = self.get(self.keys["prompt"][0]).head  # backbone-only's one shared head
        self.head_bytes = adapter_nbytes(self.head)

    def get(self, key: str):
        return self.engine.cache.get(key, _missing)

    def order(self, kinds: tuple[str, ...]) -> list[str]:
        """Keys of ``kinds`` interleaved kind by kind: consecutive rows hit different kinds."""
        return [self.keys[k][i] for i in range(self.args.per_kind) for k in kinds]


def packed_adapter(bb, kind: str, seed: int, args) -> bytes:
    from prefixserve.adapters.synthetic import random_adapter

    n = args.p if kind == "prefix" else args.q
    return random_adapter(
        bb.config, bb.fingerprint, kind=kind, num_virtual_tokens=n, seed=seed, labels=["label0", "label1"]
    )


def _same(x):
    return x


def _missing():
    raise RuntimeError("every adapter the bench asks for must be resident")


def memory(bb, adapters: Adapters, args) -> dict[str, dict]:
    """Per kind: packed bytes, body parameters, device bytes (total and without the head) in fp32 and bf16.

    The other dtype's numbers come from a second backbone of that dtype (the engine casts weight modules and
    virtual tokens to the serving dtype; heads stay fp32)."""
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine
    from prefixserve.adapters.format import load_packed
    from prefixserve.adapters.rowkinds import adapter_nbytes

    engines = {_name(bb.dtype): adapters.engine}
    for dt in ("float32", "bfloat16"):
        if dt not in engines:
            engines[dt] = Engine(load_backbone(bb.name, device=str(bb.device), dtype=dt), cache_bytes=2**62)
    out: dict[str, dict] = {}
    for kind, packed in adapters.first.items():
        body = load_packed(packed).body
        row: dict[str, Any] = {"packed_bytes": len(packed), "body_params": sum(t.numel() for t in body.values())}
        for dt, eng in engines.items():
            a = eng.to_device(f"mem/{kind}", packed)
            head = adapter_nbytes(a.head)
            row[f"device_bytes_{dt}"] = a.nbytes
            row[f"body_bytes_{dt}"] = a.nbytes - head
            row["head_bytes"] = head
        out[kind] = row
    del engines
    gc.collect()
    return out


# ---- variants: fn(rep) -> (one step per batch, rows served) ------------------------------------------------
Plan = Callable[[int], tuple[list[Callable[[], object]], int]]


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def backbone_variant(bb, head, mix: Mix, batch: int) -> Plan:
    """Tokenize + pack + encoder forward + one shared head on token 0: serving with no adapter at all."""
    encoder, tok = bb.encoder, bb.tokenizer

    @torch.inference_mode()
    def serve(texts: list[str]) -> None:
        enc = tok(texts)  # no padding: the stream holds real tokens only
        packed = encoder.pack(enc["input_ids"], enc.get("token_type_ids"))
        hidden = encoder(packed)  # (T, H)
        first = encoder.first_tokens(hidden, packed).float()  # (B, 1, H)
        head(first, encoder.pooler).cpu()  # (B, C): one device -> host copy, as the engine's

    def plan(rep: int):
        return [functools.partial(serve, mix.texts[lo:hi]) for lo, hi in _chunks(len(mix.texts), batch)], len(mix.texts)

    return plan


def engine_variant(adapters: Adapters, keys: list[str], mix: Mix, batch: int) -> Plan:
    """The engine; row j of repetition ``rep`` on ``keys[(rep*rows + j) % len(keys)]`` (cache hits, timed)."""
    from prefixserve.adapters.engine import Row

    eng, n = adapters.engine, len(mix.texts)

    def serve(rep: int, lo: int, hi: int) -> None:
        eng.forward([Row(adapters.get(keys[(rep * n + j) % len(keys)]), mix.texts[j]) for j in range(lo, hi)])

    def plan(rep: int):
        return [functools.partial(serve, rep, lo, hi) for lo, hi in _chunks(n, batch)], n

    return plan


def variants(adapters: Adapters, mix: Mix, args) -> tuple[dict[str, Plan], dict[str, list[str]]]:
    """The timed set, and each engine variant's adapter order."""
    orders = {"mixed-all-kinds": adapters.order(KINDS), "mixed-weight-kinds": adapters.order(WEIGHT_KINDS)}
    orders |= {f"only-{k}": adapters.keys[k] for k in KINDS}
    plans = {BASE: backbone_variant(adapters.bb, adapters.head, mix, args.batch)}
    plans |= {name: engine_variant(adapters, keys, mix, args.batch) for name, keys in orders.items()}
    return plans, orders


def composition(adapters: Adapters, keys: list[str], mix: Mix, reps: int, args) -> dict[str, Any]:
    """Rows of each kind over all repetitions, virtual tokens added per repetition, adapters per batch."""
    n = len(mix.texts)
    rows = {k: 0 for k in KINDS}
    per_batch = []
    for rep in range(reps):
        picked = [keys[(rep * n + j) % len(keys)] for j in range(n)]
        for key in picked:
            rows[key.split("/")[0]] += 1
        per_batch += [len(set(picked[lo:hi])) for lo, hi in _chunks(n, args.batch)]
    return {
        "rows_by_kind": {k: v for k, v in rows.items() if v},
        "prompt_tokens_per_rep": rows["prompt"] * args.q / reps,
        "prefix_keys_per_rep": rows["prefix"] * args.p / reps,
        "distinct_per_batch": statistics.median(per_batch),
    }


# ---- measurements ---------------------------------------------------------------------------------------
def measure(args) -> dict:
    from prefixserve.adapters.backbone import load_backbone, resolve_device, resolve_dtype

    common.quiet()
    name = args.backbone or str(common.synthetic_backbone_dir(args.shape, args.cache_dir))
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    bb = load_backbone(name, device=str(device), dtype=_name(dtype))
    t0 = time.perf_counter()
    adapters = Adapters(bb, args)
    load_s = time.perf_counter() - t0
    mem = memory(bb, adapters, args)
    mix = make_mix(bb.tokenizer, args.rows, median=args.median, max_len=args.max_len, seed=args.seed)
    warm = make_mix(bb.tokenizer, min(args.batch, 8), median=args.median, max_len=args.max_len, seed=args.seed + 99)
    plans, orders = variants(adapters, mix, args)
    for plan in variants(adapters, warm, args)[0].values():  # allocator, kernels, first-call paths
        for step in plan(0)[0]:
            step()
    timed = common.interleaved_steps(plans, args.reps, device, desc="kinds", progress=not args.no_progress)
    summary = common.summarize(timed, BASE)
    for vname, row in summary.items():
        row["tokens_per_s"] = mix.tokens / row["median_s"]
        extra = [(s - b) / len(mix.texts) for s, b in zip(timed[vname]["seconds"], timed[BASE]["seconds"])]
        row["extra_ms_per_row"] = statistics.median(extra) * 1e3  # incremental cost of a row over the floor
        if vname in orders:
            row |= composition(adapters, orders[vname], mix, args.reps, args)
        # per token the encoder actually ran (prompt tokens included): what is left once Q is paid for
        row["stream_ratio"] = row[_R] * (mix.tokens + row.get("prompt_tokens_per_rep", 0)) / mix.tokens
    cache = adapters.engine.cache.stats.to_dict()
    result = {
        "setup": {
            "backbone": name,
            "device": str(device),
            "dtype": _name(dtype),
            "per_kind": args.per_kind,
            "resident": len(KINDS) * args.per_kind,
            "p": args.p,
            "q": args.q,
            "batch": args.batch,
            "load_s": load_s,
            "head_bytes": adapters.head_bytes,
            "cache": cache,
        },
        "mix": mix.describe(),
        "memory": mem,
        "variants": summary,
        "timed": timed,
    }
    del adapters, plans
    gc.collect()
    return result


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def targets(result: dict) -> list[dict]:
    s, timed, mix = result["setup"], result["timed"], result["mix"]
    reps = len(timed[BASE]["seconds"])
    where = f"({s['dtype']}, {reps} reps, {mix['rows']} rows, {s['resident']} adapters)"
    prompt = result["variants"]["mixed-all-kinds"].get("prompt_tokens_per_rep", 0)
    ceiling = mix["tokens"] / (mix["tokens"] + prompt)  # zero overhead, but the prompt rows' Q tokens still run
    return [
        common.target(
            f"kinds: mixed all 5 kinds / backbone-only (same rows, one shared head) {where}",
            common.median_ratio(timed, "mixed-all-kinds", BASE),
            TARGET,
            note=f"prompt rows add {prompt / mix['tokens']:.0%} stream tokens (Q each): even at zero adapter overhead "
            f"this ratio is at most {ceiling:.3f}; per stream token it is "
            f"{result['variants']['mixed-all-kinds']['stream_ratio']:.3f}, see the per-kind table",
        )
    ]


def headline(result: dict) -> list[dict]:
    """Informative figures (not targets) for SUMMARY.md: the weight-kinds ratio and each kind's."""
    v = result["variants"]
    out = [
        {"name": "kinds: mixed weight kinds / backbone-only", "value": f"{v['mixed-weight-kinds'][_R]:.3f}x"},
        {
            "name": "kinds: mixed all kinds / backbone-only per stream token (prompt tokens counted)",
            "value": f"{v['mixed-all-kinds']['stream_ratio']:.3f}x",
        },
    ]
    for k in KINDS:
        row = v[f"only-{k}"]
        out.append(
            {
                "name": f"kinds: only {k} / backbone-only",
                "value": f"{row[_R]:.3f}x ({row['extra_ms_per_row']:+.2f} ms/row)",
            }
        )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        import json

        result = json.loads((out / f"{NAME}.json").read_text())
        result["targets"], result["headline"] = targets(result), headline(result)
        result["plots"] = plot(result, out)
        common.write_json(out, NAME, result)
        report(result, out)
        return result
    result = measure(args)
    result["machine"] = common.machine(torch.device(result["setup"]["device"]))
    result["command"] = "python -m bench.kinds " + " ".join(argv if argv is not None else sys.argv[1:])
    result["reps"] = args.reps
    result["targets"] = targets(result)
    result["headline"] = headline(result)
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = plot(result, out)
    common.write_json(out, NAME, result)
    report(result, out)
    print(f"\nkinds bench ({result['wall_s']:.0f} s) -> {out}/{NAME}.md")
    common.print_table(
        ["variant", "seq/s", "real tok/s", f"x {BASE}", "x per stream token", "extra ms/row"],
        [
            [
                k,
                f"{v['seqs_per_s']:.2f}",
                f"{v['tokens_per_s']:.0f}",
                f"{v[_R]:.3f}",
                f"{v['stream_ratio']:.3f}",
                f"{v['extra_ms_per_row']:+.2f}",
            ]
            for k, v in result["variants"].items()
        ],
    )
    print()
    common.print_table(
        ["kind", "packed", "device fp32", "device bf16", "body fp32", "body bf16"],
        [
            [k]
            + [_mib(m[f]) for f in ("packed_bytes", "device_bytes_float32", "device_bytes_bfloat16")]
            + [_mib(m["body_bytes_float32"]), _mib(m["body_bytes_bfloat16"])]
            for k, m in result["memory"].items()
        ],
    )
    print()
    common.print_table(
        ["target", "want", "measured", "status", "margin"], [common.fmt_target(t) for t in result["targets"]]
    )
    return result


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f} MiB"


if __name__ == "__main__":
    main()

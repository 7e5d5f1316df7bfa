"""Engine throughput: backbone-only vs mixed-adapter batches vs one-at-a-time vs HF PEFT switching.

    python -m bench.engine --quick      # <= 5 min on 2 CPU cores: distinct {1,10,100}
    python -m bench.engine              # headline: batch 32, 64 tokens, P=20, distinct {1,10,100,1000}
    python -m bench.engine --full       # the whole grid (hours on CPU; meant for a GPU box)

Each group (kind, P, batch, tokens) times, interleaved per repetition: the plain backbone (our packed
encoder with no adapter and no head: tokenize + pack + forward), the engine on batches mixed over N
distinct adapters (N=1 is "one adapter for the whole batch"), the engine one request at a time, and
PEFT with ``set_adapter`` per tenant group.
All throughput ratios are medians of per-repetition ratios. Adapters beyond ``--adapters`` (or what
``--max-resident-gb`` allows) are NOT resident: that is the cache-thrash case (misses load packed
bytes held in host memory). ``--dtype auto`` (default) serves as the server does: bf16 on CUDA, fp32 on a
CPU without native bf16. "useful MFU": real tokens/s x ``flops_per_token`` / the device's dense peak
(known GPUs, or ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from . import common
from .engine_report import plot, report
from .workloads import AdapterSet, PeftServer, backbone_only, batch_texts, mixed, one_at_a_time

HEADLINE = dict(p=20, batch=32, tokens=64)  # the targets are stated at this setting


def headline(args) -> dict:
    """HEADLINE when the grid has it, else the nearest setting that was run (smoke tests run tiny ones)."""
    pick = lambda key, values: HEADLINE[key] if HEADLINE[key] in values else values[-1]  # noqa: E731
    return {"p": pick("p", args.p), "batch": pick("batch", args.batch), "tokens": pick("tokens", args.tokens)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument(
        "--full",
        action="store_true",
        help="full grid: P {10,20,50,200} x batch {1,8,32} x tokens {64,128} x kinds, distinct up to 10,000",
    )
    p.add_argument("--kinds", nargs="+", default=["prefix", "prompt"], choices=["prefix", "prompt"])
    p.add_argument("--p", type=int, nargs="+", default=None, help="virtual token counts (default 20)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 32)")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per text (default 64)")
    p.add_argument(
        "--distinct",
        type=int,
        nargs="+",
        default=None,
        help="distinct adapters per run (default 1 10 100 1000; quick 1 10 100)",
    )
    p.add_argument(
        "--peft-tenants",
        type=int,
        nargs="+",
        default=None,
        help="PEFT tenant counts (default 1 10 100; [] with --no-peft)",
    )
    p.add_argument("--no-peft", action="store_true", help="skip the HF PEFT baseline")
    p.add_argument("--no-one-at-a-time", action="store_true", help="skip the one-request-at-a-time variant")
    p.add_argument(
        "--adapters",
        type=int,
        default=1000,
        help="most adapters kept resident (larger --distinct values thrash the LRU cache)",
    )
    p.add_argument(
        "--max-resident-gb",
        type=float,
        default=4.5,
        help="RAM/VRAM cap for resident adapters; lowers --adapters for large P",
    )
    p.add_argument("--no-profile", action="store_true", help="skip the phase breakdown and torch.profiler table")
    p.add_argument(
        "--dtype", default="auto", help="serving dtype: auto (as served: bf16 on CUDA, fp32 on this CPU) | ..."
    )
    common.add_peak_arg(p)
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite engine.md and the PNGs from <out>/engine.json",
    )
    args = p.parse_args(argv)
    if args.full:
        args.p, args.batch, args.tokens = (
            args.p or [10, 20, 50, 200],
            args.batch or [1, 8, 32],
            args.tokens or [64, 128],
        )
        args.distinct = args.distinct or [1, 10, 100, 1000, 10000]
    args.p, args.batch, args.tokens = args.p or [20], args.batch or [32], args.tokens or [64]
    args.distinct = sorted(args.distinct or ([1, 10, 100] if args.quick else [1, 10, 100, 1000]))
    args.peft_tenants = [] if args.no_peft else sorted(args.peft_tenants or ([100] if args.quick else [1, 10, 100]))
    args.reps = args.reps or (3 if args.quick else 5)
    args.warmup = 0 if args.quick else 1  # quick: the median of 3 already drops one cold first call
    return args


def run_group(bb, name: str, args, kind: str, p: int, batch: int, tokens: int, texts_by_len: dict) -> dict:
    """Time every variant of one (kind, P, batch, tokens) setting side by side."""
    progress = not args.no_progress
    texts = texts_by_len[tokens]
    probe = AdapterSet(bb, kind, p, resident=0, pool=1, progress=False)
    cap = min(args.adapters, int(args.max_resident_gb * 2**30 // probe.adapter_bytes))
    resident = min(max(args.distinct), cap)
    # The targets are about prefixes; outside --full the prompt group is trimmed to fit the time budget
    # (default: no one-at-a-time, PEFT at the largest tenant count only; quick: mixed-1/-max only).
    secondary = kind == "prompt" and not args.full
    quick_prompt = secondary and args.quick
    peft_n = [n for n in args.peft_tenants if n <= resident]
    peft_n = [] if quick_prompt else (peft_n[-1:] if secondary else peft_n)
    aset = AdapterSet(bb, kind, p, resident=resident, progress=progress, keep_packed=max(peft_n, default=0))
    variants = {"backbone-only": backbone_only(bb, texts, batch)}
    for d in args.distinct:
        if not quick_prompt or d in (1, max(args.distinct)):
            variants[f"mixed-{d}"] = mixed(aset, texts, batch, d)
    top = max(d for d in args.distinct if d <= resident) if any(d <= resident for d in args.distinct) else 1
    if batch > 1 and not secondary and not args.no_one_at_a_time:
        variants[f"one-at-a-time-{top}"] = one_at_a_time(aset, texts, batch, top)
    peft = PeftServer(name, bb, aset.kept, progress=progress) if peft_n else None
    if peft is not None:
        for n in peft_n:
            variants[f"peft-{n}"] = peft.variant(texts, batch, n)
    aset.kept.clear()
    timed = common.interleaved(
        variants, args.reps, bb.device, desc=f"{kind} P={p} b={batch} t={tokens}", progress=progress, warmup=args.warmup
    )
    summary = common.summarize(timed, "backbone-only")
    stats = aset.engine.cache.stats.to_dict()
    if peft is not None:
        peft.close()
    result = {
        "kind": kind,
        "p": p,
        "batch": batch,
        "tokens": tokens,
        "resident_cap": resident,
        "adapter_bytes": aset.adapter_bytes,
        "packed_bytes": aset.packed_bytes,
        "cache": stats,
        "variants": summary,
        "timed": timed,
    }
    if peft_n and 100 in peft_n and "mixed-100" in timed:
        result["mixed100_vs_peft100"] = common.median_ratio(timed, "mixed-100", "peft-100")
    hi = max(d for d in args.distinct)
    if "mixed-10" in timed and hi > 10:
        result["mixed_hi_vs_10"] = {"hi": hi, "ratio": common.median_ratio(timed, f"mixed-{hi}", "mixed-10")}
    del aset, peft, variants
    gc.collect()
    return result


# ---- where the time goes -------------------------------------------------------------------------------
def profile(bb, args, texts: list[str]) -> dict:
    """Phase breakdown (interleaved, median) of backbone-only vs the engine at the headline setting,
    plus a torch.profiler top-ops table for one call of each."""
    from prefixserve.adapters.engine import Row

    h = headline(args)
    batch, p = h["batch"], h["p"]
    distinct = min(max(args.distinct), batch)  # every row a different adapter
    aset = AdapterSet(bb, "prefix", p, resident=distinct, progress=False)
    eng, dev, tok, encoder = aset.engine, bb.device, bb.tokenizer, bb.encoder
    phases: dict[str, list[float]] = {}

    now = time.perf_counter if dev.type == "cuda" else time.process_time  # same clock choice as interleaved()

    def clock(label, fn):
        common.sync(dev)
        t = now()
        out = fn()
        common.sync(dev)
        phases.setdefault(label, []).append(now() - t)
        return out

    @torch.inference_mode()
    def plain(rows):
        enc = clock("backbone: tokenize", lambda: tok([r.text for r in rows]))
        packed = clock("backbone: pack", lambda: encoder.pack(enc["input_ids"], enc.get("token_type_ids")))
        clock("backbone: forward", lambda: encoder(packed))  # (T, H)

    @torch.inference_mode()
    def once(rep):
        rows = [Row(aset.get(j % distinct), t) for j, t in enumerate(batch_texts(texts, rep, batch))]
        if rep % 2 == 0:  # alternate which side runs first, so drift does not favour one
            plain(rows)
        # engine, step by step as Engine.forward does it
        ids, types, _ = clock("engine: tokenize", lambda: eng._tokenize(rows))
        packed, groups = clock("engine: pack + gather K/V", lambda: eng.pack(rows, ids, types))
        bare = encoder.pack(ids, types)  # the same rows without prefixes (not timed: its pack is the backbone's)
        clock("engine: encode, no virtual tokens", lambda: encoder(bare))  # (T, H)
        hidden = clock("engine: encode with prefixes", lambda: encoder(packed))  # (T, H)
        clock("engine: heads", lambda: eng.heads(rows, hidden, packed, groups))
        if rep % 2 != 0:
            plain(rows)

    reps = 1 if args.quick else 3
    for rep in range(-1, reps):
        once(rep)
    median_phases = {k: statistics.median(v[1:]) for k, v in phases.items()}  # first call is warm-up

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    tables = {}
    for label, fn in (
        ("backbone-only", backbone_only(bb, texts, batch)),
        ("mixed", mixed(aset, texts, batch, distinct)),
    ):
        with torch_profile(activities=acts) as prof:
            fn(0)
        tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40)
    return {**h, "distinct_in_batch": distinct, "phases_s": median_phases, "torch_profiler": tables}


# ---- report -------------------------------------------------------------------------------------------
def targets(groups: list[dict], args) -> list[dict]:
    h = headline(args)
    head = [g for g in groups if g["kind"] == "prefix" and all(g[k] == v for k, v in h.items())]
    if not head:
        return []
    g, out = head[0], []
    hi = max(args.distinct)
    ratio = g["variants"][f"mixed-{hi}"]["ratio_vs_backbone-only"]
    where = f"(b{h['batch']}, t{h['tokens']}, P{h['p']})"
    out.append(
        common.target(
            f"mixed {hi} prefixes / backbone-only {where}",
            ratio,
            0.97,
            note="" if hi >= 1000 else f"quick run: {hi} distinct stands in for 1,000",
        )
    )
    if "mixed100_vs_peft100" in g:
        out.append(common.target(f"mixed-100 / PEFT switching at 100 tenants {where}", g["mixed100_vs_peft100"], 1.4))
    if "mixed_hi_vs_10" in g:
        drop = (1 - g["mixed_hi_vs_10"]["ratio"]) * 100
        out.append(
            common.target(
                f"throughput drop 10 -> {g['mixed_hi_vs_10']['hi']} active adapters {where}",
                drop,
                3.0,
                higher_is_better=False,
                unit="%",
            )
        )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        import json

        result = json.loads((out / "engine.json").read_text())
        result["plots"] = plot(result, out)
        report(result, out)
        return result
    bb, name = common.load_bench_backbone(args)
    texts_by_len = {t: common.make_texts(bb.tokenizer, 128, t) for t in args.tokens}
    groups = []
    for kind in args.kinds:
        for p in args.p:
            for batch in args.batch:
                for tokens in args.tokens:
                    groups.append(run_group(bb, name, args, kind, p, batch, tokens, texts_by_len))
    from prefixserve.adapters.encoder import flops_per_token

    flops = flops_per_token(bb.config)
    peak, peak_source = common.peak_tflops(bb.device, bb.dtype, args.peak_tflops)
    for g in groups:  # every text is exactly g["tokens"] real tokens: no padding anywhere in the packed stream
        for v in g["variants"].values():
            v["tokens_per_s"] = v["seqs_per_s"] * g["tokens"]
            v["useful_mfu"] = common.useful_mfu(v["tokens_per_s"], flops, peak)
    result = {
        "machine": common.machine(bb.device),
        "command": "python -m bench.engine " + " ".join(argv or sys.argv[1:]),
        "backbone": name,
        "dtype": str(bb.dtype).removeprefix("torch."),
        "flops_per_token": flops,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "reps": args.reps,
        "distinct": args.distinct,
        "groups": groups,
    }
    if not args.no_profile:
        result["profile"] = profile(bb, args, texts_by_len[headline(args)["tokens"]])
    result["targets"] = targets(groups, args)
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = plot(result, out)
    common.write_json(out, "engine", result)
    report(result, out)
    # short table last
    print(f"\nengine bench ({result['wall_s']:.0f} s) -> {out}/engine.md")
    common.print_table(
        ["group", "variant", "seq/s", "x backbone", "useful MFU"],
        [
            [
                f"{g['kind']} P{g['p']} b{g['batch']} t{g['tokens']}",
                n,
                f"{v['seqs_per_s']:.2f}",
                f"{v['ratio_vs_backbone-only']:.3f}",
                "-" if v["useful_mfu"] is None else f"{v['useful_mfu']:.1%}",
            ]
            for g in groups
            for n, v in g["variants"].items()
        ],
    )
    if result["targets"]:
        print()
        common.print_table(
            ["target", "want", "measured", "status", "margin"], [common.fmt_target(t) for t in result["targets"]]
        )
    return result


if __name__ == "__main__":
    main()

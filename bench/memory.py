"""Adapter memory: bytes per resident adapter, adapters per budget, and throughput when the cache thrashes.

    python -m bench.memory --quick     # <= 5 min on 2 CPU cores
    python -m bench.memory             # more repetitions

1. For prefix and prompt adapters at P in {10, 20, 50, 200}: raw tensor bytes in the packed file,
   the packed file size, the engine's accounted ``DeviceAdapter.nbytes`` (what the LRU budget counts)
   and the memory actually taken per adapter (CUDA allocated bytes, or process RSS on CPU, over
   ``--sample`` adapters). From those, how many adapters fit a 1 GiB and an 8 GiB budget (checked
   against :class:`AdapterCache`'s own accounting).
2. Cache thrash: batch 32 x 64 tokens, prefix P=20, ``--hot`` adapters requested round-robin
   through a cache with room for ``--fit`` of them (every lookup misses: LRU's worst order), each miss
   loading packed bytes held in host memory; vs the same stream with all hot adapters resident.
   Interleaved per repetition; the ratio is the median of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

from . import common
from .workloads import AdapterSet, backbone_only, in_memory, mixed, random_packed, raw_tensor_bytes

BUDGETS_GIB = (1, 8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.memory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--p", type=int, nargs="+", default=[10, 20, 50, 200], help="virtual token counts to size")
    p.add_argument("--sample", type=int, default=16, help="adapters loaded to measure real bytes per adapter")
    p.add_argument("--fit", type=int, default=50, help="thrash case: adapters the cache budget holds")
    p.add_argument("--hot", type=int, default=200, help="thrash case: adapters requested round-robin")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 5)
    return args


def _storage_bytes(adapter) -> int:
    """Bytes of the distinct storages a DeviceAdapter keeps alive (a view into a larger buffer
    would keep the whole buffer: this is what residency really costs, whatever ``nbytes`` says)."""
    tensors = [adapter.virtual] + list(adapter.head.parameters()) + list(adapter.head.buffers())
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _cuda_allocated(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def sizes(bb, args) -> list[dict]:
    """Bytes per adapter (file, raw tensors, accounted, measured) and adapters per budget."""
    from prefixserve.adapters.cache import AdapterCache
    from prefixserve.adapters.engine import Engine

    rows = []
    for kind in ("prefix", "prompt"):
        for p in args.p:
            packed = [random_packed(bb, kind, p, seed=i) for i in range(args.sample)]
            engine = Engine(bb, cache_bytes=2**62)
            cuda = bb.device.type == "cuda"
            before = _cuda_allocated(bb.device) if cuda else 0
            loaded = [engine.adapter(f"t{i}", in_memory(data)) for i, data in enumerate(packed)]
            if cuda:  # everything the copies allocated on the GPU
                measured = (_cuda_allocated(bb.device) - before) / args.sample
            else:  # RSS is useless here (the allocator reuses freed blocks): count kept-alive storages
                measured = sum(_storage_bytes(a) for a in loaded) / args.sample
            del loaded
            accounted = engine.cache.stats.resident_bytes / args.sample
            fits = {}
            for gib in BUDGETS_GIB:  # the cache's own accounting decides, not our arithmetic
                want = int(gib * 2**30 // accounted)
                if want > 50_000:  # tiny smoke-test shapes: too many entries to fill, use the arithmetic
                    fits[f"{gib}GiB"] = want
                    continue
                cache: AdapterCache[str, int] = AdapterCache(gib * 2**30, lambda n: n)
                for i in range(want + 5):  # every key is new: each get() is a miss that inserts
                    cache.get(f"k{i}", partial(int, accounted))
                fits[f"{gib}GiB"] = len(cache)
            rows.append(
                {
                    "kind": kind,
                    "p": p,
                    "packed_bytes": len(packed[0]),
                    "raw_tensor_bytes": raw_tensor_bytes(packed[0]),
                    "device_bytes": accounted,
                    "measured_bytes": measured,
                    "virtual_bytes": p
                    * (bb.config.num_hidden_layers * 2 if kind == "prefix" else 1)
                    * bb.config.hidden_size
                    * torch.finfo(bb.dtype).bits
                    // 8,
                    "fits": fits,
                    "measured_via": "cuda.memory_allocated delta"
                    if bb.device.type == "cuda"
                    else "kept-alive tensor storages",
                }
            )
            del engine, packed
            gc.collect()
    return rows


def miss_cost(bb, aset: AdapterSet, reps: int) -> dict:
    """Median seconds of one miss, split: parse + validate (load_packed) and device copy (to_device)."""
    from prefixserve.adapters.format import load_packed

    now = time.perf_counter if bb.device.type == "cuda" else time.process_time  # as interleaved() chooses
    parse, copy = [], []
    for i in range(max(reps * 4, 8)):
        data = aset.pool[i % len(aset.pool)]
        common.sync(bb.device)
        t0 = now()
        file = load_packed(data, expect=bb.spec)
        t1 = now()
        aset.engine.to_device("probe", file)
        common.sync(bb.device)
        t2 = now()
        parse.append(t1 - t0)
        copy.append(t2 - t1)
    return {"load_packed_s": statistics.median(parse), "to_device_s": statistics.median(copy)}


def thrash(bb, args) -> dict:
    progress = not args.no_progress
    texts = common.make_texts(bb.tokenizer, 128, args.tokens)
    small = AdapterSet(bb, "prefix", 20, resident=args.fit, pool=args.hot, progress=progress)
    full = AdapterSet(bb, "prefix", 20, resident=args.hot, progress=progress)
    variants = {
        "backbone-only": backbone_only(bb, texts, args.batch),
        f"all-resident ({args.hot} hot)": mixed(full, texts, args.batch, args.hot),
        f"thrash ({args.hot} hot, room for {args.fit})": mixed(small, texts, args.batch, args.hot),
    }
    timed = common.interleaved(variants, args.reps, bb.device, desc="thrash vs resident", progress=progress)
    names = list(variants)
    calls = args.reps + 1  # + warm-up
    out = {
        "fit": args.fit,
        "hot": args.hot,
        "batch": args.batch,
        "tokens": args.tokens,
        "variants": common.summarize(timed, "backbone-only"),
        "thrash_vs_resident": common.median_ratio(timed, names[2], names[1]),
        "thrash_cache": small.engine.cache.stats.to_dict(),
        "resident_cache": full.engine.cache.stats.to_dict(),
        "misses_per_batch": small.engine.cache.stats.misses / calls,
        "miss_cost": miss_cost(bb, small, args.reps),
    }
    del small, full
    gc.collect()
    return out


def report(result: dict, out: Path) -> None:
    lines = [
        "# Adapter memory",
        "",
        f"Machine: {common.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}` (wall {result['wall_s']:.0f} s)",
        "",
        "## Bytes per resident adapter (fp32, klue/roberta-base shape unless noted)",
        "",
        "`device` is what the engine accounts (`DeviceAdapter.nbytes`, the LRU budget unit); "
        "`measured` is the real growth per adapter ("
        + result["sizes"][0]["measured_via"]
        + f", averaged over {result['sample']} adapters).",
        "",
    ]
    rows = [
        [
            s["kind"],
            s["p"],
            f"{s['raw_tensor_bytes'] / 2**20:.2f}",
            f"{s['packed_bytes'] / 2**20:.2f}",
            f"{s['device_bytes'] / 2**20:.2f}",
            f"{s['measured_bytes'] / 2**20:.2f}",
            f"{s['device_bytes'] / s['raw_tensor_bytes']:.3f}",
            f"{s['virtual_bytes'] / s['device_bytes']:.0%}",
            s["fits"]["1GiB"],
            s["fits"]["8GiB"],
        ]
        for s in result["sizes"]
    ]
    lines += [
        common.md_table(
            [
                "kind",
                "P",
                "raw tensors MiB",
                "packed file MiB",
                "device MiB",
                "measured MiB",
                "device / raw",
                "virtual share",
                "fit 1 GiB",
                "fit 8 GiB",
            ],
            rows,
        ),
        "",
    ]
    t = result["thrash"]
    mc = t["miss_cost"]
    lines += [
        f"## Cache thrash: {t['hot']} hot adapters round-robin, room for {t['fit']} "
        f"(prefix P=20, batch {t['batch']}, {t['tokens']} tokens)",
        "",
    ]
    lines += [
        common.md_table(
            ["variant", "seq/s", "x backbone-only"],
            [[n, f"{v['seqs_per_s']:.2f}", f"{v['ratio_vs_backbone-only']:.3f}"] for n, v in t["variants"].items()],
        ),
        "",
        f"**thrash / all-resident: {t['thrash_vs_resident']:.3f}x** (median of per-repetition ratios, "
        f"{next(iter(t['variants'].values()))['clock']} clock); "
        f"{t['misses_per_batch']:.1f} misses per batch of {t['batch']}; one miss costs "
        f"{mc['load_packed_s'] * 1e3:.1f} ms parse+validate + {mc['to_device_s'] * 1e3:.1f} ms to device.",
        "",
    ]
    common.write_markdown(out, "memory", "\n".join(lines))


def plot(result: dict, out: Path) -> str:
    series = {}
    for kind in ("prefix", "prompt"):
        pts = [s for s in result["sizes"] if s["kind"] == kind]
        series[f"{kind}: adapters in 1 GiB"] = ([s["p"] for s in pts], [s["fits"]["1GiB"] for s in pts])
        series[f"{kind}: adapters in 8 GiB"] = ([s["p"] for s in pts], [s["fits"]["8GiB"] for s in pts])
    path = out / "memory_fit.png"
    common.plot_lines(
        path,
        series,
        xlabel="virtual tokens P",
        ylabel="resident adapters",
        title="Adapters that fit a device budget (fp32, with per-adapter head)",
    )
    return str(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bb, name = common.load_bench_backbone(args)
    result = {
        "machine": common.machine(bb.device),
        "command": "python -m bench.memory " + " ".join(argv or sys.argv[1:]),
        "backbone": name,
        "sample": args.sample,
        "reps": args.reps,
        "sizes": sizes(bb, args),
    }
    result["thrash"] = thrash(bb, args)
    t = result["thrash"]
    result["headline"] = [
        {
            "name": f"thrash ({t['hot']} hot, room for {t['fit']}) / all-resident",
            "value": f"{t['thrash_vs_resident']:.3f}x",
        },
    ] + [
        {
            "name": f"{s['kind']} P={s['p']}: device MiB / adapters in 1 GiB / 8 GiB",
            "value": f"{s['device_bytes'] / 2**20:.2f} / {s['fits']['1GiB']} / {s['fits']['8GiB']}",
        }
        for s in result["sizes"]
        if s["p"] == 20
    ]
    result["targets"] = []
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = [plot(result, out)]
    common.write_json(out, "memory", result)
    report(result, out)
    print(f"\nmemory bench ({result['wall_s']:.0f} s) -> {out}/memory.md")
    common.print_table(
        ["kind", "P", "raw MiB", "device MiB", "measured MiB", "fit 1GiB", "fit 8GiB"],
        [
            [
                s["kind"],
                s["p"],
                f"{s['raw_tensor_bytes'] / 2**20:.2f}",
                f"{s['device_bytes'] / 2**20:.2f}",
                f"{s['measured_bytes'] / 2**20:.2f}",
                s["fits"]["1GiB"],
                s["fits"]["8GiB"],
            ]
            for s in result["sizes"]
        ],
    )
    print(
        f"\nthrash / all-resident: {t['thrash_vs_resident']:.3f}x ({t['misses_per_batch']:.1f} misses/batch, "
        f"miss = {t['miss_cost']['load_packed_s'] * 1e3:.1f} ms parse + "
        f"{t['miss_cost']['to_device_s'] * 1e3:.1f} ms copy)"
    )
    return result


if __name__ == "__main__":
    main()

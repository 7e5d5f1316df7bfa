"""Where an engine batch spends its time: tokenize / pack / encoder / heads, and the top operators.

    python -m bench.gpu_profile [--device cuda] [--batch 256] [--kinds prefix lora ...]

The realistic mix (:mod:`bench.mix`, median 18 tokens) in arrival batches, served by our engine in the
auto dtype with ``--adapters`` distinct adapters of the given kinds (round-robin over rows). Each stage
(the engine's own ``_tokenize``, ``pack``, encoder, ``heads``) is timed with a device sync before and after,
so the stages add up to a batch (on CUDA the forward is
otherwise asynchronous). Then ``torch.profiler`` over a few batches prints the operators by self CPU time
and by device time: on a GPU, a batch that is launch- or host-bound shows up as CPU time far above
device time. Written for the GPU check (``bench.gpu_check``), runs anywhere.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import common
from .mix import make_mix


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_profile", description=__doc__)
    common.add_common_args(p)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--adapters", type=int, default=200)
    p.add_argument("--kinds", nargs="+", default=["prefix"], help="adapter kinds, round-robin over the adapters")
    p.add_argument("--dtype", default="auto")
    args = p.parse_args(argv)
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.adapters.synthetic import random_adapter

    common.quiet()
    name = args.backbone or str(common.synthetic_backbone_dir(args.shape, args.cache_dir))
    bb = load_backbone(name, device=args.device, dtype=args.dtype)
    engine = Engine(bb, cache_bytes=2**62)
    adapters = []
    for i in range(args.adapters):
        kind = args.kinds[i % len(args.kinds)]
        data = random_adapter(bb.config, bb.fingerprint, kind=kind, num_virtual_tokens=20, seed=i)
        adapters.append(engine.adapter(f"a{i}", functools.partial(lambda d: d, data)))
    mix = make_mix(bb.tokenizer, args.rows, seed=0)
    batches = [
        [Row(adapters[j % len(adapters)], t) for j, t in enumerate(mix.texts[lo : lo + args.batch], start=lo)]
        for lo in range(0, len(mix.texts), args.batch)
    ]
    dev = bb.device
    tokenizer: Any = bb.tokenizer  # a transformers tokenizer (untyped on Backbone)
    stages: dict[str, list[float]] = {k: [] for k in ("tokenize", "pack", "encoder", "heads", "total")}

    def clock() -> float:
        common.sync(dev)
        return time.perf_counter()

    @torch.inference_mode()
    def staged(rows: list[Row]) -> None:
        t0 = clock()
        ids, types, _ = engine._tokenize(rows)
        t1 = clock()
        batch, groups = engine.pack(rows, ids, types)
        t2 = clock()
        hidden = engine.encoder(batch)
        t3 = clock()
        engine.heads(rows, hidden, batch, groups)
        t4 = clock()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
            stages[k].append(v * 1e3)

    for rows in batches[:2]:  # warm-up: kernels chosen, allocator settled
        engine.forward(rows)
    for _ in range(3):
        for rows in batches:
            staged(rows)
    end_to_end = []
    for rows in batches:
        t0 = clock()
        engine.forward(rows)
        end_to_end.append((clock() - t0) * 1e3)
    result: dict = {
        "machine": common.machine(dev),
        "dtype": str(bb.dtype),
        "batch": args.batch,
        "kinds": args.kinds,
        "ms_per_batch_median": {k: round(statistics.median(v), 3) for k, v in stages.items()},
        "engine_forward_ms_median": round(statistics.median(end_to_end), 3),
        "tokens_per_batch": round(sum(len(x) for x in tokenizer(mix.texts)["input_ids"]) / len(batches)),
    }
    print(json.dumps(result["ms_per_batch_median"], indent=1), "engine.forward ms:", result["engine_forward_ms_median"])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for rows in batches[:4]:
            engine.forward(rows)
        common.sync(dev)
    tables = {"cpu": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)}
    if dev.type == "cuda":
        tables["device"] = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20)
    for k, t in tables.items():
        print(f"\n=== top operators by self {k} time (4 batches)\n{t}")
    result["profile"] = tables
    Path(args.out).mkdir(parents=True, exist_ok=True)
    common.write_json(args.out, f"gpu_profile_{'_'.join(args.kinds)}", result)
    return result


if __name__ == "__main__":
    main()

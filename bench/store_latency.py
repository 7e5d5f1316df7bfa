"""Adapter store put/get/head latency (p50/p99) for a P=20 klue/roberta-base-shape prefix adapter.

The adapter is a real packed file: prefix K/V (20, 12*2*768) fp32 + RoBERTa head 768x768 + 768x2
(~3.8 MB). ``put`` includes validation (``format.inspect_packed``), sha256, and the durable publish
(fsync on file://, Lua script on redis://). Redis is a private ``redis-server`` on loopback
(``--appendonly yes --appendfsync everysec``) unless ``--redis-url`` is given.

    python bench/store_latency.py [--quick] [--redis-url redis://127.0.0.1:6379/0]

Writes bench/results/store_latency.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_adapter(p: int = 20, labels=("neg", "pos")) -> bytes:
    """A P=20 prefix adapter at klue/roberta-base's shape (RobertaConfig's defaults: 12 x 768, 12 heads)."""
    from transformers import RobertaConfig

    from prefixserve.adapters.synthetic import random_adapter

    return random_adapter(RobertaConfig(), "sha256:bench-klue-roberta-base", num_virtual_tokens=p, labels=labels)


def start_redis(workdir: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    from prefixserve.server.app import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            workdir,
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, f"redis://127.0.0.1:{port}/0?prefix=bench:"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def percentiles(samples: list[float]) -> dict:
    s = sorted(samples)

    def pick(q):
        return s[min(len(s) - 1, int(round(q * (len(s) - 1))))] * 1e3

    return {
        "n": len(s),
        "p50_ms": round(pick(0.50), 3),
        "p99_ms": round(pick(0.99), 3),
        "mean_ms": round(sum(s) / len(s) * 1e3, 3),
    }


def cold_loader(fingerprint: str):
    """store bytes -> validated, device-resident adapter, exactly as ``Engine.to_device`` does it.

    ``Engine.to_device`` only needs the backbone's spec, device, dtype and shape, so a stand-in with
    klue/roberta-base's spec is enough (no 500 MB model load for a latency bench).
    """
    from types import SimpleNamespace
    from typing import cast

    import torch

    from prefixserve.adapters.engine import Engine
    from prefixserve.adapters.format import BackboneSpec

    spec = BackboneSpec(
        fingerprint, num_layers=12, num_heads=12, hidden=768, head_style="roberta", max_virtual_tokens=504
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    engine = SimpleNamespace(
        backbone=SimpleNamespace(spec=spec), device=device, dtype=torch.float32, _layers=12, _heads=12
    )
    # The stand-in is duck-typed: it has exactly the attributes to_device reads, nothing else.
    return lambda key, data: Engine.to_device(cast(Engine, engine), key, data)


def bench_store(name: str, url: str, data: bytes, n_put: int, n_get: int, progress) -> dict:
    from prefixserve.adapters.format import inspect_packed
    from prefixserve.adapters.store import open_store

    to_device = cold_loader(inspect_packed(data).fingerprint)

    store = open_store(url)
    try:
        store.delete_tenant("bench")
    except Exception:
        pass
    store.create_tenant("bench", None)
    timings: dict[str, list[float]] = {"put": [], "get": [], "head": [], "cold": []}
    with progress(total=n_put + 3 * n_get, desc=name, leave=False) as bar:
        for _ in range(n_put):
            t0 = time.perf_counter()
            store.put("bench", "sentiment", data)
            timings["put"].append(time.perf_counter() - t0)
            bar.update()
        calls = {
            "get": lambda: store.get("bench", "sentiment"),
            "head": lambda: store.head("bench", "sentiment"),
            # cold load: store -> validated against the backbone -> K/V + head on the device
            "cold": lambda: to_device("bench/sentiment", store.get("bench", "sentiment")[1]),
        }
        for op, call in calls.items():
            for _ in range(n_get):
                t0 = time.perf_counter()
                call()
                timings[op].append(time.perf_counter() - t0)
                bar.update()
    store.delete_tenant("bench")
    store.close()
    return {op: percentiles(v) for op, v in timings.items()}


def bench_machine() -> dict:
    """The shared machine description (CPU model, cores, load, torch/transformers versions, git)."""
    import torch

    from bench.common import machine

    return machine(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few iterations (smoke run)")
    ap.add_argument("--redis-url", help="use this Redis instead of starting a private redis-server")
    ap.add_argument("--file-root", help="directory for the file store (default: a temp dir)")
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "store_latency.json"))
    args = ap.parse_args(argv)
    from tqdm import tqdm

    n_put, n_get = (10, 50) if args.quick else (100, 500)
    data = make_adapter()
    from prefixserve.adapters.format import inspect_packed

    inspect_packed(data)  # warm-up (first call pays imports and allocator growth)
    t0 = time.perf_counter()
    for _ in range(5):
        inspect_packed(data)
    validate_ms = (time.perf_counter() - t0) / 5 * 1e3

    tmp = tempfile.mkdtemp(prefix="store-bench-")
    proc = None
    try:
        redis_url = args.redis_url
        if not redis_url:
            proc, redis_url = start_redis(tmp)
        results = {
            "file": bench_store(
                "file", f"file://{args.file_root or os.path.join(tmp, 'file-store')}", data, n_put, n_get, tqdm
            ),
            "redis": bench_store("redis", redis_url, data, n_put, n_get, tqdm),
        }
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "adapter": {
            "shape": "P=20 prefix, klue/roberta-base (12 layers, hidden 768), roberta head, 2 labels",
            "bytes": len(data),
        },
        "validate_ms": round(validate_ms, 3),
        "quick": args.quick,
        "results": results,
        "targets": [
            {
                "name": f"cold load store->device p99 ({b})",
                "measured": results[b]["cold"]["p99_ms"],
                "threshold": 5.0,
                "op": "<=",
                "unit": "ms",
                "met": results[b]["cold"]["p99_ms"] <= 5.0,
                "margin": 5.0 - results[b]["cold"]["p99_ms"],
                "note": "get + validate + to device",
            }
            for b in results
        ],
        "machine": bench_machine(),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"adapter {len(data) / 2**20:.2f} MiB; validation alone {validate_ms:.1f} ms (included in put)")
    print(f"{'backend':8} {'op':5} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}")
    for backend, ops in results.items():
        for op, r in ops.items():
            print(f"{backend:8} {op:5} {r['n']:>5} {r['p50_ms']:>9.2f} {r['p99_ms']:>9.2f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())

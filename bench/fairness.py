"""Fairness under a flood: a bystander tenant's latency while another tenant sends maximum-size requests.

    python -m bench.fairness [--quick] [--shape tiny|small|klue] [--flooders N] [--flood-inputs 64]

One run, the real Ray Serve app on loopback, a file store, one Worker replica. For each batching policy
(``fair``: per-tenant deficit round-robin by tokens, the default; ``fifo``: arrival order, as
``@serve.batch`` did before) the app is deployed afresh and:

* **idle**: the bystander sends ``--probes`` sequential one-row requests of a short text, alone: p50/p95.
* **flood**: ``--flooders`` closed-loop clients of another tenant each send ``--flood-inputs`` rows of
  ``--flood-tokens`` tokens per request, without pause; meanwhile the bystander repeats its probes.

The target (issue #11): bystander p50 under flood <= 2x its idle p50, with fair batching. Rate limits
are off for the flooder here (they would hide the batching policy); the 429 path is tested elsewhere.
Writes ``<out>/fairness.json`` and ``<out>/fairness.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import common


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.fairness", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument("--flooders", type=int, default=12, help="parallel clients of the flooding tenant")
    p.add_argument("--flood-inputs", type=int, default=64, help="rows per flood request (the server's max)")
    p.add_argument("--flood-tokens", type=int, default=128, help="tokens per flood row")
    p.add_argument("--probes", type=int, default=None, help="bystander requests per phase (quick 30)")
    p.add_argument("--phase-seconds", type=float, default=None, help="cap on the flood phase (quick 60 s)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="estimated tokens per forward")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the Worker")
    p.add_argument("--target-batch-ms", type=float, default=None, help="the Worker's forward-time target")
    p.add_argument("--policies", default="fair,fifo", help="comma list of fair | fifo")
    args = p.parse_args(argv)
    args.probes = args.probes or (30 if args.quick else 100)
    args.phase_seconds = args.phase_seconds or (60.0 if args.quick else 300.0)
    return args


def pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def probe(url: str, key: str, prefix: str, text: str, n: int, seconds: float = float("inf")) -> list[float]:
    """Up to ``n`` sequential one-row classify calls, for at most ``seconds``; seconds each."""
    import httpx

    out: list[float] = []
    deadline = time.perf_counter() + seconds
    with httpx.Client(base_url=url, timeout=300.0) as c:
        while len(out) < n and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            r = c.post("/v1/classify", json={"prefix_id": prefix, "inputs": [text]}, headers=_auth(key))
            r.raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def flood(url: str, key: str, prefix: str, texts: list[str], stop: threading.Event, counts: list[int]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300.0) as c:
        while not stop.is_set():
            r = c.post("/v1/classify", json={"prefix_id": prefix, "inputs": texts}, headers=_auth(key))
            counts.append(r.status_code)


def run_policy(policy: str, args: argparse.Namespace, name: str, adapters: dict[str, bytes], texts: dict) -> dict:
    import tempfile

    import httpx

    from prefixserve.adapters.ratelimit import RateLimits
    from prefixserve.server.app import free_port, run_local
    from prefixserve.server.auth import resolve_admin_key
    from prefixserve.server.schemas import AppSettings

    work = Path(tempfile.mkdtemp(prefix="prefixserve-fairness-"))
    admin, _ = resolve_admin_key(work / "admin_key")
    settings = AppSettings(
        backbone=name,
        store=f"file://{work / 'store'}",
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        fair_batching=policy == "fair",
        **({"target_batch_ms": args.target_batch_ms} if args.target_batch_ms is not None else {}),
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=args.threads,
        max_inputs=args.flood_inputs,
        admin_key_file=str(work / "admin_key"),
        max_ongoing_requests=max(2 * args.max_batch_size, 4 * args.flooders),
        default_limits=RateLimits(),  # unlimited: this bench isolates the batching policy
    )
    url = run_local(settings, host="127.0.0.1", port=free_port(), num_cpus=4)
    try:
        keys = {}
        with httpx.Client(base_url=url, timeout=120.0) as c:
            for tenant, data in adapters.items():
                r = c.post("/v1/tenants", json={"tenant": tenant}, headers=_auth(admin))
                r.raise_for_status()
                keys[tenant] = r.json()["api_key"]
                headers = _auth(keys[tenant]) | {"Content-Type": "application/octet-stream"}
                c.put("/v1/prefixes/p", content=data, headers=headers).raise_for_status()
        probe(url, keys["bystander"], "p", texts["short"], 5)  # warm-up: both adapters on the device
        probe(url, keys["flooder"], "p", texts["short"], 5)
        idle = probe(url, keys["bystander"], "p", texts["short"], args.probes)
        stop, counts = threading.Event(), list[int]()
        flood_rows = texts["long"][: args.flood_inputs]
        threads = [
            threading.Thread(target=flood, args=(url, keys["flooder"], "p", flood_rows, stop, counts), daemon=True)
            for _ in range(args.flooders)
        ]
        for t in threads:
            t.start()
        time.sleep(2.0)  # let the flood build its queue
        t0 = time.perf_counter()
        busy = probe(url, keys["bystander"], "p", texts["short"], args.probes, args.phase_seconds)
        wall = time.perf_counter() - t0
        stop.set()
        for t in threads:
            t.join(timeout=5)  # a flood request still queued is cut off by the shutdown below
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return {
        "policy": policy,
        "idle_p50_ms": 1e3 * statistics.median(idle),
        "idle_p95_ms": 1e3 * pct(idle, 95),
        "flood_p50_ms": 1e3 * statistics.median(busy),
        "flood_p95_ms": 1e3 * pct(busy, 95),
        "p50_ratio": statistics.median(busy) / statistics.median(idle),
        "flood_probes": len(busy),
        "flood_requests": len(counts),
        "flood_rows_per_s": len(counts) * args.flood_inputs / wall if wall else None,
        "flood_statuses": {str(s): counts.count(s) for s in sorted(set(counts))},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFIXSERVE_RAY_LOGS", "0")
    os.environ.pop("PREFIXSERVE_ADMIN_KEY", None)
    from .workloads import random_packed

    backbone, name = common.load_bench_backbone(args)
    adapters = {
        "bystander": random_packed(backbone, "prefix", 8, seed=1),
        "flooder": random_packed(backbone, "prefix", 8, seed=2),
    }
    texts = {
        "short": common.make_texts(backbone.tokenizer, 1, 12)[0],
        "long": common.make_texts(backbone.tokenizer, args.flood_inputs, args.flood_tokens, seed=1),
    }
    results = [run_policy(p.strip(), args, name, adapters, texts) for p in args.policies.split(",") if p.strip()]
    by = {r["policy"]: r for r in results}
    targets = []
    if "fair" in by:
        targets.append(
            common.target(
                "fairness: bystander p50 under a flood / idle p50 (fair batching)",
                by["fair"]["p50_ratio"],
                2.0,
                higher_is_better=False,
            )
        )
    result: dict[str, Any] = {
        "bench": "fairness",
        "quick": args.quick,
        "machine": common.machine(backbone.device),
        "backbone": name,
        "command": "python -m bench.fairness " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: getattr(args, k) for k in ("flooders", "flood_inputs", "flood_tokens", "probes")}
        | {k: getattr(args, k) for k in ("max_batch_size", "max_batch_tokens", "threads", "shape", "target_batch_ms")},
        "policies": results,
        "targets": targets,
    }
    common.write_json(args.out, "fairness", result)
    rows = [
        [
            r["policy"],
            f"{r['idle_p50_ms']:.1f}",
            f"{r['flood_p50_ms']:.1f}",
            f"{r['flood_p95_ms']:.1f}",
            f"{r['p50_ratio']:.2f}x",
            f"{r['flood_rows_per_s']:.0f}",
        ]
        for r in results
    ]
    headers = ["policy", "idle p50 ms", "flood p50 ms", "flood p95 ms", "p50 ratio", "flood rows/s"]
    common.print_table(headers, rows)
    lines = [
        "# Fairness under a flood",
        "",
        f"Machine: {common.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}`",
        "",
        common.md_table(headers, rows),
        "",
        *[line for t in targets for line in common.fmt_target(t)],
    ]
    common.write_markdown(args.out, "fairness", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

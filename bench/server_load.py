"""Closed-loop HTTP load on the real Ray Serve app (loopback) vs the engine alone at the same batch size.

    python -m bench.server_load [--quick] [--clients N] [--tenants T] [--prefixes P] [--duration S]

What it measures (one run, so the ratios compare like with like on a shared box):
* **server**: N closed-loop clients (each sends its next request when the last one answered), over T
  tenants x P prefixes picked at random, ``--inputs`` rows per request, bounded by ``--requests`` and
  ``--duration``. Throughput (requests/s, rows/s) and p50/p95/p99 latency at the client, plus the
  rows per forward the Workers actually achieved (from ``/metrics``).
* **engine alone**: the same adapters and texts through ``Engine.predict`` in this process, in mixed
  batches of ``--max-batch-size`` rows with the same torch thread count: rows/s and per-batch latency.
  Timed before AND after the server load; the median is used.
* **ratios**: server rows/s / engine rows/s, and server p50 / engine batch p50.
* **upload -> visible everywhere**: PUT a new version, then classify until every Worker replica seen
  during the load answers with it; the time from the PUT's start (median, max over ``--visibility-reps``).

Writes ``<out>/server_load.json`` and ``<out>/server_load_cdf.png`` (latency CDF).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import common


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.server_load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    p.add_argument(
        "--clients",
        type=int,
        default=None,
        help="closed-loop HTTP clients (default 2 x max-batch-size: while one batch runs, the next one is waiting "
        "in full; with clients = batch size every batch is half empty, which measures the clients, not the server)",
    )
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--prefixes", type=int, default=None, help="prefixes per tenant (quick 2, full 4)")
    p.add_argument("--inputs", type=int, default=1, help="rows per classify request")
    p.add_argument("--tokens", type=int, default=32, help="tokens per text (specials included)")
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests (quick 600)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds (quick 25)")
    p.add_argument("--max-batch-size", type=int, default=None, help="Worker batch and engine batch (quick 8)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="the Worker's token budget (default: max-batch-size x the texts' estimated tokens, so a full "
        "batch fills both, as the engine-alone batches do)",
    )
    p.add_argument(
        "--target-batch-ms", type=float, default=0.0, help="the Worker's latency target (default 0: off, saturation)"
    )
    p.add_argument("--replicas", type=int, default=1, help="Worker replicas")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per Worker replica AND for the engine-alone baseline "
        "(default: (cores - 1) // replicas, min 1: the ingress, proxy and clients need a core; "
        "oversubscribed OpenMP threads are several times slower on a shared box)",
    )
    p.add_argument("--visibility-reps", type=int, default=5)
    p.add_argument("--port", type=int, default=None, help="HTTP port on 127.0.0.1 (default: a free one)")
    args = p.parse_args(argv)
    q = args.quick
    args.prefixes = args.prefixes or (2 if q else 4)
    args.requests = args.requests or (600 if q else 20000)
    args.duration = args.duration or (25.0 if q else 120.0)
    args.max_batch_size = args.max_batch_size or (8 if q else 32)
    args.clients = args.clients or 2 * args.max_batch_size
    args.reps = args.reps or (3 if q else 5)
    return args


def pct(values, q):
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))] if xs else float("nan")


# ---- engine alone --------------------------------------------------------------------------------
def engine_alone(backbone, adapters: dict, texts: list[str], batch: int, reps: int, progress: bool) -> dict:
    """Mixed batches of ``batch`` rows over all adapters; per-batch seconds (first rep is warm-up)."""
    from prefixserve.adapters.engine import Engine, Row

    engine = Engine(backbone)
    dev = [engine.to_device(k, data) for k, data in adapters.items()]
    rng = random.Random(1)
    seconds = []
    for rep in tqdm(range(reps + 1), desc="engine alone", disable=not progress, leave=False):
        rows = [Row(rng.choice(dev), rng.choice(texts)) for _ in range(batch)]
        t0 = time.perf_counter()
        engine.predict(rows)
        if rep:
            seconds.append(time.perf_counter() - t0)
    return {
        "batch": batch,
        "batch_seconds": seconds,
        "rows_per_s": batch / statistics.median(seconds),
        "batch_p50_s": pct(seconds, 50),
        "batch_p95_s": pct(seconds, 95),
    }


# ---- server --------------------------------------------------------------------------------------
def closed_loop(url: str, jobs: list[tuple[str, str]], texts: list[str], args) -> dict:
    import httpx

    lock = threading.Lock()
    latencies, errors, replicas, sent = [], [], set(), [0]
    deadline = time.monotonic() + args.duration
    bar = tqdm(total=args.requests, desc=f"{args.clients} clients", disable=args.no_progress, leave=False)

    def client(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=120.0) as c:
            while time.monotonic() < deadline:
                with lock:
                    if sent[0] >= args.requests:
                        return
                    sent[0] += 1
                key, prefix = rng.choice(jobs)
                body = {"prefix_id": prefix, "inputs": [rng.choice(texts) for _ in range(args.inputs)]}
                t0 = time.perf_counter()
                r = c.post("/v1/classify", json=body, headers={"Authorization": f"Bearer {key}"})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        replicas.add(r.headers.get("x-prefixserve-replica", "?"))
                    else:
                        errors.append(r.status_code)
                bar.update(1)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    bar.close()
    n = len(latencies)
    return {
        "requests": n,
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
        "wall_s": wall,
        "requests_per_s": n / wall,
        "rows_per_s": n * args.inputs / wall,
        "p50_s": pct(latencies, 50),
        "p95_s": pct(latencies, 95),
        "p99_s": pct(latencies, 99),
        "latencies_s": latencies,
        "replicas_seen": sorted(replicas),
    }


def batch_stats(metrics_text: str) -> dict:
    """Mean rows and distinct adapters per forward, summed over Worker replicas."""
    sums: dict[str, float] = {}
    for line in metrics_text.splitlines():
        for name in (
            "prefixserve_batch_rows_sum",
            "prefixserve_batch_rows_count",
            "prefixserve_batch_adapters_sum",
            "prefixserve_batch_tokens_sum",
            "prefixserve_batch_fill_sum",
            "prefixserve_forward_seconds_sum",
        ):
            if line.startswith(name + "{"):
                sums[name] = sums.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return {
        "forwards": sums.get("prefixserve_batch_rows_count", 0.0),
        "rows": sums.get("prefixserve_batch_rows_sum", 0.0),
        "adapters": sums.get("prefixserve_batch_adapters_sum", 0.0),
        "tokens": sums.get("prefixserve_batch_tokens_sum", 0.0),  # estimated tokens
        "fill": sums.get("prefixserve_batch_fill_sum", 0.0),  # share of the token budget, summed over forwards
        "forward_s": sums.get("prefixserve_forward_seconds_sum", 0.0),
    }


def visibility(c, key: str, prefix: str, versions: list[bytes], replicas: set[str], reps: int) -> dict:
    """Per PUT: seconds from the PUT's start until the *sending* of the last first-request that every
    known replica answered with the new version (visibility, not forward latency); and the PUT's own time."""
    times, puts, served = [], [], []
    for i in range(reps):
        t0 = time.perf_counter()
        r = c.put(
            f"/v1/prefixes/{prefix}",
            content=versions[i % len(versions)],
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/octet-stream"},
        )
        r.raise_for_status()
        puts.append(time.perf_counter() - t0)
        want = r.json()["version"]
        seen: dict[str, float] = {}  # replica -> seconds from the PUT to the first request it answered new
        while set(seen) < replicas and time.perf_counter() - t0 < 60:
            sent = time.perf_counter()
            r = c.post(
                "/v1/classify",
                json={"prefix_id": prefix, "inputs": ["visible"]},
                headers={"Authorization": f"Bearer {key}"},
            )
            if r.status_code == 200 and r.json()["version"] == want:
                seen.setdefault(r.headers.get("x-prefixserve-replica", "?"), sent - t0)
        times.append(max(seen.values()) if seen else float("inf"))
        served.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "max_s": max(times),
        "put_median_s": statistics.median(puts),
        "first_answer_median_s": statistics.median(served),
        "reps": reps,
        "replicas": len(replicas),
    }


def plot_cdf(path: Path, server_lat: list[float], engine_lat: list[float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs in (("server (HTTP, per request)", server_lat), ("engine alone (per batch)", engine_lat)):
        xs = sorted(x * 1000 for x in xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log)")
    ax.set_ylabel("fraction of requests / batches")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFIXSERVE_RAY_LOGS", "0")
    import tempfile

    import httpx
    import torch

    from prefixserve.server.app import free_port, run_local
    from prefixserve.server.auth import resolve_admin_key
    from prefixserve.server.schemas import AppSettings

    from .workloads import random_packed

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    threads = args.threads or max(1, (cores - 1) // args.replicas)
    torch.set_num_threads(threads)
    backbone, name = common.load_bench_backbone(args)
    texts = common.make_texts(backbone.tokenizer, 64, args.tokens)
    if args.max_batch_tokens is None:
        from prefixserve.server.batching import estimate_tokens

        args.max_batch_tokens = args.max_batch_size * max(estimate_tokens(t) for t in texts)
    adapters = {
        f"t{t}/p{p}": random_packed(backbone, "prefix" if p % 2 == 0 else "prompt", 8 + 4 * p, seed=100 * t + p)
        for t in range(args.tenants)
        for p in range(args.prefixes)
    }
    progress = not args.no_progress
    engine_before = engine_alone(backbone, adapters, texts, args.max_batch_size, args.reps, progress)

    work = Path(tempfile.mkdtemp(prefix="prefixserve-bench-"))
    os.environ.pop("PREFIXSERVE_ADMIN_KEY", None)
    admin, _ = resolve_admin_key(work / "admin_key")
    settings = AppSettings(
        backbone=name,
        store=f"file://{work / 'store'}",
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batch_tokens=args.max_batch_tokens,
        target_batch_ms=args.target_batch_ms,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        replicas=args.replicas,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.5,
        torch_threads=threads,
        max_inputs=max(64, args.inputs),
        admin_key_file=str(work / "admin_key"),
        max_ongoing_requests=max(2 * args.max_batch_size, args.clients),
    )
    port = args.port or free_port()
    t0 = time.perf_counter()
    url = run_local(settings, host="127.0.0.1", port=port, num_cpus=max(4, cores))
    startup = time.perf_counter() - t0
    try:
        with httpx.Client(base_url=url, timeout=120.0) as c:
            keys, jobs = {}, []
            for key_name, data in adapters.items():
                tenant, prefix = key_name.split("/")
                if tenant not in keys:
                    r = c.post("/v1/tenants", json={"tenant": tenant}, headers={"Authorization": f"Bearer {admin}"})
                    r.raise_for_status()
                    keys[tenant] = r.json()["api_key"]
                r = c.put(
                    f"/v1/prefixes/{prefix}",
                    content=data,
                    headers={"Authorization": f"Bearer {keys[tenant]}", "Content-Type": "application/octet-stream"},
                )
                r.raise_for_status()
                jobs.append((keys[tenant], prefix))
            for key, prefix in jobs:  # warm: every adapter on the device once
                c.post(
                    "/v1/classify",
                    json={"prefix_id": prefix, "inputs": texts[:1]},
                    headers={"Authorization": f"Bearer {key}"},
                ).raise_for_status()
            before = batch_stats(c.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text)
            server = closed_loop(url, jobs, texts, args)
            after = batch_stats(c.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).text)
            forwards = after["forwards"] - before["forwards"]  # the load only (not set-up or warm-up)
            server["forwards_during_load"] = forwards
            server["mean_rows_per_forward"] = (after["rows"] - before["rows"]) / forwards if forwards else None
            server["mean_adapters_per_forward"] = (
                (after["adapters"] - before["adapters"]) / forwards if forwards else None
            )
            server["mean_tokens_per_forward"] = (after["tokens"] - before["tokens"]) / forwards if forwards else None
            server["mean_token_budget_fill"] = (after["fill"] - before["fill"]) / forwards if forwards else None
            # where a ratio below 1 goes: slower forwards (CPU shared with Ray, proxy, clients) or idle gaps
            server["mean_forward_s"] = (after["forward_s"] - before["forward_s"]) / forwards if forwards else None
            server["worker_busy_share"] = (after["forward_s"] - before["forward_s"]) / server["wall_s"]
            vis_versions = [random_packed(backbone, "prefix", 8, seed=9000 + i) for i in range(2)]
            replicas = set(server["replicas_seen"]) or {"?"}
            vis = visibility(c, jobs[0][0], jobs[0][1], vis_versions, replicas, args.visibility_reps)
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    engine_after = engine_alone(backbone, adapters, texts, args.max_batch_size, args.reps, progress)
    eng_rows = statistics.median([engine_before["rows_per_s"], engine_after["rows_per_s"]])
    eng_p50 = statistics.median(engine_before["batch_seconds"] + engine_after["batch_seconds"])
    m = common.machine(backbone.device)
    result = {
        "bench": "server_load",
        "quick": args.quick,
        "machine": m,
        "backbone": name,
        "config": {
            k: getattr(args, k)
            for k in (
                "clients",
                "tenants",
                "prefixes",
                "inputs",
                "tokens",
                "requests",
                "duration",
                "max_batch_size",
                "batch_wait_ms",
                "replicas",
            )
        },
        "torch_threads_per_replica": threads,
        "startup_s": startup,
        "server": {k: v for k, v in server.items() if k != "latencies_s"},
        "engine_alone": {
            "rows_per_s": eng_rows,
            "batch_p50_s": eng_p50,
            "before": engine_before,
            "after": engine_after,
        },
        "ratios": {
            "server_rows_per_s_vs_engine": server["rows_per_s"] / eng_rows,
            "server_p50_vs_engine_batch_p50": server["p50_s"] / eng_p50,
        },
        "upload_visible_everywhere": vis,
        "command": " ".join(["python -m bench.server_load", *(argv if argv is not None else sys.argv[1:])]),
    }
    result["targets"] = [
        common.target(
            "HTTP rows/s vs engine alone (same batch size)", result["ratios"]["server_rows_per_s_vs_engine"], 0.9
        ),
        common.target(
            "batches filled to the token budget (mean share)",
            server.get("mean_token_budget_fill") or 0.0,
            0.8,
        ),
        common.target("upload visible on every replica (max)", vis["max_s"], 1.0, higher_is_better=False, unit="s"),
        common.target("server errors", float(server["errors"]), 0.0, higher_is_better=False, unit=""),
    ]
    out = Path(args.out)
    path = common.write_json(out, "server_load", result)
    plot_cdf(
        out / "server_load_cdf.png",
        server["latencies_s"],
        engine_before["batch_seconds"] + engine_after["batch_seconds"],
        f"{args.clients} clients, {args.tenants}x{args.prefixes} prefixes, batch {args.max_batch_size}; "
        f"{Path(name).name}",
    )
    s, r = result["server"], result["ratios"]
    print(
        f"\nserver: {s['requests']} req in {s['wall_s']:.1f}s = {s['requests_per_s']:.1f} req/s "
        f"({s['rows_per_s']:.1f} rows/s), p50 {s['p50_s'] * 1e3:.1f} ms, p95 {s['p95_s'] * 1e3:.1f} ms, "
        f"p99 {s['p99_s'] * 1e3:.1f} ms, errors {s['errors']}, rows/forward {s['mean_rows_per_forward'] or 0:.2f} "
        f"(distinct adapters/forward {s['mean_adapters_per_forward'] or 0:.2f}, "
        f"est. tokens/forward {s.get('mean_tokens_per_forward') or 0:.0f}, "
        f"token budget filled {100 * (s.get('mean_token_budget_fill') or 0):.0f}%), "
        f"forward mean {1e3 * (s.get('mean_forward_s') or 0):.0f} ms, Worker busy {100 * s['worker_busy_share']:.0f}%"
    )
    print(f"engine alone (batch {args.max_batch_size}): {eng_rows:.1f} rows/s, batch p50 {eng_p50 * 1e3:.1f} ms")
    print(
        f"ratios: rows/s server/engine {r['server_rows_per_s_vs_engine']:.3f}, "
        f"p50 server/engine-batch {r['server_p50_vs_engine_batch_p50']:.2f}"
    )
    print(
        f"upload -> visible on {vis['replicas']} replica(s): median {vis['median_s'] * 1e3:.0f} ms, "
        f"max {vis['max_s'] * 1e3:.0f} ms"
    )
    print(f"wrote {path} and {out / 'server_load_cdf.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Autoscaling, shown: the Worker deployment scales up under mixed-tenant load and back down after.

Runs the real application on a local Ray cluster (loopback only) with Worker autoscaling
min 1 / max 3 replicas and short delays, then drives three phases of closed-loop HTTP load:
idle (1 slow client) -> sustained load (N concurrent clients over 2 tenants x 3 adapters) ->
cool-down (1 slow client) until Serve is back to one replica. Every answer is checked against
the in-process engine's answer for the same adapter and text (a wrong or failed answer is counted).
Writes ``autoscale.json`` (the timeline), ``autoscale.png`` (replicas, in-flight requests,
latency) and ``autoscale.md``.

    python bench/autoscale.py [--quick] [--clients 16] [--load-s 40] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

TEXTS = ["great film 최고", "bad plot and terrible actors", "정말 재미 있다", "boring movie", "i love this story"]


class Sample(TypedDict):
    """One timeline point, taken by the sampler thread."""

    t: float  # seconds since the load started
    replicas: int
    starting: int
    status: str
    in_flight: int
    phase: str


class RequestRecord(TypedDict):
    t: float  # when the request was sent (seconds since the load started, once drive() returns)
    latency_s: float
    ok: bool
    correct: bool
    phase: str


@dataclass
class _DriveState:
    """Shared by the client coroutines, the sampler thread and the phase loop of :func:`drive`."""

    phase: str = ""
    stop: bool = False  # ends the sampler thread
    stop_early: Callable[[], bool] | None = None  # the running phase's early end (cool-down), checked by clients


def make_adapters(backbone, n_per_tenant: int = 3):
    """Random prefix and prompt adapters (packed bytes) for the loaded backbone, per (tenant, prefix id)."""
    from prefixserve.adapters.synthetic import random_adapter

    return {
        (tenant, f"task{k}"): random_adapter(
            backbone.config,
            backbone.fingerprint,
            kind="prefix" if k % 2 == 0 else "prompt",
            num_virtual_tokens=4 + 3 * k,
            labels=[f"l{i}" for i in range(2 + k)],
            seed=100 * t + k,
        )
        for t, tenant in enumerate(("acme", "globex"))
        for k in range(n_per_tenant)
    }


def expected_answers(backbone, adapters) -> dict:
    from prefixserve.adapters.engine import Engine, Row

    engine = Engine(backbone)
    want = {}
    for (tenant, pid), data in adapters.items():
        a = engine.to_device(f"{tenant}/{pid}", data)
        for text, pred in zip(TEXTS, engine.predict([Row(a, t) for t in TEXTS])):
            want[(tenant, pid, text)] = pred
    return want


def replica_count(app: str, deployment: str = "Worker") -> tuple[int, int, str]:
    """(running, starting, deployment status) of ``deployment``; starting covers pending actors too."""
    from ray import serve

    try:
        dep = serve.status().applications[app].deployments[deployment]
        states = {str(getattr(k, "value", k)): int(v) for k, v in dep.replica_states.items()}
        return (
            states.get("RUNNING", 0),
            states.get("STARTING", 0) + states.get("PENDING_MIGRATION", 0),
            str(getattr(dep.status, "value", dep.status)),
        )
    except (KeyError, AttributeError):
        return 0, 0, "UNKNOWN"


async def drive(base: str, keys: dict, adapters, want, phases, sample_s: float):
    """Run the load phases; returns (timeline samples, per-request records)."""
    import httpx

    from prefixserve.server.app import APP_NAME

    records: list[RequestRecord] = []
    timeline: list[Sample] = []
    in_flight = 0
    state = _DriveState()
    pairs = list(adapters)

    async def client(i: int, until: float, pause: float, http: httpx.AsyncClient):
        nonlocal in_flight
        n = 0
        while time.monotonic() < until and not (state.stop_early is not None and state.stop_early()):
            tenant, pid = pairs[(i + n) % len(pairs)]
            text = TEXTS[(i * 7 + n) % len(TEXTS)]
            n += 1
            t0 = time.monotonic()
            in_flight += 1
            try:
                r = await http.post(
                    f"{base}/v1/classify",
                    json={"prefix_id": pid, "inputs": [text]},
                    headers={"Authorization": f"Bearer {keys[tenant]}"},
                )
                ok = r.status_code == 200
                body = r.json() if ok else {}
                exp = want[(tenant, pid, text)]
                got = body.get("predictions", [{}])[0] if ok else {}
                correct = (
                    ok
                    and got.get("label") == exp.label
                    and all(abs(got["scores"][k] - v) <= 1e-4 for k, v in exp.scores.items())
                )
            except httpx.HTTPError:
                ok = correct = False
            finally:
                in_flight -= 1
            records.append(
                {"t": t0, "latency_s": time.monotonic() - t0, "ok": ok, "correct": correct, "phase": state.phase}
            )
            if pause:
                await asyncio.sleep(pause)

    def sampler(t_start: float):  # a plain thread: a slow serve.status() never stalls the clients
        while not state.stop:
            running, starting, status = replica_count(APP_NAME)
            timeline.append(
                {
                    "t": time.monotonic() - t_start,
                    "replicas": running,
                    "starting": starting,
                    "status": status,
                    "in_flight": in_flight,
                    "phase": state.phase,
                }
            )
            time.sleep(sample_s)

    t_start = time.monotonic()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    sampler_thread = threading.Thread(target=sampler, args=(t_start,), daemon=True)
    sampler_thread.start()
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        for name, clients, duration, pause, until_replicas in phases:
            state.phase = name
            print(f"phase {name}: {clients} client(s), up to {duration:.0f}s", file=sys.stderr)
            end = time.monotonic() + duration
            if until_replicas is not None:  # cool-down: stop as soon as Serve is back to `until_replicas`

                def back_down(name=name, until_replicas=until_replicas):
                    last = timeline[-1] if timeline else None
                    return (
                        last is not None
                        and last["phase"] == name
                        and last["replicas"] == until_replicas
                        and last["starting"] == 0
                        and last["status"] == "HEALTHY"
                    )

                state.stop_early = back_down
            tasks = [asyncio.create_task(client(i, end, pause, http)) for i in range(clients)]
            # hard cap: a phase never outlives its duration plus one request timeout
            done, pending = await asyncio.wait(tasks, timeout=duration + 35)
            for task in pending:
                task.cancel()
            state.stop_early = None
    state.stop = True
    sampler_thread.join(timeout=10)
    for r in records:
        r["t"] -= t_start
    return timeline, records


def plot(timeline, records, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    t = [s["t"] for s in timeline]
    axes[0].step(t, [s["replicas"] for s in timeline], where="post", color="tab:blue", label="running")
    axes[0].step(
        t,
        [s["replicas"] + s["starting"] for s in timeline],
        where="post",
        color="tab:blue",
        linestyle=":",
        label="running + starting",
    )
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("Worker replicas")
    axes[0].set_ylim(0, 3.5)
    axes[1].plot(t, [s["in_flight"] for s in timeline], color="tab:orange")
    axes[1].set_ylabel("requests in flight")
    axes[2].scatter(
        [r["t"] for r in records],
        [r["latency_s"] * 1000 for r in records],
        s=3,
        c=["tab:green" if r["correct"] else "tab:red" for r in records],
    )
    axes[2].set_ylabel("latency (ms)")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("seconds")
    phases: dict[str, list[float]] = {}  # phase -> [first, last] sample time
    for s in timeline:
        phases.setdefault(s["phase"], [s["t"], s["t"]])[1] = s["t"]
    for ax in axes:
        for name, (a, b) in phases.items():
            if name == "load":
                ax.axvspan(a, b, color="grey", alpha=0.12)
    axes[0].set_title("Worker autoscaling under mixed-tenant load (shaded: load phase)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter phases (about 3-4 minutes in all)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients during the load phase")
    ap.add_argument("--load-s", type=float, default=None, help="load phase length (default 90, quick 60)")
    ap.add_argument("--cooldown-cap-s", type=float, default=120, help="give up waiting for scale-down after this")
    ap.add_argument("--out", default="bench/results", help="output folder")
    args = ap.parse_args(argv)
    load_s = args.load_s or (60 if args.quick else 90)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFIXSERVE_RAY_LOGS", "0")
    from ray import serve

    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.synthetic import make_backbone
    from prefixserve.server.app import free_port, run_local
    from prefixserve.server.schemas import AppSettings, Autoscaling

    work = Path(tempfile.mkdtemp(prefix="ps-autoscale-"))
    bdir = make_backbone(work / "backbone", "roberta", hidden=128, layers=4, heads=4, max_positions=130)
    backbone = load_backbone(str(bdir))
    adapters = make_adapters(backbone)
    want = expected_answers(backbone, adapters)
    admin = os.environ.setdefault("PREFIXSERVE_ADMIN_KEY", "bench-admin-" + os.urandom(8).hex())
    settings = AppSettings(
        backbone=str(bdir),
        store=f"file://{work / 'store'}",
        max_batch_size=8,
        batch_wait_timeout_s=0.005,
        worker_num_cpus=0.5,
        ingress_num_cpus=0.25,
        torch_threads=1,
        autoscaling=Autoscaling(
            min_replicas=1, max_replicas=3, target_ongoing_requests=2, upscale_delay_s=2, downscale_delay_s=6
        ),
    )
    port = free_port()
    base = run_local(settings, host="127.0.0.1", port=port, num_cpus=4)
    try:
        import httpx

        keys = {}
        with httpx.Client(timeout=60) as http:
            for tenant in ("acme", "globex"):
                r = http.post(
                    f"{base}/v1/tenants", json={"tenant": tenant}, headers={"Authorization": f"Bearer {admin}"}
                )
                r.raise_for_status()
                keys[tenant] = r.json()["api_key"]
            for (tenant, pid), data in adapters.items():
                r = http.put(
                    f"{base}/v1/prefixes/{pid}",
                    content=data,
                    headers={"Authorization": f"Bearer {keys[tenant]}", "Content-Type": "application/octet-stream"},
                )
                r.raise_for_status()
        phases = [
            ("idle", 1, 8 if args.quick else 12, 0.5, None),
            ("load", args.clients, load_s, 0.0, None),
            ("cooldown", 1, args.cooldown_cap_s, 0.5, 1),
        ]
        print(f"driving load against {base} ...", file=sys.stderr)
        timeline, records = asyncio.run(drive(base, keys, adapters, want, phases, sample_s=0.5))
    finally:
        serve.shutdown()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    by_phase: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_phase.setdefault(r["phase"], []).append(r)
    peak = max(s["replicas"] for s in timeline)
    load_samples = [s for s in timeline if s["phase"] == "load"]
    first_up = next((s["t"] for s in load_samples if s["replicas"] > 1), None)
    load_start = load_samples[0]["t"] if load_samples else None
    final = timeline[-1]["replicas"]
    cool = [s for s in timeline if s["phase"] == "cooldown"]
    summary = {
        "settings": {
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 2,
            "upscale_delay_s": 2,
            "downscale_delay_s": 6,
            "clients": args.clients,
            "load_s": load_s,
        },
        "peak_replicas": peak,
        "final_replicas": final,
        "scale_up_after_s": None if first_up is None else round(first_up - load_start, 1),
        "back_to_one_after_s": round(cool[-1]["t"] - cool[0]["t"], 1) if cool and final == 1 else None,
        "requests": len(records),
        "errors": sum(not r["ok"] for r in records),
        "wrong_answers": sum(r["ok"] and not r["correct"] for r in records),
        "phases": {
            name: {
                "requests": len(rs),
                "p50_ms": round(1000 * statistics.median(r["latency_s"] for r in rs), 1),
                "p99_ms": round(1000 * sorted(r["latency_s"] for r in rs)[int(0.99 * (len(rs) - 1))], 1),
            }
            for name, rs in by_phase.items()
        },
    }
    targets = [  # same shape as bench.common.target, so run_all's SUMMARY lists them
        {
            "name": "autoscale: peak Worker replicas under load",
            "measured": peak,
            "threshold": 2,
            "op": ">=",
            "unit": "",
            "met": peak >= 2,
            "margin": peak - 2,
            "note": "min 1 / max 3",
        },
        {
            "name": "autoscale: replicas after the load",
            "measured": final,
            "threshold": 1,
            "op": "<=",
            "unit": "",
            "met": final <= 1,
            "margin": 1 - final,
            "note": "",
        },
        {
            "name": "autoscale: failed or wrong answers",
            "measured": summary["errors"] + summary["wrong_answers"],
            "threshold": 0,
            "op": "<=",
            "unit": "",
            "met": summary["errors"] + summary["wrong_answers"] == 0,
            "margin": -(summary["errors"] + summary["wrong_answers"]),
            "note": f"{len(records)} requests",
        },
    ]
    (out / "autoscale.json").write_text(
        json.dumps({"summary": summary, "targets": targets, "timeline": timeline, "requests": records})
    )
    plot(timeline, records, out / "autoscale.png")
    lines = [
        "# Autoscaling on a local Ray cluster",
        "",
        "```",
        json.dumps(summary, indent=2),
        "```",
        "",
        "![timeline](autoscale.png)",
    ]
    (out / "autoscale.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(summary, indent=2))
    ok = peak > 1 and final == 1 and summary["errors"] == 0 and summary["wrong_answers"] == 0
    print("autoscale:", "scaled up and back down, every answer correct" if ok else "NOT shown (see summary)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark and write bench/results/SUMMARY.md (what ``make bench`` runs).

    python -m bench.run_all [--quick] [--device auto|cpu|cuda] [--out bench/results]

Each bench runs as its own subprocess (memory is returned between them, a crash stays contained):
``bench.engine``, ``bench.realistic``, ``bench.kinds``, ``bench.attention_plan`` (always on CPU) and ``bench.memory``;
``bench.store_latency``, ``bench.server_load``, ``bench.fairness``, ``bench.autoscale`` and ``bench.accuracy``
when their files exist. ``--quick`` is passed to all; ``--device``/``--out`` to
those whose ``--help`` lists them. A missing or failing bench is a line in the summary, not an abort.
The summary gathers every ``targets`` list found in ``<out>/*.json`` (met or not, by how much).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from . import common

BENCHES = [
    "engine",
    "realistic",
    "kinds",
    "attention_plan",
    "memory",
    "store_latency",
    "server_load",
    "fairness",
    "autoscale",
    "accuracy",
]
OWN = {"engine", "realistic", "kinds", "memory"}
CPU_ONLY = {"attention_plan"}  # measures the CPU attention plan: always --device cpu


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_all", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="each bench's <= 5 min subset")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda")
    p.add_argument("--out", default=str(common.DEFAULT_OUT), help="results folder (default: bench/results)")
    p.add_argument("--only", nargs="+", choices=BENCHES, help="run just these benches")
    p.add_argument("--timeout", type=int, default=None, help="seconds per bench (default 900 quick, 7200 full)")
    p.add_argument("--summary-only", action="store_true", help="do not run anything; rebuild SUMMARY.md")
    return p.parse_args(argv)


def _flags_for(module: str, args) -> list[str]:
    flags = ["--quick"] if args.quick else []
    if module in CPU_ONLY:
        return flags + ["--device", "cpu", "--out", args.out]
    if module in OWN:
        return flags + ["--device", args.device, "--out", args.out]
    try:  # foreign bench: pass --device/--out only if it understands them
        helptext = subprocess.run(
            [sys.executable, "-m", f"bench.{module}", "--help"],
            cwd=common.ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        helptext = ""
    for flag, value in (("--device", args.device), ("--out", args.out)):
        if re.search(rf"(^|[\s\[,]){flag}([\s=,\]]|$)", helptext, re.M):  # not --output's prefix
            flags += [flag, value]
    return flags


def run_bench(module: str, args) -> dict:
    """Run one bench; returns {name, status, rc, seconds, tail}."""
    path = common.ROOT / "bench" / f"{module}.py"
    if not path.exists():
        return {"name": module, "status": "absent", "rc": None, "seconds": 0, "tail": f"{path.name} not present"}
    cmd = [sys.executable, "-m", f"bench.{module}"] + _flags_for(module, args)
    timeout = args.timeout or (900 if args.quick else 7200)
    print(f"\n=== {' '.join(cmd[1:])} (timeout {timeout} s)", flush=True)
    t0 = time.perf_counter()
    tail: list[str] = []
    try:
        proc = subprocess.Popen(cmd, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None  # stdout=PIPE above
        for line in proc.stdout:  # stream through, keep the tail for the summary
            sys.stdout.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            if time.monotonic() > deadline:
                proc.kill()
                break
        rc = proc.wait()
        status = "ok" if rc == 0 else ("timeout" if time.monotonic() > deadline else "failed")
    except OSError as exc:
        rc, status, tail = None, "failed", [str(exc)]
    return {
        "name": module,
        "status": status,
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "command": " ".join(cmd[1:]),
        "tail": "\n".join(tail[-8:]),
    }


def _load_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            results[path.stem] = data
    return results


def _why_engine(engine: dict) -> list[str]:
    """Data-driven explanation of engine overheads from its phase breakdown."""
    prof = engine.get("profile")
    if not prof:
        return []
    ph = prof["phases_s"]
    if "engine: pack + gather K/V" not in ph:  # a result from before the packed encoder (#12)
        return ["(engine.json predates the packed encoder: re-run `python -m bench.engine` for the breakdown)", ""]
    base = ph["backbone: tokenize"] + ph["backbone: pack"] + ph["backbone: forward"]
    parts = {
        "tokenization (per-row room check)": ph["engine: tokenize"] - ph["backbone: tokenize"],
        "packing: index tensors + gathering per-row prefix K/V": ph["engine: pack + gather K/V"] - ph["backbone: pack"],
        "encoder without virtual tokens vs backbone-only (same code: noise)": ph["engine: encode, no virtual tokens"]
        - ph["backbone: forward"],
        "attending to the prefix (P extra keys per row and layer)": ph["engine: encode with prefixes"]
        - ph["engine: encode, no virtual tokens"],
        "per-adapter heads": ph["engine: heads"],
    }
    totals = {}
    for label, table in prof.get("torch_profiler", {}).items():
        m = re.search(r"Self CPU time total: ([\d.]+)\s*(ms|s|us)", table)
        if m:
            totals[label] = float(m.group(1)) * {"s": 1.0, "ms": 1e-3, "us": 1e-6}[m.group(2)]
    lines = []
    if {"backbone-only", "mixed"} <= set(totals):
        backbone_s, mixed_s = totals["backbone-only"], totals["mixed"]
        lines += [
            f"torch.profiler, one batch each: backbone-only {backbone_s * 1e3:.0f} ms vs mixed {mixed_s * 1e3:.0f} ms "
            f"self CPU (engine overhead {mixed_s / backbone_s - 1:+.1%}); per-op tables in [engine.md](engine.md).",
            "",
        ]
    lines += [
        f"Phase breakdown at batch {prof.get('batch', 32)} x {prof.get('tokens', 64)} tokens, P={prof.get('p', 20)}, "
        f"{prof['distinct_in_batch']} adapters per batch "
        "(medians of a few samples; noisy on a shared box, where it disagrees with the profiler trust neither; "
        f"backbone-only total "
        f"{base * 1e3:.0f} ms). Extra time of the engine over backbone-only, by cause:",
        "",
        common.md_table(
            ["cause", "extra ms", "% of backbone-only"],
            [[k, f"{v * 1e3:+.1f}", f"{v / base:+.1%}"] for k, v in parts.items()],
        ),
        "",
    ]
    return lines


def write_summary(args, runs: list[dict]) -> tuple[list[dict], Path]:
    out = Path(args.out)
    results = _load_results(out)
    targets = []
    for name, data in results.items():
        for t in data.get("targets") or []:
            if isinstance(t, dict) and {"name", "measured", "threshold", "met"} <= set(t):
                targets.append({**t, "source": name})
    machine = next(
        (d["machine"] for d in results.values() if isinstance(d.get("machine"), dict) and "cpu" in d["machine"]), None
    )
    lines = ["# Benchmark summary", ""]
    if machine:
        lines += [f"Machine: {common.machine_line(machine)}", ""]
    lines += [
        "All claims are throughput **ratios** of variants timed side by side in one run (interleaved, "
        "median of per-repetition ratios); absolute numbers depend on the (shared) machine.",
        "",
        "## Targets",
        "",
    ]
    if targets:
        lines += [
            common.md_table(
                ["target", "want", "measured", "status", "margin", "source"],
                [
                    common.fmt_target(t)
                    + [f"[{t['source']}]({t['source']}{'.md' if (out / (t['source'] + '.md')).exists() else '.json'})"]
                    for t in targets
                ],
            ),
            "",
        ]
    else:
        lines += ["(no bench reported targets)", ""]
    if runs:
        lines += [
            "## Runs",
            "",
            common.md_table(
                ["bench", "status", "seconds", "note"],
                [
                    [
                        r["name"],
                        r["status"],
                        f"{r['seconds']:.0f}",
                        "" if r["status"] == "ok" else (r["tail"].splitlines() or [""])[-1][:160].replace("|", "/"),
                    ]
                    for r in runs
                ],
            ),
            "",
        ]
    headlines = [(name, h) for name, data in results.items() for h in data.get("headline") or [] if isinstance(h, dict)]
    if headlines:
        lines += [
            "## Other headline numbers",
            "",
            common.md_table(["bench", "metric", "value"], [[n, h.get("name"), h.get("value")] for n, h in headlines]),
            "",
        ]
    if "engine" in results:
        lines += ["## Where the engine's time goes", ""] + _why_engine(results["engine"])
    notes = common.ROOT / "bench" / "FINDINGS.md"
    if notes.exists():
        lines += ["Analysis of missed targets and proposed fixes: [FINDINGS.md](../FINDINGS.md).", ""]
    lines += ["## Files", ""] + [f"- [{p.name}]({p.name})" for p in sorted(out.glob("*.md")) if p.name != "SUMMARY.md"]
    lines += [f"- ![{p.stem}]({p.name})" for p in sorted(out.glob("*.png"))]
    common.write_markdown(out, "SUMMARY", "\n".join(lines))
    return targets, out / "SUMMARY.md"


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    runs = [] if args.summary_only else [run_bench(m, args) for m in (args.only or BENCHES)]
    targets, path = write_summary(args, runs)
    print(f"\n=== summary -> {path}")
    if runs:
        common.print_table(
            ["bench", "status", "seconds"], [[r["name"], r["status"], f"{r['seconds']:.0f}"] for r in runs]
        )
        print()
    if targets:
        common.print_table(["target", "want", "measured", "status", "margin"], [common.fmt_target(t) for t in targets])
    return 0 if all(r["status"] in ("ok", "absent") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Shared benchmark plumbing: machine description, synthetic backbone, interleaved timing, writers.

Decisions:
* **Ratios, not absolute times.** The bench box may be shared (2 CPU cores, other jobs running), so
  every variant of a comparison is timed in the same repetition, in a rotated order, and the
  reported ratio is the median over repetitions of the per-repetition ratio. Absolute seq/s are
  printed for context only.
* The default backbone is a seeded random klue/roberta-base-shaped model (nothing is downloaded);
  ``--backbone NAME`` runs the real checkpoint instead (e.g. on a GPU box with a model cache).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results"
# Backbone shapes the benches build with prefixserve.adapters.synthetic.make_backbone.
SHAPES = {
    "klue": dict(hidden=768, layers=12, heads=12, max_positions=514, vocab_size=32000),  # klue/roberta-base
    "small": dict(hidden=384, layers=6, heads=6, max_positions=514, vocab_size=8000),  # MiniLM-L6-sized
    "tiny": dict(hidden=32, layers=2, heads=4, max_positions=514, vocab_size=512),  # smoke tests only
}
# English words the synthetic WordPiece vocabulary holds whole (one token each).
_WORDS = (
    "the movie film good bad great terrible not very really fun boring plot actor story love hate "
    "best worst ever and but of to in on for with at by from as have has had do does will would"
).split()


# ---- command line ---------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small subset that finishes in <= 5 min on 2 CPU cores")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results folder (default: bench/results)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (median reported)")
    p.add_argument(
        "--backbone",
        default=None,
        help="hub id or folder of a real backbone; default: seeded random klue/roberta-base shape",
    )
    p.add_argument(
        "--shape",
        default="klue",
        choices=sorted(SHAPES),
        help="synthetic backbone shape when --backbone is not given ('tiny' is for smoke tests)",
    )
    p.add_argument(
        "--cache-dir",
        default=os.environ.get("PREFIXSERVE_BENCH_CACHE", str(Path.home() / ".cache" / "prefixserve" / "bench")),
        help="where synthetic backbones are built once and reused",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")


# ---- machine / backbone ---------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    """What the numbers were measured on (goes into every JSON and markdown file)."""
    versions: dict[str, str | None] = {}  # None: not installed (bench.store_latency needs neither)
    for name in ("transformers", "peft"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    cores: int | None  # None when the OS cannot tell
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": versions["transformers"],
        "peft": versions["peft"],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "git": commit,
    }
    return info


def machine_line(m: dict) -> str:
    dev = m["gpu"] or "CPU"
    load = "/".join(f"{x:.1f}" for x in m["load_avg"]) if m.get("load_avg") else "?"
    return (
        f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads, load avg {load}), "
        f"device {m['device']} [{dev}], torch {m['torch']}, transformers {m['transformers']}, "
        f"peft {m['peft']}, {m['date']}, git {m['git']}"
    )


def synthetic_backbone_dir(shape: str, cache_dir: str | Path) -> Path:
    """Build (once) and return a seeded random backbone folder of ``shape``."""
    from prefixserve.adapters.synthetic import make_backbone

    folder = Path(cache_dir) / f"roberta-{shape}-seed0"
    done = folder / ".complete"
    if not done.exists():
        dims = SHAPES[shape]
        make_backbone(
            folder,
            "roberta",
            seed=0,
            hidden=dims["hidden"],
            layers=dims["layers"],
            heads=dims["heads"],
            max_positions=dims["max_positions"],
            vocab_size=dims["vocab_size"],
        )
        done.write_text("ok")
    return folder


def quiet() -> None:
    """Silence library chatter (load reports, deprecation warnings) so the bench output stays readable."""
    import warnings

    from transformers import logging as hf_logging

    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_bench_backbone(args):
    """(Backbone, folder) for ``args`` (``--backbone`` or the synthetic ``--shape``)."""
    from prefixserve.adapters.backbone import load_backbone

    quiet()
    name = args.backbone or str(synthetic_backbone_dir(args.shape, args.cache_dir))
    return load_backbone(name, device=args.device, dtype=getattr(args, "dtype", "float32")), name


def make_texts(tokenizer, n: int, tokens: int, seed: int = 0) -> list[str]:
    """``n`` different texts of exactly ``tokens`` tokens each (specials included) where possible."""
    import random

    rng = random.Random(seed)
    specials = len(tokenizer("")["input_ids"])  # [CLS] [SEP]
    cost = {w: len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in _WORDS}
    out = []
    for _ in range(n):
        words, used = [], specials
        while True:
            w = rng.choice(_WORDS)
            if used + cost[w] > tokens:
                break
            words.append(w)
            used += cost[w]
        text = " ".join(words)
        while words and len(tokenizer(text)["input_ids"]) > tokens:  # a tokenizer that merges differently
            words.pop()
            text = " ".join(words)
        out.append(text)
    return out


# ---- timing ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timing(TypedDict):
    """One variant's repetitions, as :func:`interleaved` records them."""

    seconds: list[float]  # the primary clock (``clock``)
    wall: list[float]
    cpu: list[float]
    seqs: int  # sequences per call
    clock: str  # "cpu" | "wall"


def interleaved(
    variants: dict[str, Callable[[int], int]],
    reps: int,
    device: torch.device,
    *,
    warmup: int = 1,
    desc: str = "",
    progress: bool = True,
    clock: str = "auto",
) -> dict[str, Timing]:
    """Time every variant once per repetition, rotating the order each repetition.

    Each variant is ``fn(rep) -> sequences processed``. Returns ``{name: {"seconds": [...], "wall": [...],
    "cpu": [...], "seqs": n, "clock": ...}}``; ``seconds`` is the primary clock. ``clock="auto"`` picks
    process CPU time on a CPU device (other jobs on a shared box stretch wall time by 2-5x from one
    batch to the next, but barely change the CPU time our process spends on a batch) and wall time on
    CUDA (where CPU time is not the work). Both are always recorded.
    Warm-up repetitions (not recorded) fill caches and let the allocator settle.
    """
    if clock == "auto":
        clock = "wall" if device.type == "cuda" else "cpu"
    names = list(variants)
    result = {name: Timing(seconds=[], wall=[], cpu=[], seqs=0, clock=clock) for name in names}
    total = (warmup + reps) * len(names)
    bar = tqdm(total=total, desc=desc or "timing", disable=not progress, leave=False)
    for rep in range(-warmup, reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            bar.set_postfix_str(name[:40])
            sync(device)
            wall0, cpu0 = time.perf_counter(), time.process_time()
            seqs = variants[name](rep)
            sync(device)
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            if rep >= 0:
                r = result[name]
                r["wall"].append(wall)
                r["cpu"].append(cpu)
                r["seconds"].append(cpu if clock == "cpu" else wall)
                r["seqs"] = seqs
            bar.update(1)
    bar.close()
    return result


Step = Callable[[], object]


def interleaved_steps(
    variants: dict[str, Callable[[int], tuple[list[Step], int]]],
    reps: int,
    device: torch.device,
    *,
    desc: str = "",
    progress: bool = True,
    clock: str = "auto",
) -> dict[str, Timing]:
    """:func:`interleaved` at a finer grain, for variants whose repetition is many seconds of work.

    ``fn(rep) -> (steps, sequences)``: a repetition is a list of steps (e.g. one per batch; building the list
    is not timed, so put real work inside the steps). Step k of every variant runs back to back, in an order
    rotated by ``rep + k``, before any variant's step k+1: a burst of load from other jobs lands on every
    variant alike instead of on whichever one was running for the minute it lasted. A variant's time for a
    repetition is the sum of its steps' times; the result has :func:`interleaved`'s shape (no warm-up here:
    warm up on a small input first).
    """
    if clock == "auto":
        clock = "wall" if device.type == "cuda" else "cpu"
    names = list(variants)
    result = {name: Timing(seconds=[], wall=[], cpu=[], seqs=0, clock=clock) for name in names}
    bar = tqdm(total=reps * len(names), desc=desc or "timing", disable=not progress, leave=False)
    for rep in range(reps):
        plan = {name: variants[name](rep) for name in names}
        wall = dict.fromkeys(names, 0.0)
        cpu = dict.fromkeys(names, 0.0)
        for k in range(max(len(steps) for steps, _ in plan.values())):
            shift = (rep + k) % len(names)
            for name in names[shift:] + names[:shift]:
                steps = plan[name][0]
                if k >= len(steps):
                    continue
                sync(device)
                wall0, cpu0 = time.perf_counter(), time.process_time()
                steps[k]()
                sync(device)
                wall[name] += time.perf_counter() - wall0
                cpu[name] += time.process_time() - cpu0
        for name in names:
            r = result[name]
            r["wall"].append(wall[name])
            r["cpu"].append(cpu[name])
            r["seconds"].append(cpu[name] if clock == "cpu" else wall[name])
            r["seqs"] = plan[name][1]
            bar.update(1)
    bar.close()
    return result


def summarize(timed: dict[str, Timing], baseline: str) -> dict[str, dict]:
    """Per variant: median seconds, seq/s, and the median per-repetition throughput ratio vs ``baseline``
    on the primary clock (``ratio_vs_<baseline>``) and on wall time (``wall_ratio_vs_<baseline>``)."""
    out = {}
    base = timed[baseline]
    for name, t in timed.items():
        secs = t["seconds"]
        med = statistics.median(secs)
        row = {
            "seqs_per_call": t["seqs"],
            "clock": t.get("clock", "wall"),
            "median_s": med,
            "seqs_per_s": t["seqs"] / med,
        }
        for prefix, mine, theirs in (("", t["seconds"], base["seconds"]), ("wall_", t["wall"], base["wall"])):
            ratios = [(t["seqs"] / s) / (base["seqs"] / b) for s, b in zip(mine, theirs)]
            row[f"{prefix}ratio_vs_{baseline}"] = statistics.median(ratios)
            row[f"{prefix}ratio_min"], row[f"{prefix}ratio_max"] = min(ratios), max(ratios)
        row["wall_seqs_per_s"] = t["seqs"] / statistics.median(t["wall"])
        row["seconds"], row["wall"] = secs, t["wall"]
        out[name] = row
    return out


def median_ratio(timed: dict[str, Timing], num: str, den: str) -> float:
    """Median over repetitions of throughput(num) / throughput(den), both timed in the same repetition."""
    a, b = timed[num], timed[den]
    return statistics.median((a["seqs"] / x) / (b["seqs"] / y) for x, y in zip(a["seconds"], b["seconds"]))


# ---- model FLOPs utilisation ------------------------------------------------------------------------
# Dense peak TFLOPS per device name fragment and dtype (NVIDIA datasheets, SXM, no sparsity). A CPU has no
# entry: pass --peak-tflops to get an MFU there.
PEAK_TFLOPS = {
    "H200": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "H100": {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5},
}


def add_peak_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device dense peak for the MFU figure (default: known GPUs, e.g. H200 989 bf16 / 67 fp32; none on CPU)",
    )


def peak_tflops(device: torch.device, dtype: torch.dtype, override: float | None = None) -> tuple[float | None, str]:
    """(peak dense TFLOPS, where the number comes from) for ``dtype`` on ``device``; (None, why) when unknown."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no known peak for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    key = str(dtype).removeprefix("torch.")
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name and key in table:
            return table[key], f"{fragment} datasheet, {key} dense"
    return None, f"no known peak for {name} {key} (pass --peak-tflops)"


def useful_mfu(tokens_per_s: float, flops_per_token: int, peak: float | None) -> float | None:
    """Useful-token MFU: real (non-padding, non-virtual) tokens/s x linear-layer FLOPs per token / peak."""
    return None if not peak else tokens_per_s * flops_per_token / (peak * 1e12)


# ---- targets and writers --------------------------------------------------------------------------
def target(
    name: str, measured: float, threshold: float, *, higher_is_better: bool = True, unit: str = "x", note: str = ""
) -> dict:
    """A pass/fail line: met or not, and by how much (measured - threshold, signed so + is good)."""
    met = measured >= threshold if higher_is_better else measured <= threshold
    margin = measured - threshold if higher_is_better else threshold - measured
    return {
        "name": name,
        "measured": measured,
        "threshold": threshold,
        "op": ">=" if higher_is_better else "<=",
        "unit": unit,
        "met": bool(met),
        "margin": margin,
        "note": note,
    }


def targets_section(targets: list[dict]) -> list[str]:
    """A report's "## Targets" markdown block (met / missed, by how much)."""
    rows = [fmt_target(t) for t in targets]
    return ["## Targets", "", md_table(["target", "want", "measured", "status", "margin"], rows), ""]


def fmt_target(t: dict) -> list[str]:
    unit = t["unit"]
    val = f"{t['measured']:.3f}{unit}" if unit == "x" else f"{t['measured']:.2f}{unit}"
    thr = f"{t['op']} {t['threshold']:g}{unit}"
    margin = f"{t['margin']:+.3f}{unit}" if unit == "x" else f"{t['margin']:+.2f}{unit}"
    return [t["name"], thr, val, "MET" if t["met"] else "MISSED", margin]


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def write_json(out: str | Path, name: str, data: dict) -> Path:
    path = Path(out) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def write_markdown(out: str | Path, name: str, text: str) -> Path:
    path = Path(out) / f"{name}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")
    return path


def plot_lines(
    path: str | Path,
    series: dict[str, tuple[list, list]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logx: bool = True,
    hlines: dict[str, float] | None = None,
) -> Path:
    """One PNG with a line per series (matplotlib Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    for k, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle=["--", ":", "-."][k % 3], linewidth=1, color="gray", label=label)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)

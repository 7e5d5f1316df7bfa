"""``bench.kinds`` output: the markdown report and the bar chart of its result dict."""

from __future__ import annotations

from pathlib import Path

from . import common

NAME = "kinds"
BASE = "backbone-only"
_R = f"ratio_vs_{BASE}"


def _mix_line(mix: dict) -> str:
    return (
        f"{mix['rows']} rows, {mix['tokens']} real tokens (mean {mix['mean']:.1f}, p50 {mix['p50']}, p90 {mix['p90']}, "
        f"p99 {mix['p99']}, max {mix['max']}; lognormal median {mix['median_target']:g}, sigma {mix['sigma']}, "
        f"clipped to {mix['max_len']}, seed {mix['seed']})"
    )


def _kinds_of(v: dict) -> str:
    rows = v.get("rows_by_kind")
    if not rows:
        return "none (no adapter)"
    return ", ".join(f"{k} {n}" for k, n in rows.items())


def _variant_table(result: dict) -> str:
    rows = []
    for name, v in result["variants"].items():
        virtual = v.get("prompt_tokens_per_rep", 0) + 0.0
        rows.append(
            [
                name,
                f"{v['seqs_per_s']:.2f}",
                f"{v['tokens_per_s']:.0f}",
                f"**{v[_R]:.3f}**",
                f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}",
                f"{v[f'wall_{_R}']:.3f}",
                f"{v['stream_ratio']:.3f}",
                f"{v['extra_ms_per_row']:+.2f}",
                f"{virtual / result['mix']['tokens']:+.0%}" if virtual else "-",
                f"{v['distinct_per_batch']:g}" if "distinct_per_batch" in v else "-",
                _kinds_of(v),
            ]
        )
    clock = next(iter(result["variants"].values()))["clock"]
    headers = [
        "variant",
        f"seq/s ({clock})",
        f"real tok/s ({clock})",
        f"x {BASE} ({clock}, median)",
        "min-max",
        "x (wall)",
        "x per stream token",
        "extra ms/row",
        "prompt tokens in the stream",
        "adapters/batch",
        "rows by kind (all reps)",
    ]
    return common.md_table(headers, rows)


def _memory_table(memory: dict) -> str:
    mib = lambda n: f"{n / 2**20:.3f}"  # noqa: E731
    rows = [
        [
            k,
            f"{m['body_params']:,}",
            mib(m["packed_bytes"]),
            mib(m["device_bytes_float32"]),
            mib(m["body_bytes_float32"]),
            mib(m["device_bytes_bfloat16"]),
            mib(m["body_bytes_bfloat16"]),
            f"{2**30 // m['device_bytes_float32']:,}",
        ]
        for k, m in memory.items()
    ]
    headers = [
        "kind",
        "body params",
        "packed file MiB",
        "device MiB fp32",
        "of which body (no head) fp32",
        "device MiB bf16",
        "body bf16",
        "per GiB (fp32, with head)",
    ]
    return common.md_table(headers, rows)


def report(result: dict, out: Path) -> None:
    s, mem = result["setup"], result["memory"]
    head = next(iter(mem.values()))["head_bytes"]
    lines = [
        "# All adapter kinds in one batch",
        "",
        f"Machine: {common.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}`  (reps={result['reps']}, wall {result['wall_s']:.0f} s)",
        "",
        f"Backbone `{s['backbone']}` on {s['device']}, served in **{s['dtype']}**. Resident in one engine: "
        f"{s['resident']} adapters, {s['per_kind']} of each kind (prefix P={s['p']}, prompt Q={s['q']}, LoRA r=8 on "
        "query/value, IA3 with PEFT's defaults, bottleneck Pfeiffer reduction 16), seeded random, each with its own "
        f"RoBERTa head ({head / 2**20:.2f} MiB fp32); loaded in {s['load_s']:.0f} s; cache during timing: "
        f"{s['cache']['hits']} hits, {s['cache']['misses']} misses.",
        "",
        f"Mix: {_mix_line(result['mix'])}, arrival batches of {s['batch']}.",
        "",
        f"**`{BASE}`** is the fair floor: the same packed encoder on the same rows (tokenize + pack + forward) plus "
        "ONE shared head on token 0, i.e. serving the batch with no adapter at all (the engine itself has no "
        "adapter-less rows). `mixed-all-kinds`: row j on adapter j of an order interleaving the kinds, so each "
        "batch holds every kind; `mixed-weight-kinds`: the same over LoRA / IA3 / bottleneck only; `only-<kind>`: "
        "all rows of that kind, over its adapters. Ratios are medians of per-repetition ratios of variants timed "
        "batch by batch in a rotated order; on CPU the clock is process CPU time (wall-time ratio beside it). "
        "Throughput counts real tokens only. `extra ms/row`: median per repetition of (variant - backbone-only) "
        "time / rows, the incremental cost of serving a row with that adapter kind.",
        "",
    ]
    lines += common.targets_section(result["targets"])
    lines += [f"- {t['name']}: {t['note']}" for t in result["targets"] if t.get("note")]
    lines += [
        "",
        "## Throughput by variant",
        "",
        _variant_table(result),
        "",
        "Prompt rows carry Q virtual tokens through every layer (the `prompt tokens` column: stream tokens added "
        "over the real ones), prefix rows attend over P extra keys per layer: both legitimately cost more than a "
        "plain row. `x per stream token` divides that out (throughput in real + prompt tokens vs the floor's): "
        "what remains is the adapters' own overhead, including the extra attention groups (padding, more "
        "kernel calls) that rows of different virtual lengths split a batch into. The weight kinds add segmented "
        "low-rank / vector / bottleneck math on their own rows only, plus one copy of the point's tensor per "
        "active point.",
        "",
        "## Memory per adapter",
        "",
        "Packed file (`format.dump_packed`) and `DeviceAdapter.nbytes` (what the LRU cache counts), for the first "
        "adapter of each kind through `Engine.to_device`. The head stays fp32 in both serving dtypes "
        f"({head / 2**20:.3f} MiB of every adapter); the body follows the serving dtype.",
        "",
        _memory_table(mem),
        "",
    ]
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in result.get("plots", [])]
    common.write_markdown(out, NAME, "\n".join(lines))


def plot(result: dict, out: Path) -> list[str]:
    """``kinds_cost.png``: throughput / backbone-only per variant (target line), extra ms per row beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["variants"] if n != BASE]
    ratios = [result["variants"][n][_R] for n in names]
    extra = [result["variants"][n]["extra_ms_per_row"] for n in names]
    colors = ["tab:red" if n.startswith("mixed") else "tab:blue" for n in names]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    ax1.bar_label(ax1.bar(names, ratios, color=colors), fmt="%.2f", fontsize=7)
    ax1.axhline(1.0, color="gray", linewidth=1)
    ax1.axhline(result["targets"][0]["threshold"], color="black", linestyle="--", linewidth=1, label="target (mixed)")
    ax1.set_ylabel(f"throughput / {BASE}")
    ax1.legend(fontsize=8, loc="lower right")
    ax2.bar_label(ax2.bar(names, extra, color=colors), fmt="%+.1f", fontsize=7)
    ax2.axhline(0.0, color="gray", linewidth=1)
    ax2.set_ylabel(f"extra ms per row vs {BASE} ({next(iter(result['variants'].values()))['clock']} time)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=35, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    s = result["setup"]
    fig.suptitle(
        f"{s['resident']} adapters ({s['per_kind']} per kind), {result['mix']['rows']} rows, batch {s['batch']}, "
        f"{s['dtype']} on {s['device']}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(out) / "kinds_cost.png"
    fig.savefig(path)
    plt.close(fig)
    return [str(path)]

"""``bench.realistic`` output: the markdown report and the PNG plots of its result dict."""

from __future__ import annotations

from pathlib import Path

from . import common

NAME = "realistic"


def _mix_line(mix: dict) -> str:
    return (
        f"{mix['rows']} rows, {mix['tokens']} real tokens (mean {mix['mean']:.1f}, p50 {mix['p50']}, p90 {mix['p90']}, "
        f"p99 {mix['p99']}, max {mix['max']}; lognormal median {mix['median_target']:g}, sigma {mix['sigma']}, "
        f"clipped to {mix['max_len']}, seed {mix['seed']})"
    )


def _variant_table(block: dict, mfu: bool = False) -> str:
    base = block["baseline"]
    rows = []
    for name, v in block["variants"].items():
        row = [
            name,
            f"{v['seqs_per_s']:.2f}",
            f"{v['tokens_per_s']:.0f}",
            f"{v[f'ratio_vs_{base}']:.3f}",
            f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}",
            f"{v[f'wall_ratio_vs_{base}']:.3f}",
        ]
        if mfu:
            row.append("-" if v.get("useful_mfu") is None else f"{v['useful_mfu']:.1%}")
        rows.append(row)
    clock = next(iter(block["variants"].values()))["clock"]
    headers = [
        "variant",
        f"seq/s ({clock})",
        f"real tok/s ({clock})",
        f"x {base} ({clock}, median)",
        "min-max",
        f"x {base} (wall, median)",
    ]
    return common.md_table(headers + (["useful MFU"] if mfu else []), rows)


def report(result: dict, out: Path) -> None:
    setup, main = result["setup"], result["main"]
    lines = [
        "# Realistic mix throughput",
        "",
        f"Machine: {common.machine_line(result['machine'])}",
        "",
        f"Command: `{result['command']}`  (reps={result['reps']}, wall {result['wall_s']:.0f} s)",
        "",
        f"Backbone `{setup['backbone']}` on {setup['device']}; our engine and hf-sorted in **{setup['dtype']}** "
        f"(dtype auto here = {setup['auto_dtype']}; CPU native bf16: {setup['cpu_fast_bf16']}). "
        f"{setup['adapter_note']} "
        f"({setup['adapter_bytes'] / 2**20:.2f} MiB each with its head). Useful-token MFU peak: "
        f"{result['peak_tflops'] or '-'} TFLOPS ({result['peak_source']}); linear-layer FLOPs per real token "
        f"{setup['flops_per_token'] / 1e6:.0f} M.",
        "",
        f"Mix: {_mix_line(main['mix'])}, batches of 32 in arrival order.",
        "",
        "Ratios are medians of per-repetition ratios of variants timed in the same repetition (interleaved, "
        "rotated order); on CPU the primary clock is process CPU time, wall-time ratios beside it. Throughput "
        "counts real tokens only (no padding, no virtual tokens). Only the ratios are claims.",
        "",
    ]
    if setup["onnx_note"]:
        lines += [f"ONNX Runtime: {setup['onnx_note']}", ""]
    lines += common.targets_section(result["targets"])
    lines += [f"- {t['name']}: {t['note']}" for t in result["targets"] if t.get("note")]
    lines += ["", "## Variants on the mix", "", _variant_table(main, mfu=True), ""]
    bf = result.get("bf16")
    if bf:
        lines += [
            f"## bf16 vs fp32 of our engine on this CPU ({_mix_line(bf['mix'])})",
            "",
            f"engine-bf16 / engine-fp32: **{bf['ratio']:.3f}x** (informative: without AVX512-BF16/AMX, bf16 is "
            "emulated; this is why dtype auto stays fp32 here).",
            "",
            _variant_table(bf),
            "",
        ]
    if result.get("length_sweep"):
        rows = result["length_sweep"][0]["mix"]["rows"]
        lines += [
            "## Throughput against the length distribution",
            "",
            f"One repetition per point, {rows} rows each: hf-sorted sorts only {rows} rows into "
            f"{-(-rows // 32)} bucket(s) here ({main['mix']['rows']} in the main run), so its padding, and the "
            "engine's lead, are larger than in the main table at the same median. The plot shows the shape; the "
            "main table is the claim.",
            "",
            "![length](realistic_length.png)",
            "",
        ]
        for point in result["length_sweep"]:
            lines += [f"### median {point['median']:g}: {_mix_line(point['mix'])}", "", _variant_table(point), ""]
    ds = result.get("distinct_sweep")
    if ds:
        lines += [
            "## Throughput against distinct adapters",
            "",
            f"{_mix_line(ds['mix'])}; row j uses adapter (rep*rows + j) % N, all resident.",
            "",
            "![distinct](realistic_distinct.png)",
            "",
            _variant_table(ds),
            "",
        ]
    common.write_markdown(out, NAME, "\n".join(lines))


def _clock(block: dict) -> str:
    return next(iter(block["variants"].values()))["clock"]


def plot(result: dict, out: Path) -> list[str]:
    paths = []
    sweep = result.get("length_sweep") or []
    if sweep:
        names = list(sweep[0]["variants"])
        series = {
            n: ([p["median"] for p in sweep], [p["variants"][n]["tokens_per_s"] for p in sweep])
            for n in names
            if all(n in p["variants"] for p in sweep)
        }
        path = out / "realistic_length.png"
        common.plot_lines(
            path,
            series,
            xlabel="median tokens per row (lognormal, sigma 0.9, clipped to 256)",
            ylabel=f"real tokens / s ({_clock(sweep[0])} clock)",
            title="Useful-token throughput vs length distribution (batches of 32)",
        )
        paths.append(str(path))
    ds = result.get("distinct_sweep")
    if ds:
        pts = sorted(
            (int(n.split("-")[1]), v["tokens_per_s"]) for n, v in ds["variants"].items() if n.startswith("engine-")
        )
        hl = (
            {"hf-sorted (no adapters)": ds["variants"]["hf-sorted"]["tokens_per_s"]}
            if "hf-sorted" in ds["variants"]
            else {}
        )
        path = out / "realistic_distinct.png"
        common.plot_lines(
            path,
            {"engine": ([a for a, _ in pts], [b for _, b in pts])},
            xlabel="distinct adapters",
            ylabel=f"real tokens / s ({_clock(ds)} clock)",
            title="Useful-token throughput vs distinct adapters (realistic mix)",
            hlines=hl,
        )
        paths.append(str(path))
    return paths

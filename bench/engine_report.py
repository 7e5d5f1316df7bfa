"""Engine bench output: the markdown report and the PNG plots of ``bench.engine``'s result dict."""

from __future__ import annotations

from pathlib import Path

from . import common


def report(result: dict, out: Path) -> None:
    m = result["machine"]
    lines = [
        "# Engine throughput",
        "",
        f"Machine: {common.machine_line(m)}",
        "",
        f"Command: `{result['command']}`  (reps={result['reps']}, wall {result['wall_s']:.0f} s)",
        "",
        "Throughput ratios are medians of per-repetition ratios vs backbone-only timed in the same "
        "repetition (variants interleaved, order rotated). On CPU the primary clock is process CPU "
        "time (robust to other jobs on a shared box); wall-time ratios are shown beside it. "
        "seq/s is context only.",
        "",
        f"Serving dtype {result.get('dtype', 'float32')}; useful MFU = real tokens/s x "
        f"{result.get('flops_per_token', 0) / 1e6:.0f} MFLOP per token (linear layers) / peak "
        f"{result.get('peak_tflops') or '-'} TFLOPS ({result.get('peak_source', 'unknown')}).",
        "",
    ]
    if result["targets"]:
        lines += common.targets_section(result["targets"])
    for g in result["groups"]:
        lines += [
            f"## {g['kind']}, P={g['p']}, batch {g['batch']}, {g['tokens']} tokens",
            "",
            f"Resident adapters: {g['resident_cap']} x {g['adapter_bytes'] / 2**20:.2f} MiB on the device "
            f"(packed file {g['packed_bytes'] / 2**20:.2f} MiB); cache {g['cache']}",
            "",
        ]
        rows = [
            [
                n,
                f"{v['seqs_per_s']:.2f}",
                f"{v['ratio_vs_backbone-only']:.3f}",
                f"{v['ratio_min']:.3f}-{v['ratio_max']:.3f}",
                f"{v['wall_ratio_vs_backbone-only']:.3f}",
                "-" if v.get("useful_mfu") is None else f"{v['useful_mfu']:.1%}",
            ]
            for n, v in g["variants"].items()
        ]
        clock = next(iter(g["variants"].values()))["clock"]
        lines += [
            common.md_table(
                [
                    "variant",
                    f"seq/s ({clock} clock)",
                    f"x backbone-only ({clock}, median)",
                    "min-max",
                    "x backbone-only (wall, median)",
                    "useful MFU",
                ],
                rows,
            ),
            "",
        ]
        if "mixed100_vs_peft100" in g:
            lines += [f"mixed-100 / peft-100 (same reps): **{g['mixed100_vs_peft100']:.3f}x**", ""]
    prof = result.get("profile")
    if prof:
        lines += [
            f"## Where the time goes (prefix P={prof['p']}, batch {prof['batch']}, {prof['tokens']} tokens, "
            f"{prof['distinct_in_batch']} adapters per batch)",
            "",
            common.md_table(["phase", "median ms"], [[k, f"{v * 1e3:.1f}"] for k, v in prof["phases_s"].items()]),
            "",
        ]
        for label, table in prof["torch_profiler"].items():
            lines += [f"### torch.profiler, {label} (one batch, top ops by self CPU)", "", "```", table, "```", ""]
    common.write_markdown(out, "engine", "\n".join(lines))


def plot(result: dict, out: Path) -> list[str]:
    paths = []
    for metric, fname, ylabel in (
        ("ratio_vs_backbone-only", "engine_ratio.png", "throughput / backbone-only"),
        ("seqs_per_s", "engine_throughput.png", "sequences / s"),
    ):
        series, hl = {}, {}
        for g in result["groups"]:
            tag = f"{g['kind']} P={g['p']} b={g['batch']} t={g['tokens']}"
            v = g["variants"]
            mixed_pts = sorted((int(n.split("-")[1]), x[metric]) for n, x in v.items() if n.startswith("mixed-"))
            peft_pts = sorted((int(n.split("-")[1]), x[metric]) for n, x in v.items() if n.startswith("peft-"))
            series[f"engine, {tag}"] = ([a for a, _ in mixed_pts], [b for _, b in mixed_pts])
            if peft_pts:
                series[f"PEFT set_adapter, {tag}"] = ([a for a, _ in peft_pts], [b for _, b in peft_pts])
            for n, x in v.items():
                if n.startswith("one-at-a-time-"):
                    series[f"one request at a time, {tag}"] = ([int(n.rsplit("-", 1)[1])], [x[metric]])
            if metric == "seqs_per_s":
                hl[f"backbone-only {tag}"] = v["backbone-only"][metric]
        if metric != "seqs_per_s":
            hl = {"backbone-only = 1.0": 1.0, "target 0.97": 0.97}
        common.plot_lines(
            out / fname,
            series,
            xlabel="distinct adapters (PEFT: tenants)",
            ylabel=ylabel,
            title="Mixed-adapter throughput vs number of distinct adapters",
            hlines=hl,
        )
        paths.append(str(out / fname))
    return paths

"""The bench scripts run end to end on a tiny synthetic backbone and write their results.

No timing assertions: this only proves the code paths (engine variants, PEFT baseline, profile,
memory sizing, cache thrash, summary) work and produce well-formed JSON / markdown / PNG.
"""

from __future__ import annotations

import json

import pytest

from bench import engine as engine_bench
from bench import memory as memory_bench
from bench import run_all


@pytest.fixture(scope="module")
def bench_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    return [
        "--shape",
        "tiny",
        "--cache-dir",
        str(root / "cache"),
        "--out",
        str(root / "results"),
        "--device",
        "cpu",
        "--no-progress",
    ], root / "results"


def test_engine_bench_writes_ratios_and_targets(bench_dirs):
    common_args, out = bench_dirs
    result = engine_bench.main(
        common_args
        + [
            "--kinds",
            "prefix",
            "--distinct",
            "1",
            "10",
            "12",
            "--peft-tenants",
            "2",
            "--reps",
            "1",
            "--batch",
            "8",
            "--tokens",
            "16",
        ]
    )
    group = result["groups"][0]
    names = set(group["variants"])
    assert {"backbone-only", "mixed-1", "mixed-10", "one-at-a-time-12", "peft-2"} <= names
    assert group["variants"]["backbone-only"]["ratio_vs_backbone-only"] == pytest.approx(1.0)
    assert all(v["seqs_per_s"] > 0 for v in group["variants"].values())
    assert group["cache"]["misses"] == 0  # everything asked for was resident
    assert "engine: gather K/V" in result["profile"]["phases_s"]
    assert [t["name"].split()[0] for t in result["targets"]] == ["mixed", "throughput"]
    saved = json.loads((out / "engine.json").read_text())
    assert saved["groups"][0]["kind"] == "prefix"
    assert (out / "engine.md").read_text().startswith("# Engine throughput")
    assert (out / "engine_ratio.png").stat().st_size > 1000


def test_memory_bench_sizes_and_thrash(bench_dirs):
    common_args, out = bench_dirs
    result = memory_bench.main(
        common_args
        + [
            "--p",
            "10",
            "200",
            "--sample",
            "2",
            "--fit",
            "2",
            "--hot",
            "6",
            "--reps",
            "1",
            "--batch",
            "4",
            "--tokens",
            "16",
        ]
    )
    by = {(s["kind"], s["p"]): s for s in result["sizes"]}
    assert by[("prefix", 200)]["device_bytes"] > by[("prefix", 10)]["device_bytes"]
    for s in result["sizes"]:  # the device copy holds the same tensors as the file (fp32 backbone)
        assert s["device_bytes"] == s["raw_tensor_bytes"] == s["measured_bytes"]  # no hidden views
        assert s["fits"]["8GiB"] >= 8 * s["fits"]["1GiB"] - 8
    thrash = result["thrash"]
    assert thrash["thrash_cache"]["misses"] > 0 and thrash["resident_cache"]["misses"] == 0
    assert thrash["thrash_vs_resident"] > 0
    assert (out / "memory.md").exists() and (out / "memory_fit.png").exists()


def test_summary_collects_targets(bench_dirs):
    _, out = bench_dirs
    targets, path = run_all.write_summary(run_all.parse_args(["--out", str(out), "--summary-only"]), [])
    text = path.read_text()
    assert "## Targets" in text and targets and "engine" in {t["source"] for t in targets}


def test_full_grid_flags():
    args = engine_bench.parse_args(["--full"])
    assert args.p == [10, 20, 50, 200] and args.batch == [1, 8, 32] and args.tokens == [64, 128]
    assert args.distinct[-1] == 10000 and args.peft_tenants == [1, 10, 100]
    quick = engine_bench.parse_args(["--quick"])
    assert quick.distinct == [1, 10, 100] and quick.reps == 3

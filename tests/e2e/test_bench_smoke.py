"""The bench scripts run end to end on a tiny synthetic backbone and write their results.

No timing assertions: this only proves the code paths (engine variants, PEFT baseline, profile,
memory sizing, cache thrash, the realistic mix and its baselines, the attention plan, summary) work and
produce well-formed JSON / markdown / PNG.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bench import attention_plan, realistic, run_all
from bench import engine as engine_bench
from bench import memory as memory_bench
from prefixserve.adapters.backbone import resolve_dtype


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
    assert "engine: pack + gather K/V" in result["profile"]["phases_s"]
    assert all(v["tokens_per_s"] > 0 and "useful_mfu" in v for v in group["variants"].values())
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


def test_realistic_bench_writes_every_variant_and_target(bench_dirs):
    common_args, out = bench_dirs
    onnx = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
    result = realistic.main(
        common_args
        + ["--rows", "16", "--batch", "8", "--p", "4", "--adapters", "12", "--reps", "1", "--bf16-rows", "8"]
        + ["--sweep-medians", "8", "18", "--sweep-distinct", "1", "10", "--sweep-rows", "8"]
        + ([] if onnx else ["--no-onnx"])
    )
    main = result["main"]
    names = {"engine", "hf-sorted", "previous-engine-fp32"} | ({"onnx-fp32"} if onnx else set())
    assert names <= set(main["variants"])
    assert all(v["seqs_per_s"] > 0 and v["tokens_per_s"] > 0 for v in main["variants"].values())
    assert main["mix"]["rows"] == 16 and main["variants"]["engine"]["tokens_per_call"] == main["mix"]["tokens"]
    default = str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")  # bf16 on AMX / AVX512-BF16
    assert result["setup"]["resident"] == 12 and result["setup"]["dtype"] == default
    kinds = [t["name"].split(" / ")[0] for t in result["targets"]]
    assert kinds[:3] == ["realistic: engine", "realistic: engine fp32", f"realistic: default dtype ({default}) engine"]
    assert len(kinds) == (4 if onnx else 3) and all(isinstance(t["met"], bool) for t in result["targets"])
    if default == "float32":  # bf16 emulated here: measured in its own smaller pair
        assert result["bf16"]["ratio"] > 0
    else:  # native bf16: the main set already times the engine in both dtypes
        assert "bf16" not in result and {"engine", "engine-fp32"} <= set(main["variants"])
    assert result["headline"]
    assert [p["median"] for p in result["length_sweep"]] == [8, 18]
    assert set(result["distinct_sweep"]["variants"]) == {"engine-1", "engine-10", "hf-sorted"}
    saved = json.loads((out / "realistic.json").read_text())
    assert {"main", "length_sweep", "distinct_sweep", "setup", "targets", "machine"} <= set(saved)
    assert ("bf16" in saved) == (default == "float32")
    assert (out / "realistic.md").read_text().startswith("# Realistic mix throughput")
    assert (out / "realistic_length.png").stat().st_size > 1000 and (out / "realistic_distinct.png").exists()


def test_previous_engine_baseline_computes_the_same_logits(bench_dirs):
    """The reconstructed pre-#12 engine is a fair baseline only if it computes what the engine computes."""
    from transformers import AutoModel

    from bench.baseline_padded import PaddedEngine
    from bench.common import synthetic_backbone_dir
    from bench.mix import make_mix
    from bench.workloads import AdapterSet
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Row

    common_args, _ = bench_dirs
    folder = synthetic_backbone_dir("tiny", common_args[common_args.index("--cache-dir") + 1])
    bb = load_backbone(str(folder), device="cpu")
    aset = AdapterSet(bb, "prefix", 5, resident=3, progress=False)
    old = PaddedEngine(AutoModel.from_pretrained(str(folder), add_pooling_layer=False).eval(), bb.tokenizer)
    mix = make_mix(bb.tokenizer, 12, median=10)
    assert len(set(mix.lengths)) > 3  # the rows really differ in length: padding is exercised
    rows = [Row(aset.get(j % 3), t) for j, t in enumerate(mix.texts)]
    new, _ = aset.engine.forward(rows)
    for a, b in zip(new, old.forward(rows)):
        assert torch.allclose(a, b, atol=1e-4)


def test_kinds_bench_mixes_every_kind(bench_dirs):
    from bench import kinds as kb

    common_args, out = bench_dirs
    r = kb.main(common_args + ["--per-kind", "4", "--rows", "16", "--batch", "8", "--reps", "1"])
    assert set(r["variants"]) == {
        "backbone-only",
        "mixed-all-kinds",
        "mixed-weight-kinds",
        *(f"only-{k}" for k in kb.KINDS),
    }
    assert r["setup"]["cache"]["misses"] == 0 and set(r["memory"]) == set(kb.KINDS)
    assert set(r["variants"]["mixed-all-kinds"]["rows_by_kind"]) == set(kb.KINDS)
    assert (out / "kinds_cost.png").stat().st_size > 1000


def test_attention_plan_reports_a_winner(bench_dirs):
    common_args, out = bench_dirs
    result = attention_plan.main(
        common_args
        + ["--rows", "16", "--fixed-rows", "8", "--batch", "8", "--p", "4", "--adapters", "8", "--reps", "1"]
        + ["--slacks", "0", "1e9"]
    )
    labels = {"slack-0", "slack-1e9", result["baseline"]}
    assert [c["case"] for c in result["cases"]] == ["realistic mix", "fixed 64 tokens"]
    for case in result["cases"]:
        assert set(case["variants"]) == labels
        assert case["variants"]["slack-0"]["key_padding"] == 0.0  # equal-length groups only
    fixed = result["cases"][1]["variants"]
    assert all(v["groups_per_batch"] == 1 for v in fixed.values())  # one length: one group whatever the slack
    assert result["winner"] in labels
    assert (out / "attention_plan.md").read_text().startswith("# Attention plan")


def test_slack_patch_reaches_the_encoder(bench_dirs):
    """``slack_of`` must change the plan ``PackedEncoder.pack`` builds (else the bench times one plan six times)."""
    from bench.common import synthetic_backbone_dir
    from prefixserve.adapters.backbone import load_backbone

    common_args, _ = bench_dirs
    bb = load_backbone(str(synthetic_backbone_dir("tiny", common_args[common_args.index("--cache-dir") + 1])))
    ids = [[0, 5, 2], [0, 5, 6, 2], [0, 5, 6, 7, 8, 2]]
    with attention_plan.slack_of(0.0):
        assert len(bb.encoder.pack(ids).groups or []) == 3
    with attention_plan.slack_of(1e9):
        assert len(bb.encoder.pack(ids).groups or []) == 1


def test_summary_collects_targets(bench_dirs):
    _, out = bench_dirs
    targets, path = run_all.write_summary(run_all.parse_args(["--out", str(out), "--summary-only"]), [])
    text = path.read_text()
    assert "## Targets" in text and targets and {"engine", "realistic"} <= {t["source"] for t in targets}
    assert "attention plan: fastest CPU slack" in text


def test_full_grid_flags():
    args = engine_bench.parse_args(["--full"])
    assert args.p == [10, 20, 50, 200] and args.batch == [1, 8, 32] and args.tokens == [64, 128]
    assert args.distinct[-1] == 10000 and args.peft_tenants == [1, 10, 100]
    quick = engine_bench.parse_args(["--quick"])
    assert quick.distinct == [1, 10, 100] and quick.reps == 3

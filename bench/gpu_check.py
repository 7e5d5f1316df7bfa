"""``make gpu-check``: everything a GPU session must verify, in one script (<= 8 minutes on one GPU).

    python -m bench.gpu_check [--skip-tests] [--skip-bench]

1. The parity tests on CUDA: ``load_backbone`` picks CUDA when it is there, so the PEFT-parity and
   packed-encoder tests run the engine on the GPU in fp32 (the references stay on CPU, fp32, 1e-5).
2. bf16 / varlen on CUDA: the engine in bf16 (variable-length flash attention, no padding) against the
   engine in fp32 on CPU over rows mixed over 20 adapters of all five kinds: label agreement, max probability
   difference, and that the varlen path really ran.
3. The engine benchmarks at realistic mixes on CUDA (arrival batches of 32 and of 256 rows): sequences/s and
   useful-token MFU; where a batch's time goes (``bench.gpu_profile``: stages and top operators, prefix rows
   and all five kinds); all kinds mixed over 1,000 adapters (``bench.kinds``). Results in ``--out``
   (bench/results/gpu).

Device time is scarce: every step has its own timeout and the script prints one summary at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step(name: str, cmd: list[str], timeout: int, summary: dict) -> None:
    t0 = time.perf_counter()
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    rc: int | str
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"}).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    summary[name] = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}


def bf16_agreement(device: str = "cuda", dtype: str = "auto") -> dict:
    """Engine in ``dtype`` on ``device`` (bf16 on CUDA) vs engine fp32 on CPU, same rows, same adapters."""
    import torch

    from prefixserve.adapters import encoder as encoder_module
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.adapters.kinds import KINDS
    from prefixserve.adapters.synthetic import make_backbone, random_adapter

    if device == "cuda" and not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    folder = make_backbone(Path(tempfile.mkdtemp()) / "small", "roberta", hidden=256, layers=4, heads=4, seed=3)
    ref = load_backbone(str(folder), device="cpu", dtype="float32")
    gpu32 = load_backbone(str(folder), device=device, dtype="float32")
    gpu16 = load_backbone(str(folder), device=device, dtype=dtype)
    adapters = [
        random_adapter(ref.config, ref.fingerprint, kind=KINDS[i % len(KINDS)], num_virtual_tokens=4 + i, seed=i)
        for i in range(20)
    ]
    words = "the movie was good bad great terrible boring fun plot actors story 영화 재미 최고".split()
    gen = torch.Generator().manual_seed(0)
    texts = [
        " ".join(words[int(j)] for j in torch.randint(len(words), (int(n),), generator=gen))
        for n in torch.randint(1, 60, (512,), generator=gen)
    ]
    used_varlen = []
    real_varlen = encoder_module.varlen

    def spy(*args):
        used_varlen.append(True)
        return real_varlen(*args)

    encoder_module.varlen = spy
    probs = {}
    for name, bb in (("cpu32", ref), ("cuda32", gpu32), ("cuda_auto", gpu16)):
        engine = Engine(bb)
        loaded = [engine.adapter(f"t/a{i}@1", functools.partial(adapters.__getitem__, i)) for i in range(len(adapters))]
        out = []
        for s in range(0, len(texts), 64):
            rows = [Row(loaded[(s + j) % len(loaded)], t) for j, t in enumerate(texts[s : s + 64])]
            out += [torch.softmax(lg, -1) for lg in engine.forward(rows)[0]]
        probs[name] = out
    encoder_module.varlen = real_varlen

    def compare(a: str, b: str) -> dict:
        agree = sum(int(x.argmax() == y.argmax()) for x, y in zip(probs[a], probs[b]))
        diff = max(float((x - y).abs().max()) for x, y in zip(probs[a], probs[b]))
        return {"label_agreement": agree / len(texts), "max_prob_diff": diff}

    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "auto_dtype": str(gpu16.dtype),
        "varlen_used": bool(used_varlen),
        "cuda_fp32_vs_cpu_fp32": compare("cuda32", "cpu32"),
        "cuda_auto_vs_cpu_fp32": compare("cuda_auto", "cpu32"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-bench", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu"), help="results folder of the benches")
    args = p.parse_args(argv)
    summary: dict = {}
    py = sys.executable
    if not args.skip_tests:
        tests = [
            "tests/integration/test_engine_parity.py",
            "tests/integration/test_packed_encoder.py",
            "tests/integration/test_all_kinds_mixed.py",
            "tests/unit/test_transfer.py",
        ]
        step("parity tests (CUDA fp32)", [py, "-m", "pytest", "-q", "-p", "no:warnings", *tests], 120, summary)
    t0 = time.perf_counter()
    summary["bf16 agreement"] = bf16_agreement()
    summary["bf16 agreement"]["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary["bf16 agreement"], indent=1), flush=True)
    if not args.skip_bench:
        realistic = [py, "-m", "bench.realistic", "--device", "cuda", "--no-onnx", "--no-progress"]
        # the claim's mix (256 rows, arrival batches of 32, 1,000 prefixes) with its sweeps, then GPU-sized
        # batches of 256 rows without sweeps; each in its own folder (both write realistic.json)
        step("realistic mix (batch 32)", [*realistic, "--out", args.out], 150, summary)
        big = ["--batch", "256", "--rows", "2048", "--sweep-medians", "--sweep-distinct", "--out", f"{args.out}/b256"]
        step("realistic mix (batch 256)", [*realistic, *big], 100, summary)
        profile = [py, "-m", "bench.gpu_profile", "--device", "cuda", "--no-progress", "--out", args.out]
        step("profile (prefix rows)", profile, 60, summary)
        step("profile (all kinds)", [*profile, "--kinds", "prefix", "prompt", "lora", "ia3", "bottleneck"], 60, summary)
        kinds = [py, "-m", "bench.kinds", "--device", "cuda", "--no-progress", "--out", args.out]
        step("all kinds mixed", kinds, 120, summary)
        engine = [py, "-m", "bench.engine", "--quick", "--device", "cuda", "--no-peft", "--no-progress"]
        step(
            "engine (fixed 64 tokens)", [*engine, "--out", args.out], 60, summary
        )  # --no-peft: its set-up takes minutes
    print("\n=== summary\n" + json.dumps(summary, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
    failed = [k for k, v in summary.items() if v.get("rc") not in (None, 0)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

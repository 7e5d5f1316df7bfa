"""Throughput on a realistic request mix: the packed engine vs what else would serve the same rows.

    python -m bench.realistic --quick    # < 3 min on 2 CPU cores (64 rows, 200 adapters, small sweeps)
    python -m bench.realistic            # 256 rows in batches of 32, 1,000 P=20 prefixes, both sweeps

The mix (:mod:`bench.mix`): lognormal token lengths, median 18, clipped to 256, in arrival order; row j
uses adapter (rep*rows + j) % N, all N resident. Variants, interleaved per repetition (rotated order):

* ``engine``: our engine in ``--dtype`` (auto: bf16 where native, fp32 on this CPU), arrival batches of 32,
  1,000 prefixes + heads (tokenize + pack + one forward + heads per batch);
* ``hf-sorted``: ``AutoModel`` forward of the plain backbone, same dtype, rows sorted by length into batches
  of 32 padded to their own longest (a favour: it sees all rows before batching; no adapters, no heads);
* ``previous-engine-fp32``: the pre-#12 engine (:mod:`bench.baseline_padded`), right-padded arrival batches;
* ``onnx-fp32``: ONNX Runtime fp32 plain backbone (:mod:`bench.onnx_backbone`), padded arrival batches (CPU);
* ``engine-fp32`` when ``--dtype`` is not fp32; bf16 of our engine: in the main set on CUDA, on CPU (bf16
  emulated on AVX2, ~4x slower) as its own pair with the fp32 engine on ``--bf16-rows`` rows.

Sweeps (plots): useful tokens/s against the length distribution (medians 8/18/64/128 on ``--sweep-rows``
rows) and against distinct adapters (1/10/100/1000). Throughput counts real tokens (specials included),
never padding or virtual tokens.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import common
from .baseline_padded import PaddedEngine
from .mix import Mix, adapter_of, make_mix
from .realistic_report import plot, report

NAME = "realistic"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.realistic", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common.add_common_args(p)
    common.add_peak_arg(p)
    p.add_argument("--dtype", default="auto", help="our engine's (and hf-sorted's) dtype: auto | float32 | bfloat16")
    p.add_argument("--rows", type=int, default=None, help="rows of the mix (default 256; quick 64)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--p", type=int, default=20, help="prefix length")
    p.add_argument("--adapters", type=int, default=None, help="distinct resident prefixes (default 1000; quick 200)")
    p.add_argument("--max-resident-gb", type=float, default=6.0, help="caps --adapters (fp32 P=20: 3.7 MiB each)")
    p.add_argument("--median", type=float, default=18)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16-rows", type=int, default=None, help="CPU: rows of the bf16-vs-fp32 pair (default 32)")
    p.add_argument("--sweep-medians", type=float, nargs="*", default=None, help="default 8 18 64 128; quick 8 18 64")
    p.add_argument("--sweep-distinct", type=int, nargs="*", default=None, help="default 1 10 100 1000; quick 1 10 100")
    p.add_argument("--sweep-rows", type=int, default=None, help="rows per sweep point (default 64; quick 32)")
    p.add_argument("--sweep-reps", type=int, default=None, help="repetitions per sweep point (default 1)")
    p.add_argument(
        "--sweep-variants",
        nargs="+",
        default=["engine", "hf-sorted"],
        choices=["engine", "hf-sorted", "previous-engine-fp32", "onnx-fp32"],
        help="variants of the length sweep (default: engine hf-sorted; the padded ones cost ~2 min more)",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime baseline")
    args = p.parse_args(argv)
    q = args.quick  # quick: one repetition of 64 rows, a smoke-level figure; the default run is the claim
    args.reps = args.reps or (1 if q else 3)
    args.rows = args.rows or (64 if q else 256)
    args.adapters = args.adapters or (200 if q else 1000)
    args.bf16_rows = args.bf16_rows or 32
    if args.sweep_medians is None:
        args.sweep_medians = [8, 64] if q else [8, 18, 64, 128]
    if args.sweep_distinct is None:
        args.sweep_distinct = [1, 10, 100] if q else [1, 10, 100, 1000]
    args.sweep_rows = args.sweep_rows or (32 if q else 64)
    args.sweep_reps = args.sweep_reps or 1
    return args


# ---- the servers under test ---------------------------------------------------------------------------
class Servers:
    """Everything that serves rows: our engines (per dtype, sharing one set of adapters), HF, the old engine, ORT."""

    def __init__(self, args):
        from prefixserve.adapters.backbone import load_backbone, resolve_device, resolve_dtype
        from prefixserve.adapters.heads import ROBERTA_LIKE

        from .workloads import AdapterSet

        progress = not args.no_progress
        common.quiet()
        self.name = args.backbone or str(common.synthetic_backbone_dir(args.shape, args.cache_dir))
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)  # "engine" and "hf-sorted"
        self.auto_dtype = resolve_dtype("auto", self.device)
        self.backbones = {self.dtype: load_backbone(self.name, device=str(self.device), dtype=_name(self.dtype))}
        main = self.backbones[self.dtype]
        self.tokenizer: Any = main.tokenizer  # a transformers tokenizer (untyped on Backbone)
        self.config = main.config
        probe = AdapterSet(main, "prefix", args.p, resident=0, pool=1, progress=False)
        cap = int(args.max_resident_gb * 2**30 // probe.adapter_bytes)
        self.resident = min(args.adapters, cap)
        self.adapter_note = f"{self.resident} distinct P={args.p} prefixes resident" + (
            "" if self.resident == args.adapters else f" (asked {args.adapters}; --max-resident-gb caps it)"
        )
        self.aset = AdapterSet(main, "prefix", args.p, resident=self.resident, progress=progress)
        self.engines = {self.dtype: self.aset.engine}
        kwargs = {"add_pooling_layer": False} if self.config.model_type in ROBERTA_LIKE else {}
        self._hf: dict[torch.dtype, torch.nn.Module] = {}
        self._hf_kwargs = kwargs
        self.onnx = None
        self.onnx_note = ""
        if args.no_onnx:
            self.onnx_note = "--no-onnx"
        elif self.device.type != "cpu":
            self.onnx_note = "ONNX Runtime baseline is CPU-only (onnxruntime CPU build): not run on " + str(self.device)
        else:
            try:
                from .onnx_backbone import export, session

                self.onnx = session(export(self.name, args.cache_dir))
            except ImportError as exc:
                self.onnx_note = f"onnxruntime/onnxscript missing ({exc.name}): pip install -e '.[bench]'"

    def engine(self, dtype: torch.dtype):
        """Our engine in ``dtype``, serving the same resident adapters (prefix K/V cast, heads shared)."""
        if dtype not in self.engines:
            from prefixserve.adapters.backbone import load_backbone
            from prefixserve.adapters.engine import DeviceAdapter, Engine

            bb = self.backbones.setdefault(dtype, load_backbone(self.name, device=str(self.device), dtype=_name(dtype)))
            eng = Engine(bb, cache_bytes=2**62)
            for i in range(self.resident):
                a = self.aset.get(i)
                v = a.virtual.to(dtype)  # (layers, 2, P, heads, hd)
                copy = DeviceAdapter(a.key, a.meta, v, a.head, v.numel() * v.element_size())
                eng.cache.get(a.key, functools.partial(_same, copy))
            self.engines[dtype] = eng
        return self.engines[dtype]

    def hf(self, dtype: torch.dtype):
        from transformers import AutoModel

        if dtype not in self._hf:
            model = AutoModel.from_pretrained(self.name, dtype=torch.float32, **self._hf_kwargs)
            self._hf[dtype] = model.to(self.device, dtype).eval().requires_grad_(False)
        return self._hf[dtype]

    def rows(self, eng, mix: Mix, rep: int, distinct: int, lo: int, hi: int):
        """Rows ``lo:hi`` of ``mix`` for repetition ``rep``, each with its adapter from ``eng``'s cache (a hit)."""
        from prefixserve.adapters.engine import Row

        n = len(mix.texts)
        return [
            Row(eng.cache.get(self.aset.key(adapter_of(rep, n, j, distinct)), _missing), mix.texts[j])
            for j in range(lo, min(hi, n))
        ]


def _same(adapter):
    return adapter


def _missing():
    raise RuntimeError("every adapter the bench asks for must be resident")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _chunks(xs: list, size: int) -> list[list]:
    return [xs[i : i + size] for i in range(0, len(xs), size)]


# ---- variants: fn(rep) -> (one step per batch, rows served) ---------------------------------------------
def engine_variant(s: Servers, dtype: torch.dtype, mix: Mix, batch: int, distinct: int):
    """Our engine, arrival order: each step resolves its rows' adapters (cache hits) and serves one batch."""
    eng = s.engine(dtype)

    def plan(rep: int):
        def step(lo: int):
            return lambda: eng.forward(s.rows(eng, mix, rep, distinct, lo, lo + batch))

        return [step(lo) for lo in range(0, len(mix.texts), batch)], len(mix.texts)

    return plan


def hf_sorted_variant(s: Servers, dtype: torch.dtype, mix: Mix, batch: int):
    """Plain HF forward; step 0 also tokenizes every row and sorts them (it has to see all rows first)."""
    model, tok, dev = s.hf(dtype), s.tokenizer, s.device

    def plan(rep: int):
        state: dict = {}

        @torch.inference_mode()
        def step(k: int) -> None:
            if k == 0:
                state["ids"] = sorted(tok(mix.texts)["input_ids"], key=len)  # length buckets
            enc = tok.pad({"input_ids": state["ids"][k * batch : (k + 1) * batch]}, return_tensors="pt")
            model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))  # (b, T, H)

        steps = [lambda k=k: step(k) for k in range(len(_chunks(mix.texts, batch)))]
        return steps, len(mix.texts)

    return plan


def previous_variant(s: Servers, mix: Mix, batch: int, distinct: int):
    """The pre-#12 engine on the same arrival batches and the same (fp32) adapters."""
    eng32 = s.engine(torch.float32)  # the adapters, in the fp32 layout the old engine viewed
    old = PaddedEngine(s.hf(torch.float32), s.tokenizer)

    def plan(rep: int):
        def step(lo: int):
            return lambda: old.forward(s.rows(eng32, mix, rep, distinct, lo, lo + batch))

        return [step(lo) for lo in range(0, len(mix.texts), batch)], len(mix.texts)

    return plan


def onnx_variant(s: Servers, mix: Mix, batch: int):
    """ONNX Runtime plain backbone: arrival batches, padded as usual."""
    from .onnx_backbone import run_padded

    def plan(rep: int):
        steps = [lambda c=chunk: run_padded(s.onnx, s.tokenizer, c) for chunk in _chunks(mix.texts, batch)]
        return steps, len(mix.texts)

    return plan


def build(s: Servers, mix: Mix, args, *, with_bf16: bool) -> dict:
    """The main set of variants over ``mix``."""
    n = s.resident
    v = {
        "engine": engine_variant(s, s.dtype, mix, args.batch, n),
        "hf-sorted": hf_sorted_variant(s, s.dtype, mix, args.batch),
    }
    if s.dtype != torch.float32:
        v["engine-fp32"] = engine_variant(s, torch.float32, mix, args.batch, n)
    if with_bf16 and s.dtype != torch.bfloat16:
        v["engine-bf16"] = engine_variant(s, torch.bfloat16, mix, args.batch, n)
    v["previous-engine-fp32"] = previous_variant(s, mix, args.batch, n)
    if s.onnx is not None:
        v["onnx-fp32"] = onnx_variant(s, mix, args.batch)
    return v


def timed_set(s: Servers, variants: dict, warm: dict, mix: Mix, reps: int, desc: str, args) -> dict:
    """Warm every variant on a small mix (allocator, kernels, ORT's first run), then time them interleaved
    batch by batch (:func:`bench.common.interleaved_steps`)."""
    for plan in warm.values():
        for step in plan(0)[0]:
            step()
    timed = common.interleaved_steps(variants, reps, s.device, desc=desc, progress=not args.no_progress)
    base = "hf-sorted" if "hf-sorted" in timed else next(iter(timed))
    summary = common.summarize(timed, base)
    for row in summary.values():
        row["tokens_per_call"] = mix.tokens
        row["tokens_per_s"] = mix.tokens / row["median_s"]
    return {"mix": mix.describe(), "baseline": base, "variants": summary, "timed": timed}


# ---- measurements -------------------------------------------------------------------------------------
def measure(args) -> dict:
    s = Servers(args)
    tok, cpu = s.tokenizer, s.device.type == "cpu"
    mix = make_mix(tok, args.rows, median=args.median, max_len=args.max_len, seed=args.seed)
    warm = make_mix(tok, min(args.batch, 8), median=args.median, max_len=args.max_len, seed=args.seed + 99)
    main = timed_set(
        s,
        build(s, mix, args, with_bf16=not cpu),
        build(s, warm, args, with_bf16=not cpu),
        mix,
        args.reps,
        "realistic",
        args,
    )
    result: dict = {"main": main}
    if cpu and s.dtype != torch.bfloat16:  # bf16 emulated here: its own smaller pair, to stay in the time budget
        sub = make_mix(tok, args.bf16_rows, median=args.median, max_len=args.max_len, seed=args.seed)
        pair = {
            "engine-fp32": engine_variant(s, torch.float32, sub, args.batch, s.resident),
            "engine-bf16": engine_variant(s, torch.bfloat16, sub, args.batch, s.resident),
        }
        warm_pair = {
            k: engine_variant(s, d, warm, args.batch, s.resident)
            for k, d in (("a", torch.float32), ("b", torch.bfloat16))
        }
        result["bf16"] = timed_set(s, pair, warm_pair, sub, args.reps, "bf16 vs fp32", args)
        result["bf16"]["ratio"] = common.median_ratio(result["bf16"]["timed"], "engine-bf16", "engine-fp32")
    result["length_sweep"] = []
    for m in args.sweep_medians:
        sm = make_mix(tok, args.sweep_rows, median=m, max_len=args.max_len, seed=args.seed + int(m))
        v = {k: f for k, f in build(s, sm, args, with_bf16=False).items() if k in args.sweep_variants}
        point = timed_set(s, v, {}, sm, args.sweep_reps, f"median {m:g}", args)
        result["length_sweep"].append({"median": m, **point})
    result["distinct_sweep"] = None
    distinct = [d for d in args.sweep_distinct if d <= s.resident]
    if distinct:
        sm = make_mix(tok, args.sweep_rows, median=args.median, max_len=args.max_len, seed=args.seed + 7)
        v = {f"engine-{d}": engine_variant(s, s.dtype, sm, args.batch, d) for d in distinct}
        v["hf-sorted"] = hf_sorted_variant(s, s.dtype, sm, args.batch)
        result["distinct_sweep"] = {
            "distinct": distinct,
            **timed_set(s, v, {}, sm, args.sweep_reps, "distinct adapters", args),
        }
    result["setup"] = {
        "backbone": s.name,
        "device": str(s.device),
        "dtype": _name(s.dtype),
        "auto_dtype": _name(s.auto_dtype),
        "cpu_fast_bf16": _fast_bf16(),
        "resident": s.resident,
        "adapter_note": s.adapter_note,
        "adapter_bytes": s.aset.adapter_bytes,
        "onnx": s.onnx is not None,
        "onnx_note": s.onnx_note,
        "flops_per_token": _flops(s.config),
    }
    del s
    gc.collect()
    return result


def _fast_bf16() -> bool:
    from prefixserve.adapters.backbone import cpu_has_fast_bf16

    return cpu_has_fast_bf16()


def _flops(config) -> int:
    from prefixserve.adapters.encoder import flops_per_token

    return flops_per_token(config)


# ---- targets ------------------------------------------------------------------------------------------
def targets(result: dict, args) -> list[dict]:
    main, setup = result["main"], result["setup"]
    timed, dt, n = main["timed"], setup["dtype"], setup["resident"]
    reps = len(timed["engine"]["seconds"])
    where = f"({reps} rep{'' if reps == 1 else 's'}, {main['mix']['rows']} rows, {n} prefixes)"
    out = [
        common.target(
            f"realistic: engine / HF forward on length-sorted rows, both {dt} {where}",
            common.median_ratio(timed, "engine", "hf-sorted"),
            1.0,
        )
    ]
    fp32 = "engine" if dt == "float32" else "engine-fp32"
    out.append(
        common.target(
            f"realistic: engine fp32 / previous engine fp32 {where}",
            common.median_ratio(timed, fp32, "previous-engine-fp32"),
            2.0,
        )
    )
    auto = setup["auto_dtype"]
    if auto == dt:
        why = f"dtype auto = {auto} on this device"
        if setup["device"] == "cpu" and not setup["cpu_fast_bf16"]:
            why += (
                ": this CPU has no AVX512-BF16/AMX, so bf16 would be emulated (slower than fp32, see the bf16 line) "
                "and the default stays fp32; this ratio is therefore the fp32 one"
            )
        out.append(
            common.target(
                f"realistic: default dtype ({auto}) engine / previous default (fp32 previous engine) {where}",
                common.median_ratio(timed, "engine", "previous-engine-fp32"),
                5.0,
                note=why,
            )
        )
    if "onnx-fp32" in timed:
        out.append(
            common.target(
                f"realistic: default engine ({dt}, {n} prefixes) / ONNX Runtime fp32 plain backbone, padded "
                f"arrival batches {where}",
                common.median_ratio(timed, "engine", "onnx-fp32"),
                1.5,
            )
        )
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    result["machine"] = common.machine(torch.device(result["setup"]["device"]))
    result["command"] = "python -m bench.realistic " + " ".join(argv if argv is not None else sys.argv[1:])
    result["reps"] = args.reps
    result["targets"] = targets(result, args)
    peak, peak_src = common.peak_tflops(
        torch.device(result["setup"]["device"]), getattr(torch, result["setup"]["dtype"]), args.peak_tflops
    )
    result["peak_tflops"], result["peak_source"] = peak, peak_src
    for row in result["main"]["variants"].values():
        row["useful_mfu"] = common.useful_mfu(row["tokens_per_s"], result["setup"]["flops_per_token"], peak)
    result["headline"] = headline(result)
    result["wall_s"] = time.perf_counter() - t0
    result["plots"] = plot(result, out)
    common.write_json(out, NAME, result)
    report(result, out)
    print(f"\nrealistic bench ({result['wall_s']:.0f} s) -> {out}/{NAME}.md")
    common.print_table(
        ["variant", "seq/s", "real tok/s", "x hf-sorted"],
        [
            [k, f"{v['seqs_per_s']:.2f}", f"{v['tokens_per_s']:.0f}", f"{v['ratio_vs_hf-sorted']:.3f}"]
            for k, v in result["main"]["variants"].items()
        ],
    )
    print()
    common.print_table(
        ["target", "want", "measured", "status", "margin"], [common.fmt_target(t) for t in result["targets"]]
    )
    for h in result["headline"]:
        print(f"{h['name']}: {h['value']}")
    return result


def headline(result: dict) -> list[dict]:
    """Informative figures (not targets) for SUMMARY.md."""
    out = []
    bf = result.get("bf16")
    if bf:
        out.append(
            {
                "name": f"realistic: engine bf16 / fp32 on this CPU ({bf['mix']['rows']} rows)",
                "value": f"{bf['ratio']:.3f}x",
            }
        )
    elif "engine-bf16" in result["main"]["timed"]:
        out.append(
            {
                "name": "realistic: engine bf16 / engine",
                "value": f"{common.median_ratio(result['main']['timed'], 'engine-bf16', 'engine'):.3f}x",
            }
        )
    elif result["setup"]["dtype"] == "bfloat16" and "engine-fp32" in result["main"]["timed"]:  # native bf16 CPU
        out.append(
            {
                "name": "realistic: engine bf16 / engine fp32 on this CPU",
                "value": f"{common.median_ratio(result['main']['timed'], 'engine', 'engine-fp32'):.3f}x",
            }
        )
    return out


if __name__ == "__main__":
    main()

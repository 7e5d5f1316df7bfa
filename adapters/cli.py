"""Sub-commands ``pack``, ``unpack``, ``inspect``, ``predict`` (adapter files and the offline batch job)."""

from __future__ import annotations

import argparse
import json
import sys


def _pack(args) -> int:
    from .backbone import load_backbone
    from .peft_io import pack_folder

    fingerprint = args.fingerprint or (load_backbone(args.backbone).fingerprint if args.backbone else None)
    labels = (
        json.loads(args.labels)
        if args.labels and args.labels.lstrip().startswith("[")
        else (args.labels.split(",") if args.labels else None)
    )
    data = pack_folder(args.peft_dir, labels=labels, fingerprint=fingerprint)
    with open(args.output, "wb") as f:
        f.write(data)
    print(f"wrote {args.output} ({len(data)} bytes)", file=sys.stderr)
    return 0


def _unpack(args) -> int:
    from .peft_io import unpack

    with open(args.file, "rb") as f:
        out = unpack(f.read(), args.output)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _inspect(args) -> int:
    from .format import inspect_packed

    with open(args.file, "rb") as f:
        print(json.dumps(inspect_packed(f.read()).to_dict(), indent=2, ensure_ascii=False))
    return 0


def _predict(args) -> int:
    from .predict import main

    return main(args)


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "pack",
        formatter_class=fmt,
        help="PEFT or AdapterHub folder -> one packed .safetensors adapter",
        description="Pack the folder PeftModel.save_pretrained wrote (adapter_config.json + "
        "adapter_model.safetensors: prefix, prompt, P-tuning, LoRA, IA3) or AdapterHub's "
        "save_adapter(..., with_head=True, use_safetensors=True) wrote (a bottleneck adapter: "
        "adapter.safetensors + model_head.safetensors) into one validated prefixserve adapter file.",
    )
    p.add_argument("peft_dir", help="PEFT folder, or AdapterHub folder (safetensors only; .bin is refused)")
    p.add_argument("-o", "--output", required=True, help="packed .safetensors to write")
    p.add_argument(
        "--backbone",
        help="hub id or folder of the backbone (its fingerprint is recorded); REQUIRED unless --fingerprint is "
        "given or the folder has prefixserve's prefixserve.json sidecar",
    )
    p.add_argument("--fingerprint", help="backbone fingerprint, instead of loading --backbone")
    p.add_argument("--labels", help="label names: 'neg,pos' or a JSON list (default LABEL_0..)")
    p.set_defaults(func=_pack)

    p = sub.add_parser(
        "unpack",
        formatter_class=fmt,
        help="packed adapter -> PEFT folder (AdapterHub folder for a bottleneck adapter)",
        description="Write a folder PeftModel.from_pretrained loads (prefix, prompt, LoRA, IA3) or "
        "AdapterHub's load_adapter loads (bottleneck), plus prefixserve.json (labels, fingerprint) "
        "so that packing it again is lossless.",
    )
    p.add_argument("file", help="packed .safetensors adapter")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    p.set_defaults(func=_unpack)

    p = sub.add_parser("inspect", formatter_class=fmt, help="validate a packed adapter and print its metadata")
    p.add_argument("file")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "predict",
        formatter_class=fmt,
        help="offline batch job over a JSONL file",
        description='Each input line {"adapter": PATH, "text": ..., "text_pair": ...?} gives '
        "one output line {label, score, scores, logits, truncated} or {error: {code, message}}, "
        "in input order. Rows of different adapters share each forward pass. Exit status is "
        "non-zero only if no line could be answered.",
    )
    p.add_argument("--backbone", required=True, help="hub id or local folder of the encoder")
    p.add_argument("--input", required=True, help="requests.jsonl, or - for stdin")
    p.add_argument("--output", help="output .jsonl (default stdout)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--max-length", type=int, default=None, help="cap on tokens per row (default: all positions)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="serving dtype; auto: bf16 where the hardware has it natively, else float32 (logits are float32)",
    )
    p.set_defaults(func=_predict)

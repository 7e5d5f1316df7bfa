"""Offline batch job: ``prefixserve predict --backbone B --input requests.jsonl``.

Each input line ``{"adapter": "<packed file or PEFT folder>", "text": "...", "text_pair": "..."?}``
gives one output line, in input order: the prediction (with raw logits) or
``{"error": {"code", "message"}}``. One bad line never sinks the others; the exit status is
non-zero only if no line could be answered. Rows of different adapters share each forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Iterable, Iterator
from typing import TextIO

from .engine import Engine, Row
from .errors import BadRequestError, PrefixServeError
from .peft_io import read_adapter


def _parse(line: str, lineno: int) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"line {lineno}: not valid JSON ({exc.msg})", code="bad_json") from None
    if not isinstance(obj, dict):
        raise BadRequestError(f"line {lineno}: expected a JSON object", code="bad_json")
    if not isinstance(obj.get("adapter"), str) or not obj["adapter"]:
        raise BadRequestError(f"line {lineno}: 'adapter' (a path) is required", code="missing_adapter")
    if not isinstance(obj.get("text"), str):
        raise BadRequestError(f"line {lineno}: 'text' (a string) is required", code="missing_text")
    if obj.get("text_pair") is not None and not isinstance(obj["text_pair"], str):
        raise BadRequestError(f"line {lineno}: 'text_pair' must be a string", code="bad_text_pair")
    return obj


def run(engine: Engine, lines: Iterable[str], batch_size: int = 32) -> Iterator[dict]:
    """Yield one result dict per input line, in order."""
    pending: list[tuple[int, Row]] = []
    results: dict[int, dict] = {}
    next_out = 0

    def flush():
        if not pending:
            return
        try:
            preds = engine.predict([row for _, row in pending])
            for (i, _), p in zip(pending, preds):
                results[i] = p.to_dict(with_logits=True)
        except PrefixServeError as exc:  # e.g. a device error: the rows of this batch only
            for i, _ in pending:
                results[i] = exc.to_dict()
        pending.clear()

    for i, line in enumerate(lines):
        if not line.strip():
            results[i] = BadRequestError(f"line {i + 1}: empty line", code="bad_json").to_dict()
        else:
            try:
                obj = _parse(line, i + 1)
                path: str = obj["adapter"]
                adapter = engine.adapter(
                    f"file:{path}",
                    functools.partial(read_adapter, path, default_fingerprint=engine.backbone.fingerprint),
                )
                pending.append((i, Row(adapter, obj["text"], obj.get("text_pair"))))
            except PrefixServeError as exc:
                results[i] = exc.to_dict()
        if len(pending) >= batch_size:
            flush()
        while next_out in results:
            yield results.pop(next_out)
            next_out += 1
    flush()
    while next_out in results:
        yield results.pop(next_out)
        next_out += 1


def main(args) -> int:
    from .backbone import load_backbone

    backbone = load_backbone(args.backbone, device=args.device, dtype=args.dtype)
    engine = Engine(backbone, max_length=args.max_length)
    if args.input == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.input, encoding="utf-8") as src:
            lines = src.read().splitlines()
    to_stdout = not args.output or args.output == "-"
    with contextlib.nullcontext(sys.stdout) if to_stdout else open(args.output, "w", encoding="utf-8") as dst:
        return _write(engine, lines, dst, args.batch_size)


def _write(engine: Engine, lines: list[str], dst: TextIO, batch_size: int) -> int:
    from tqdm import tqdm

    answered = failed = 0
    with tqdm(total=len(lines), desc="predict", unit="row", file=sys.stderr, disable=len(lines) < 64) as bar:
        for result in run(engine, lines, batch_size=batch_size):
            dst.write(json.dumps(result, ensure_ascii=False) + "\n")
            failed += "error" in result
            answered += "error" not in result
            bar.update(1)
    dst.flush()
    print(f"predict: {answered} answered, {failed} failed", file=sys.stderr)
    return 0 if answered or not lines else 1

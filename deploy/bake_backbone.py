"""Bake the backbone into the image at a pinned revision and print its fingerprint (deploy/Dockerfile).

    python bake_backbone.py klue/roberta-base <40-hex commit> /models/backbone
    python bake_backbone.py /path/to/local/folder - /models/backbone     # a folder: copied (tests, air gaps)

Writes into the target folder: the checkpoint (config, tokenizer, weights), ``REVISION`` (the commit it
came from), ``FINGERPRINT`` (what prefixserve computes for it: the value for the serve config's
``backbone_fingerprint``) and prefixserve's fingerprint cache, so pods start without re-hashing. A branch
or tag name is refused: only a commit id pins the weights.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

COMMIT = re.compile(r"^[0-9a-f]{40}$")
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "sentencepiece*"]


def fetch(source: str, revision: str, target: Path) -> None:
    if Path(source).is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True)
        return
    if not COMMIT.match(revision or ""):
        raise SystemExit(f"bake_backbone: revision must be a 40-hex commit id of {source}, got {revision!r}")
    from huggingface_hub import snapshot_download

    snapshot_download(source, revision=revision, local_dir=target, allow_patterns=CHECKPOINT_FILES)
    if not any(target.glob("*.safetensors")):
        raise SystemExit(f"bake_backbone: {source}@{revision} has no safetensors weights")


def bake(source: str, revision: str, target: Path) -> str:
    target.mkdir(parents=True, exist_ok=True)
    fetch(source, revision, target)
    from prefixserve.adapters.backbone import load_backbone  # torch: only once there is something to load

    fingerprint = load_backbone(str(target), device="cpu").fingerprint  # also writes the fingerprint cache
    (target / "REVISION").write_text(f"{source}@{revision}\n")
    (target / "FINGERPRINT").write_text(fingerprint + "\n")
    return fingerprint


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        raise SystemExit(__doc__)
    fingerprint = bake(argv[1], argv[2], Path(argv[3]))
    print(f"backbone_fingerprint: {fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

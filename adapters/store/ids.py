"""Tenant names and prefix ids: one rule for both, checked before anything touches a path or a key.

``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``: no slash, no colon (the Redis key separator), no leading dot
(so never ``.`` / ``..`` / hidden files), at most 128 characters. As in vLLM's LoRA resolver, the
file store additionally checks that every resolved path stays under its root (defence in depth
against symlinks planted inside the store).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import InvalidIdError

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID_RE = re.compile(ID_PATTERN)


def check_id(value, what: str = "prefix id") -> str:
    """Return ``value`` if it is a valid tenant name / prefix id, else raise ``InvalidIdError``."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        shown = repr(value)[:60]
        raise InvalidIdError(
            f"{what} {shown} is invalid: use 1-128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit",
            code="invalid_id",
        )
    return value


def check_tenant(value) -> str:
    return check_id(value, "tenant name")


def check_version(value) -> int:
    """Versions are positive ints; accept "3" from a CLI or URL but nothing else."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = 0
    if isinstance(value, bool) or v < 1 or (isinstance(value, str) and not value.isdigit()):
        raise InvalidIdError(f"version {value!r} is invalid: use a positive integer", code="invalid_version")
    return v


def safe_join(root: Path, *parts: str) -> Path:
    """``root/parts...`` resolved, refusing anything that escapes ``root`` (e.g. via a planted symlink)."""
    root_real = Path(os.path.realpath(root))
    path = Path(os.path.realpath(root_real.joinpath(*parts)))
    if path != root_real and root_real not in path.parents:
        raise InvalidIdError(f"path {'/'.join(parts)!r} escapes the store root", code="invalid_id")
    return path

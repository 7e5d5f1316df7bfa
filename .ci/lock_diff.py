"""Print the packages whose installed version differs from requirements.lock (used by `make test-latest`).

Usage: python .ci/lock_diff.py requirements.lock FREEZE_FILE
"""

from __future__ import annotations

import re
import sys


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(text: str) -> dict[str, str]:
    """``name==version`` lines (markers after ``;`` ignored; a local label like ``+cpu`` dropped)."""
    out = {}
    for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;]+)", text, re.M):
        out.setdefault(normalise(m.group(1)), m.group(2).split("+")[0])
    return out


def main(lock_path: str, freeze_path: str) -> int:
    with open(lock_path) as f:
        lock = pins(f.read())
    with open(freeze_path) as f:
        installed = pins(f.read())
    changed = sorted((n, lock.get(n, "(not locked)"), v) for n, v in installed.items() if lock.get(n) != v)
    print(f"{len(changed)} of {len(installed)} installed packages differ from {lock_path}:")
    for name, locked, now in changed:
        print(f"  {name}: {locked} -> {now}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

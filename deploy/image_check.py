"""Build-time check of the image (deploy/Dockerfile): every installed distribution that the lock names has
exactly the locked version. ``pip install -c requirements.lock`` pins what pip installs; this also catches a
package the base image brought at another version that pip kept.

    python image_check.py requirements.lock       # exit 1 and one line per mismatch

Lines whose environment marker does not hold here (another platform or Python) are skipped.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import Specifier
from packaging.utils import canonicalize_name


def locked_versions(lock_text: str) -> dict[str, Specifier]:
    """{canonical name: its ``==`` pin} for the lock's lines whose marker holds in this environment."""
    pins = {}
    for line in lock_text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        (spec,) = req.specifier  # a lock pins with exactly one ==
        pins[canonicalize_name(req.name)] = spec
    return pins


def mismatches(lock_text: str) -> list[str]:
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    # `==2.13.0` accepts `2.13.0+cpu` (a local version label), as pip does
    return [
        f"{name}: installed {installed[name]}, locked {pin}"
        for name, pin in sorted(locked_versions(lock_text).items())
        if name in installed and not pin.contains(installed[name], prereleases=True)
    ]


def main(argv: list[str]) -> int:
    problems = mismatches(Path(argv[1]).read_text())
    for line in problems:
        print(f"image_check: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""requirements.lock agrees with pyproject.toml and the Makefile (a stale lock fails here, not on a new machine)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def locked() -> dict[str, list[tuple[str, str]]]:
    """name -> [(version, marker)] (a universal lock may pin a name twice, under different markers)."""
    pins: dict[str, list[tuple[str, str]]] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s;]+)\s*(?:;\s*(.*))?$", line)
        if m:
            pins.setdefault(canonicalize_name(m.group(1)), []).append((m.group(2), m.group(3) or ""))
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in [*project["dependencies"], *extras["dev"], *extras["bench"]]]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = locked()
    problems = []
    for req in declared():
        versions = pins.get(canonicalize_name(req.name))
        if not versions:
            problems.append(f"{req.name} is not in requirements.lock: run `make lock`")
            continue
        for version, marker in versions:
            applies = not marker or Marker(marker).evaluate()  # this interpreter and platform
            if applies and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{req.name}=={version} is outside pyproject's {req.specifier}: run `make lock`")
    assert problems == []


def test_lock_pins_the_makefiles_torch_and_caps_transformers():
    torch = re.search(r"^TORCH\s*:=\s*torch==(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert torch is not None
    assert [v for v, _ in locked()["torch"]] == [torch.group(1)]
    transformers = next(r for r in declared() if r.name == "transformers")
    assert any(s.operator == "<" for s in transformers.specifier), "transformers needs an upper cap"

"""scripts/lock.txt, the set CI tested, must satisfy pyproject's ranges: a refreshed lock that drifted outside
them, or a range tightened without refreshing the lock, fails here before a fresh machine installs it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "scripts" / "lock.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
            assert m, f"lock.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra]
    return [
        r
        for r in reqs
        if canonicalize_name(r.name) != "nestling" and (r.marker is None or r.marker.evaluate())
    ]


@pytest.mark.parametrize("req", _requirements(), ids=str)
def test_the_lock_pins_every_requirement_inside_its_range(req):
    name = canonicalize_name(req.name)
    if name == "torch":  # NESTLING_TORCH chooses it: the CPU wheel here, a CUDA build on a GPU machine
        assert name not in _lock()
        return
    lock = _lock()
    assert name in lock, f"{req.name} is required but not in scripts/lock.txt; run scripts/lock.sh"
    assert req.specifier.contains(lock[name], prereleases=True), (
        f"lock has {name}=={lock[name]}, outside {req}"
    )


def test_setup_installs_through_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"pip install .*-c scripts/lock\.txt .*\[dev\]", setup)
    assert "bash scripts/setup.sh" in (ROOT / ".ci" / "run").read_text()


def test_deliberate_pins_are_what_the_lock_holds():
    lock = _lock()
    for line in (ROOT / "scripts" / "lock-pins.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            assert lock.get(canonicalize_name(name)) == Version(version), (
                f"lock-pins.txt pins {line.strip()} but lock.txt has {lock.get(canonicalize_name(name))}"
            )
    assert "-c scripts/lock-pins.txt" in (ROOT / "scripts" / "lock.sh").read_text()

"""Packaging: dependencies carry lower bounds only (an upper bound forces a downgrade on a newer, untried release);
the tested upper ends live in constraints/tested.txt, which `make venv` (and so CI) installs with."""

from __future__ import annotations

import pytest

from packaging.requirements import Requirement

from helpers import ROOT

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml with tomllib")


def test_dependencies_have_no_upper_bounds_and_the_tested_ranges_are_constraints():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    capped = [str(r) for r in reqs for s in r.specifier if s.operator in ("<", "<=", "==", "~=")]
    assert capped == [], f"upper bounds in pyproject.toml (put tested ranges in constraints/tested.txt): {capped}"
    lines = [line.split("#")[0].strip() for line in (ROOT / "constraints" / "tested.txt").read_text().splitlines()]
    tested = {Requirement(line).name: Requirement(line) for line in lines if line}
    assert {"torch", "torchvision", "timm", "peft"} <= set(tested)
    assert "constraints/tested.txt" in (ROOT / "Makefile").read_text()

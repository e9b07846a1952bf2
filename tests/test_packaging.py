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


def test_a_torchvision_built_for_another_torch_is_named_with_the_fix(tmp_path):
    """A CPU torch beside a CUDA torchvision (what a two-index install can leave) fails inside timm with a bare
    'operator torchvision::nms does not exist'. Here that torchvision is a stand-in package built by the test,
    placed first on the path, that fails exactly so; medfound names both versions and the command to run."""
    import subprocess
    import sys
    from importlib.metadata import version

    fake = tmp_path / "site"
    (fake / "torchvision").mkdir(parents=True)
    (fake / "torchvision" / "__init__.py").write_text(
        "import torch\nraise RuntimeError('operator torchvision::nms does not exist')\n")
    info = fake / "torchvision-0.29.1+cu130.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.29.1+cu130\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(fake)}
    proc = subprocess.run([sys.executable, "-m", "medfound.cli", "pretrain", "demo_mae_tiny"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    torch_version = version("torch")
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"torchvision 0.29.1+cu130 does not work with torch {torch_version}" in err
    assert "operator torchvision::nms does not exist" in err
    assert "Reinstall both from one index, together: pip install --force-reinstall torch==" in err


def test_matching_torchvision_pairs_releases():
    from medfound.env import matching_torchvision, mismatch_message

    assert matching_torchvision("2.14.1") == "0.29.1" and matching_torchvision("2.9.1+cpu") == "0.24.1"
    text = mismatch_message("2.9.1+cpu", "0.24.1", "operator torchvision::nms does not exist")
    assert "torch is cpu, torchvision is the PyPI build" in text
    assert text.endswith("pip install --force-reinstall torch==2.9.1 torchvision==0.24.1 --index-url "
                         "https://download.pytorch.org/whl/cpu")

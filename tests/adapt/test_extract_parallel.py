"""`medfound extract` on several processes: slides split across ranks, identical bags and bags.json for 1 and 2
processes, per-slide atomic bags that a rerun reuses, and a folder of another backbone refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medfound.cli import main

from helpers import DATA, ROOT

TIMING = ("seconds", "created", "throughput")


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """Three slides (the bundled CC0 slide under three names, with labels) tiled into one shard set."""
    from medfound.workflows import shard

    root = tmp_path_factory.mktemp("slides")
    (root / "in").mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(DATA / "wsi" / "CMU-1-Small-Region.svs", root / "in" / f"slide_{name}.svs")
    (root / "slides.csv").write_text("slide,label,split\nslide_a.svs,benign,train\nslide_b.svs,malignant,train\n"
                                     "slide_c.svs,benign,test\n")
    shard("wsi", root / "in", root / "tiles", name="three", modality="pathology", mpp=4.0, tile_size=32,
          min_tissue=0.5, keep_names=True, table=root / "slides.csv", label_names=["benign", "malignant"],
          max_count=40)
    return root / "tiles"


def _index(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "bags.json").read_text()).items() if k not in TIMING}


def _bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "bags.json"}


def test_one_and_two_processes_write_identical_bags(tiles, pretrained, tmp_path):
    one = tmp_path / "one"
    assert main(["extract", str(tiles), "--backbone", str(pretrained / "export"), "--out", str(one)]) == 0
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "medfound.cli", "extract", str(tiles), "--backbone", str(pretrained / "export"),
                           "--out", str(two)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 slides embedded, 0 reused" in proc.stdout and "on 2 process(es)" in proc.stdout
    index = json.loads((two / "bags.json").read_text())
    assert index["throughput"]["processes"] == 2 and index["throughput"]["tiles_per_s"] > 0
    assert _index(one) == {**_index(two), "source": _index(one)["source"]}
    assert _bytes(one) == _bytes(two)
    assert [s["slide"] for s in index["slides"]] == ["slide_a", "slide_b", "slide_c"]


def test_a_rerun_reuses_finished_bags_and_embeds_the_rest(tiles, pretrained, tmp_path, capsys):
    out = tmp_path / "bags"
    args = ["extract", str(tiles), "--backbone", str(pretrained / "export"), "--out", str(out)]
    assert main(args) == 0
    before = _bytes(out)
    # as after a kill: one slide's bag not yet written, another's replaced by garbage, no bags.json yet
    (out / "slide_b.safetensors").unlink()
    (out / "slide_c.safetensors").write_bytes(b"half a file")
    (out / "bags.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "2 slides embedded, 1 reused" in capsys.readouterr().out
    assert _bytes(out) == before


def test_a_folder_of_another_backbone_is_refused_unless_overwritten(tiles, pretrained, tmp_path):
    out = tmp_path / "bags"
    assert main(["extract", str(tiles), "--backbone", str(pretrained / "export"), "--out", str(out)]) == 0
    other = tmp_path / "other_backbone"
    shutil.copytree(pretrained / "export", other)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + 1.0
    save_file(weights, str(other / "model.safetensors"))
    assert main(["extract", str(tiles), "--backbone", str(other), "--out", str(out)]) == 1
    assert main(["extract", str(tiles), "--backbone", str(other), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "bags.json").read_text())["throughput"]["slides_embedded"] == 3

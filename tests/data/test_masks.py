"""Mask values mean what the user says (`--mask-mode`): real MoNuSeg instance labels (16-bit, one id per nucleus) are
never clipped to 8 bits nor planned as hundreds of classes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from medfound.data.manifest import read_manifest
from medfound.workflows import shard

from helpers import SHARED, tar_samples

MONUSEG = SHARED / "monuseg"


def _tiles(root, relabel: bool) -> None:
    """Three 256-px crops of real MoNuSeg tiles with their instance labels, as a user's table lists them; `relabel`
    numbers each crop's nuclei 1..N (8-bit), else the original 16-bit ids are kept."""
    if not (MONUSEG / "instance_labels").is_dir():
        pytest.skip(f"MoNuSeg is not in {MONUSEG} (../shared/data): the instance-mask path is not exercised")
    root.mkdir()
    rows = ["path,mask,split"]
    for i, label in enumerate(sorted((MONUSEG / "instance_labels").glob("*_inst.png"))[:3]):
        image = Image.open(MONUSEG / "images" / label.name.replace("_inst", "")).convert("RGB").crop((0, 0, 256, 256))
        ids = np.asarray(Image.open(label))[:256, :256].astype(np.uint16)
        if relabel:
            _, ids = np.unique(ids, return_inverse=True)
            ids = ids.reshape(256, 256).astype(np.uint8)
        image.save(root / f"t{i}.png")
        Image.fromarray(ids).save(root / f"t{i}_inst.png")
        rows.append(f"t{i}.png,t{i}_inst.png,{'train' if i < 2 else 'test'}")
    (root / "table.csv").write_text("\n".join(rows) + "\n")


def test_16_bit_instance_masks_are_never_clipped(tmp_path):
    from medfound.adapt.plan import fingerprint, make_plan

    _tiles(tmp_path / "tiles", relabel=False)
    kw = dict(table=tmp_path / "tiles" / "table.csv", keep_names=True, workers=1)
    top = max(int(np.asarray(Image.open(p)).max()) for p in (tmp_path / "tiles").glob("*_inst.png"))
    assert top > 255  # the crops keep MoNuSeg's own ids
    with pytest.raises(ValueError, match=r"table.csv row 2, mask mask: the mask holds values up to \d+ \(a 16-bit "
                                         r"mask\), which 8 bits cannot store and medfound never clips; .*"
                                         r"--mask-mode instance"):
        shard("images", tmp_path / "tiles", tmp_path / "refused", **kw)
    assert not (tmp_path / "refused").exists()
    m, _ = shard("images", tmp_path / "tiles", tmp_path / "instance", mask_mode="instance", **kw)
    assert m.ingest["mask_mode"] == "instance"
    stored = [np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
              for sample in tar_samples(tmp_path / "instance").values()]
    assert max(int(s.max()) for s in stored) == top  # the ids as they were
    fp = fingerprint(tmp_path / "instance")
    assert make_plan(fp, memory_gb=8)["num_classes"] == 2 and set(fp["classes"]) == {"0", "1"}
    m, _ = shard("images", tmp_path / "tiles", tmp_path / "binary", mask_mode="binary", **kw)
    stored = [np.asarray(Image.open(io.BytesIO(s["mask.png"]))) for s in tar_samples(tmp_path / "binary").values()]
    assert all(set(np.unique(s)) <= {0, 255} for s in stored)


def test_8_bit_instance_labels_are_not_read_as_classes(tmp_path):
    from medfound.adapt.plan import fingerprint
    from medfound.data.manifest import LabelSchema
    from medfound.data.shards import write_shard_set

    _tiles(tmp_path / "tiles", relabel=True)
    kw = dict(table=tmp_path / "tiles" / "table.csv", keep_names=True, workers=1)
    with pytest.raises(ValueError, match=r"the mask looks like instance labels \(\d+ ids up to \d+, \d+ of them one "
                                         r"connected blob each\), which would be read as \d+ classes; pass "
                                         r"--mask-mode instance"):
        shard("images", tmp_path / "tiles", tmp_path / "refused", **kw)
    m, _ = shard("images", tmp_path / "tiles", tmp_path / "semantic", mask_mode="semantic", **kw)
    assert m.ingest["mask_mode"] == "semantic"  # the user's word: the values are classes
    # a set written before masks had a mode (no ingest.mask_mode): plan refuses to make every id a class
    samples = []
    for key, s in sorted(tar_samples(tmp_path / "semantic").items()):
        samples.append({"key": key, "image": np.asarray(Image.open(io.BytesIO(s["png"]))), "split": "train",
                        "masks": {"mask": np.asarray(Image.open(io.BytesIO(s["mask.png"])))}})
    write_shard_set(samples, tmp_path / "legacy", name="legacy", modality="pathology",
                    label_schema=LabelSchema(type="none"), source={}, ingest={"kind": "images"})
    assert "mask_mode" not in read_manifest(tmp_path / "legacy").ingest
    with pytest.raises(ValueError, match="looks like instance labels .* Re-shard with `medfound shard images ... "
                                         "--mask-mode instance`"):
        fingerprint(tmp_path / "legacy")

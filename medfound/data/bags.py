"""Slide-level bags for multiple-instance learning: tile features + tile coordinates, one file per slide.

`medfound extract` writes a bag folder:

    BAGS/bags.json                 format, backbone (path, architecture, sha256, feature width), source shard set
                                   (name, digest, label schema), and one record per slide: slide, label, split,
                                   site, tiles, file, sha256, tile extent and the thumbnail's downsample
    BAGS/<slide>.safetensors       features float32 [N, D], coords int64 [N, 2] (level-0 x, y of each tile)
    BAGS/<slide>.h5                (with --format h5: datasets `features` and `coords`, CLAM's layout)
    BAGS/<slide>.thumb.png         the slide rebuilt from its own tiles at low resolution (for heatmaps)

`bag_loader` batches bags of different lengths by padding to the longest, with a boolean mask `[B, N]`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from medfound.data.manifest import LabelSchema
from medfound.io import atomic_write_bytes

BAGS_NAME = "bags.json"
BAGS_FORMAT = "medfound-bags/1"


def is_bag_dir(path: str | Path) -> bool:
    return (Path(path) / BAGS_NAME).is_file()


def read_bags(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / BAGS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a bag folder (no {BAGS_NAME}): create it with "
                                "`medfound extract SHARDS --backbone DIR --out BAGS`")
    index = json.loads(path.read_text())
    if index.get("format") != BAGS_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {BAGS_FORMAT!r}")
    return index


def bag_schema(index: dict[str, Any]) -> LabelSchema:
    return LabelSchema(**index["label_schema"])


def save_bag(path: Path, features: np.ndarray, coords: np.ndarray) -> None:
    """One slide's bag, by suffix: `.safetensors` or `.h5` (h5py)."""
    if path.suffix == ".h5":
        try:
            import h5py
        except ImportError as e:
            raise ImportError("bags in HDF5 need h5py: pip install h5py (or use --format safetensors)") from e
        tmp = path.with_name(path.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
        tmp.replace(path)
        return
    from safetensors.numpy import save

    atomic_write_bytes(path, save({"features": np.ascontiguousarray(features, dtype=np.float32),
                                   "coords": np.ascontiguousarray(coords, dtype=np.int64)}))


def load_bag(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float `[N, D]`, coords long `[N, 2]`) of one bag file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"bag {path} is missing: re-run `medfound extract`")
    if path.suffix == ".h5":
        try:
            import h5py
        except ImportError as e:
            raise ImportError(f"{path} is HDF5: pip install h5py") from e
        with h5py.File(path, "r") as f:
            return torch.from_numpy(f["features"][:]).float(), torch.from_numpy(f["coords"][:]).long()
    from safetensors.torch import load_file

    t = load_file(str(path))
    return t["features"].float(), t["coords"].long()


def slides_of(index: dict[str, Any], split: str, directory: str | Path, labelled: bool = True
              ) -> list[dict[str, Any]]:
    slides = [s for s in index["slides"] if s["split"] == split]
    if not slides:
        have = sorted({s["split"] for s in index["slides"]})
        raise ValueError(f"bag folder {directory} has no '{split}' slides (it has {', '.join(have)}); set "
                         "data.train_split / eval.split to one of those")
    if not labelled:  # new slides (`medfound predict`)
        return slides
    unlabelled = [s["slide"] for s in slides if s.get("label") is None]
    if unlabelled:
        raise ValueError(f"slides {unlabelled[:5]} in {directory} have no label: give `medfound shard wsi` a --table "
                         "with slide,label columns before extracting")
    return slides


def collate_bags(items: list[dict[str, Any]], num_classes: int, multilabel: bool) -> dict[str, Any]:
    """Pad bags to the longest: features `[B, N, D]`, mask bool `[B, N]`, coords `[B, N, 2]`, label, key, site."""
    n = max(len(it["features"]) for it in items)
    d = items[0]["features"].shape[1]
    feats = torch.zeros(len(items), n, d)
    coords = torch.zeros(len(items), n, 2, dtype=torch.long)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, it in enumerate(items):
        k = len(it["features"])
        feats[i, :k], coords[i, :k], mask[i, :k] = it["features"], it["coords"], True
    batch: dict[str, Any] = {"features": feats, "mask": mask, "coords": coords, "key": [it["slide"] for it in items]}
    if any(it.get("label") is None for it in items):  # unlabelled bags (new slides): no label
        pass
    elif multilabel:
        hot = torch.zeros(len(items), num_classes)
        for i, it in enumerate(items):
            hot[i, it["label"]] = 1.0
        batch["label"] = hot
    else:
        batch["label"] = torch.tensor([int(it["label"]) for it in items], dtype=torch.long)
    if any(it.get("site") for it in items):
        batch["site"] = [it.get("site") for it in items]
    return batch


def bag_loader(directory: str | Path, split: str, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
               max_tiles: Optional[int] = None, balanced: bool = False, labelled: bool = True,
               keys: Optional[frozenset] = None) -> Iterator[dict[str, Any]]:
    """Batches of padded bags of `split`. Training shuffles slides (seeded by seed and epoch), drops the last
    partial batch when there is more than one batch, and samples at most `max_tiles` tiles per bag (a regulariser
    and a memory bound); `balanced` draws slides class-balanced with replacement (one epoch = as many slides).
    `labelled=False`: slides without labels are read too (batches carry no `label` when one lacks it); `keys`: only
    these slides (a labelled fraction, data.train_fraction)."""
    directory = Path(directory)
    index = read_bags(directory)
    schema = bag_schema(index)
    slides = slides_of(index, split, directory, labelled)
    if keys is not None:
        slides = [s for s in slides if s["slide"] in keys]
    rng = random.Random(seed * 1_000_003 + epoch)  # ints only: str hashes differ between processes
    order = list(slides)
    if train:
        if balanced:
            if schema.type == "multilabel":
                raise ValueError("data.balanced_sampling is for single-label slides; use head.class_weights=balanced")
            by_class: dict[int, list] = {}
            for s in slides:
                by_class.setdefault(int(s["label"]), []).append(s)
            classes = sorted(by_class)
            order = [rng.choice(by_class[rng.choice(classes)]) for _ in slides]
        else:
            rng.shuffle(order)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if train and len(batches) > 1 and len(batches[-1]) < batch_size:
        batches = batches[:-1]
    for group in batches:
        items = []
        for s in group:
            feats, coords = load_bag(directory / s["file"])
            if train and max_tiles is not None and len(feats) > max_tiles:
                keep = torch.tensor(sorted(rng.sample(range(len(feats)), max_tiles)))
                feats, coords = feats[keep], coords[keep]
            items.append({**s, "features": feats, "coords": coords})
        yield collate_bags(items, schema.num_classes, schema.type == "multilabel")


class Mosaic:
    """A slide's low-resolution picture rebuilt from its tiles: each tile pasted at its level-0 position."""

    def __init__(self, extent: int, max_side: int = 1024):
        self.extent, self.max_side = extent, max_side
        self.tiles: list[tuple[int, int, Any]] = []

    def add(self, x: int, y: int, image: Any) -> None:
        from PIL import Image

        side = image.size[0] if isinstance(image, Image.Image) else np.asarray(image).shape[1]
        small = max(1, min(side, 64))  # enough for a 1024-px thumbnail of a mini-slide; bounded memory for a WSI
        im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        self.tiles.append((x, y, im.convert("RGB").resize((small, small))))

    def render(self) -> tuple[Any, float]:
        """(thumbnail PIL image, downsample relative to level 0)."""
        from PIL import Image

        xs = [t[0] for t in self.tiles]
        ys = [t[1] for t in self.tiles]
        width, height = max(xs) + self.extent, max(ys) + self.extent
        ds = max(width, height) / self.max_side if max(width, height) > self.max_side else 1.0
        ds = max(ds, self.extent / max(1, self.tiles[0][2].size[0]))  # never upsample the stored tile copies
        canvas = Image.new("RGB", (max(1, round(width / ds)), max(1, round(height / ds))), (255, 255, 255))
        side = max(1, round(self.extent / ds))
        for x, y, im in self.tiles:
            canvas.paste(im.resize((side, side)), (round(x / ds), round(y / ds)))
        return canvas, ds


def slide_index(index: dict[str, Any], split: str, directory: str | Path) -> list[tuple[str, Any, None]]:
    """(slide, label, None) of every slide of `split`: what medfound.data.fractions draws labelled fractions from
    (slides carry no patient id: each slide is a unit)."""
    return [(s["slide"], tuple(s["label"]) if isinstance(s["label"], list) else int(s["label"]), None)
            for s in slides_of(index, split, directory)]

"""`medfound extract SHARDS --backbone DIR --out BAGS`: embed WSI tiles with a frozen backbone into per-slide bags.

Every tile of the shard set (all splits) goes through the backbone once, with the backbone's own evaluation
preprocessing (its config.json: input size, mean, std); the pooled features are grouped by slide with the tiles'
level-0 coordinates. This is how UNI and CLAM train slide classifiers: the backbone stays frozen and the MIL head
trains on the stored features, so one extraction serves many slide-level tasks.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import medfound
from medfound.data.bags import BAGS_FORMAT, BAGS_NAME, Mosaic, save_bag
from medfound.data.manifest import read_manifest
from medfound.io import atomic_dir, atomic_write_json, sha256_file

_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| '})


def _backbone(path: Path):
    from medfound.backbones import create_backbone
    from medfound.config import BackboneConfig

    model = create_backbone(BackboneConfig(weights=path), num_classes=0).eval()
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return model, size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


@torch.no_grad()
def extract_bags(shards: str | Path, backbone: str | Path, out: str | Path, *, batch_size: int = 64,
                 format: str = "safetensors", overwrite: bool = False, device: Optional[str] = None) -> dict[str, Any]:
    """Write the bag folder `out` (see medfound.data.bags) and return its index.

    Args:
        shards: a WSI tile shard set (`medfound shard wsi`): samples carry meta slide/x/y and the slide label.
        backbone: an export folder (config.json + model.safetensors) of `medfound pretrain`, `import` or timm.
        format: "safetensors" or "h5".
    """
    from medfound.data.pipeline import make_loader, shard_urls
    from medfound.data.transforms import Normalize, build_transform

    if format not in ("safetensors", "h5"):
        raise ValueError(f"--format {format!r}: choose safetensors or h5")
    shards, backbone = Path(shards), Path(backbone)
    manifest = read_manifest(shards)
    if manifest.ingest.get("kind") != "wsi":
        raise ValueError(f"{shards} holds {manifest.ingest.get('kind')!r} samples; extract needs whole-slide tiles with "
                         "coordinates: shard the slides with `medfound shard wsi SLIDES --table labels.csv`")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, size, mean, std = _backbone(backbone)
    model.to(device)
    norm = Normalize(mean, std).to(device)
    bag_info = {b["slide"]: b for b in (manifest.bags or [])}
    slides: dict[str, dict[str, Any]] = {}
    start = time.time()
    for split in manifest.splits:
        urls, _ = shard_urls([shards], split)
        transform = build_transform("none", size, mean, std, train=False, normalize=False)

        def keep_meta(sample, _t=transform):
            out = _t(sample)
            out["meta"] = sample["meta"]
            out["thumb"] = sample["image"]
            return out

        loader = make_loader(urls, transform=keep_meta, batch_size=batch_size, labelled=False, train=False,
                             collate_fn=_collate_meta)
        for batch in loader:
            feats = model(norm(batch["image"].to(device))).float().cpu().numpy()
            for f, meta, thumb, key in zip(feats, batch["meta"], batch["thumb"], batch["key"]):
                if not {"slide", "x", "y"} <= set(meta):
                    raise ValueError(f"sample {key} in {shards} has no slide/x/y in its meta: re-shard the slides "
                                     "with `medfound shard wsi`")
                s = slides.setdefault(meta["slide"], {"split": split, "features": [], "coords": [],
                                                      "extent": round(meta["tile_size"] * meta["mpp"] /
                                                                      meta["slide_mpp"]),
                                                      "mpp": meta["mpp"]})
                s["features"].append(f)
                s["coords"].append((int(meta["x"]), int(meta["y"])))
                s.setdefault("mosaic", Mosaic(s["extent"])).add(meta["x"], meta["y"], thumb)
    if not slides:
        raise ValueError(f"{shards} has no tiles")
    records = []
    with atomic_dir(out, overwrite=overwrite, kind="bags") as tmp:
        for name in sorted(slides):
            s = slides[name]
            info = bag_info.get(name, {})
            stem = name.translate(_SAFE)
            file = f"{stem}.{format}"
            save_bag(tmp / file, np.stack(s["features"]), np.asarray(s["coords"], dtype=np.int64))
            thumb, ds = s["mosaic"].render()
            thumb.save(tmp / f"{stem}.thumb.png")
            records.append({"slide": name, "label": info.get("label"), "split": info.get("split", s["split"]),
                            "site": info.get("site"), "tiles": len(s["features"]), "file": file,
                            "sha256": sha256_file(tmp / file), "tile_extent": s["extent"], "mpp": s["mpp"],
                            "thumbnail": f"{stem}.thumb.png", "thumbnail_downsample": ds})
        index = {
            "format": BAGS_FORMAT,
            "backbone": {"path": str(backbone), "architecture": model.pretrained_cfg.get("architecture") or
                         json.loads((backbone / "config.json").read_text()).get("architecture"),
                         "sha256": sha256_file(backbone / "model.safetensors"),
                         "feature_dim": int(model.num_features), "input_size": size, "mean": mean, "std": std},
            "source": {"shards": str(shards), "name": manifest.name, "digest": manifest.digest,
                       "modality": manifest.modality},
            "label_schema": manifest.label_schema.model_dump(),
            "slides": records,
            "seconds": round(time.time() - start, 1),
            "medfound_version": medfound.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        index["digest"] = hashlib.sha256(json.dumps([r["sha256"] for r in records]).encode()).hexdigest()
        atomic_write_json(tmp / BAGS_NAME, index)
    return index


def _collate_meta(samples: list[dict]) -> dict:
    from medfound.data.pipeline import collate

    batch = collate([{k: v for k, v in s.items() if k not in ("meta", "thumb")} for s in samples])
    batch["meta"] = [s["meta"] for s in samples]
    batch["thumb"] = [s["thumb"] for s in samples]
    return batch

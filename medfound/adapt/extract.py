"""`medfound extract SHARDS --backbone DIR --out BAGS`: embed WSI tiles with a frozen backbone into per-slide bags.

Every tile of the shard set (all splits) goes through the backbone once, with the backbone's own evaluation
preprocessing (its config.json: input size, mean, std); the pooled features are grouped by slide with the tiles'
level-0 coordinates. This is how UNI and CLAM train slide classifiers: the backbone stays frozen and the MIL head
trains on the stored features, so one extraction serves many slide-level tasks.
"""

from __future__ import annotations

import contextlib
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
from medfound.io import atomic_write_json, sha256_file
from medfound.backbones import create_backbone
from medfound.config import BackboneConfig
from medfound.data import location
from medfound.data.pipeline import Decoding, Reading, collate, make_loader, shard_urls
from medfound.data.transforms import Normalize, build_transform
from medfound.process import torchrun_group

_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| '})


def _backbone(path: Path):
    model = create_backbone(BackboneConfig(weights=path), num_classes=0).eval()
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return model, size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225)))


def _assign(slides: list[dict[str, Any]], world: int) -> dict[str, int]:
    """slide -> rank: the largest slides first, each to the least-loaded rank (ties to the lower rank), so ranks get
    about equal tile counts; deterministic."""
    load = [0] * world
    owner = {}
    for b in sorted(slides, key=lambda b: (-int(b.get("tiles") or 0), b["slide"])):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[b["slide"]] = r
        load[r] += int(b.get("tiles") or 0)
    return owner


def _done(out: Path, stem: str, file: str, backbone_sha: str, tiles: int) -> Optional[dict[str, Any]]:
    """The record of a bag an earlier run finished with this backbone (its sidecar, checked against the bag file),
    or None."""
    sidecar = out / f"{stem}.bag.json"
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if record.get("backbone_sha256") != backbone_sha or record.get("tiles") != tiles or record.get("file") != file:
        return None
    bag = out / file
    if not bag.is_file() or sha256_file(bag) != record.get("sha256"):
        return None
    return record


def tiling(ingest: dict[str, Any]) -> dict[str, Any]:
    """The tiling a bag folder's tiles were cut with (`medfound shard wsi` settings): what new slides must be tiled
    with for a MIL head trained on these bags (`medfound predict`)."""
    return {k: ingest.get(k) for k in ("mpp", "tile_size", "min_tissue", "backend", "slide_mpp_override")}


@torch.no_grad()
def extract_bags(shards: str | Path, backbone: str | Path, out: str | Path, *, batch_size: int = 64,
                 format: str = "safetensors", overwrite: bool = False, device: Optional[str] = None,
                 precision: str = "bf16", num_workers: int = 0) -> dict[str, Any]:
    """Write the bag folder `out` (see medfound.data.bags) and return its index.

    Under `torchrun --nproc_per_node N` (or `launch/torchrun.sh N`) the slides are split across the processes by
    tile count; each process reads only its slides' tiles (the others are dropped before decoding). Each slide's bag
    is written atomically as soon as its last tile is embedded, with a sidecar `SLIDE.bag.json` recording the
    backbone's sha256; a rerun (after a kill, or on more processes) reuses every bag made by the same backbone and
    embeds only the rest. Rank 0 writes `bags.json` last, once every process is done: the folder is usable only then.
    The bags and bags.json (but for `seconds` and `created`) do not depend on the number of processes.

    Args:
        shards: a WSI tile shard set (`medfound shard wsi`): samples carry meta slide/x/y and the slide label.
        backbone: an export folder (config.json + model.safetensors) of `medfound pretrain`, `import` or timm.
        format: "safetensors" or "h5".
        precision: "bf16" runs the backbone under bf16 autocast on a GPU (features are stored as float32); "fp32"
            does not. On the CPU the backbone always runs in float32.
        overwrite: replace bags made by another backbone (without it such a folder is refused).
    """
    if format not in ("safetensors", "h5"):
        raise ValueError(f"--format {format!r}: choose safetensors or h5")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision {precision!r}: choose bf16 or fp32")

    remote = location.is_url(shards)
    shards_text = location.check_location(shards) if remote else str(shards)
    backbone, out = Path(backbone), Path(out)
    manifest = read_manifest(shards_text)
    if manifest.ingest.get("kind") != "wsi":
        raise ValueError(f"{shards} holds {manifest.ingest.get('kind')!r} samples; extract needs whole-slide tiles with "
                         "coordinates: shard the slides with `medfound shard wsi SLIDES --table labels.csv`")
    if not manifest.bags:
        raise ValueError(f"{shards}: the manifest lists no slides (manifest.bags); re-shard the slides with "
                         "`medfound shard wsi`")

    rank, world, dist, started = torchrun_group()
    import os

    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    backbone_sha = sha256_file(backbone / "model.safetensors")
    if rank == 0:
        _check_out(out, backbone_sha, overwrite)
    if dist is not None:
        dist.barrier()
    out.mkdir(parents=True, exist_ok=True)
    model, size, mean, std = _backbone(backbone)
    model.to(device)
    norm = Normalize(mean, std).to(device)
    bag_info = {b["slide"]: b for b in manifest.bags}
    expected = {b["slide"]: int(b.get("tiles") or 0) for b in manifest.bags if b.get("tiles")}
    owner = _assign([b for b in manifest.bags if b.get("tiles")], world)
    stems = {name: name.translate(_SAFE) for name in expected}
    reused = {name for name in expected if owner[name] == rank and
              _done(out, stems[name], f"{stems[name]}.{format}", backbone_sha, expected[name]) is not None}
    todo = {name for name in expected if owner[name] == rank and name not in reused}
    slides: dict[str, dict[str, Any]] = {}
    tiles_done, start = 0, time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") and precision == "bf16" \
        else contextlib.nullcontext()

    def finish(name: str) -> None:
        s = slides.pop(name)
        stem = stems[name]
        file = f"{stem}.{format}"
        order = np.lexsort(np.asarray(s["coords"]).T[::-1])  # by (x, y): the same bag whatever the read order
        save_bag(out / file, np.stack(s["features"])[order], np.asarray(s["coords"], dtype=np.int64)[order])
        thumb, ds = s["mosaic"].render()
        thumb.save(out / f".{stem}.thumb.png.tmp", format="PNG")
        os.replace(out / f".{stem}.thumb.png.tmp", out / f"{stem}.thumb.png")
        info = bag_info.get(name, {})
        record = {"slide": name, "label": info.get("label"), "split": info.get("split", s["split"]),
                  "site": info.get("site"), "tiles": len(s["features"]), "file": file,
                  "sha256": sha256_file(out / file), "tile_extent": s["extent"], "mpp": s["mpp"],
                  "thumbnail": f"{stem}.thumb.png", "thumbnail_downsample": ds}
        atomic_write_json(out / f"{stem}.bag.json", {**record, "backbone_sha256": backbone_sha})

    def mine(sample: dict) -> bool:  # before decoding: only this process's slides that are not done yet
        return json.loads(sample["json"]).get("slide") in todo

    if todo:
        for split in manifest.splits:
            urls, _ = shard_urls([shards_text], split)
            transform = build_transform("none", size, mean, std, train=False, normalize=False)

            def keep_meta(sample, _t=transform):
                o = _t(sample)
                o["meta"] = sample["meta"]
                o["thumb"] = sample["image"]
                return o

            # every process reads every shard (the tar members are cheap; decoding is not, and is done only here
            # for this process's slides), so shards are not split by node
            loader = make_loader(urls, Decoding(keep_meta), batch_size=batch_size,
                                 reading=Reading(split_by_node=False, sample_filter=mine), num_workers=num_workers,
                                 collate_fn=_collate_meta)
            for batch in loader:
                with autocast:
                    feats = model(norm(batch["image"].to(device))).float().cpu().numpy()
                tiles_done += len(feats)
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
                    if len(s["features"]) == expected.get(meta["slide"], -1):
                        finish(meta["slide"])  # its last tile: written now, memory freed
        for name in list(slides):  # fewer tiles than the manifest says (cannot happen with a verified set)
            raise ValueError(f"slide {name}: {len(slides[name]['features'])} tiles read, the manifest lists "
                             f"{expected[name]}; check the shards with `medfound inspect {shards}`")
    seconds = time.time() - start
    rate = {"rank": rank, "tiles": tiles_done, "seconds": round(seconds, 2), "reused": len(reused),
            "embedded": len(todo)}
    rates = [rate]
    if dist is not None:
        rates = [None] * world
        dist.all_gather_object(rates, rate)
    index: dict[str, Any] = {}
    if rank == 0:
        records = []
        for name in sorted(expected):
            record = _done(out, stems[name], f"{stems[name]}.{format}", backbone_sha, expected[name])
            if record is None:
                raise RuntimeError(f"slide {name}'s bag is missing after extraction (rank {owner[name]}); rerun "
                                   "`medfound extract`: finished bags are reused")
            records.append({k: v for k, v in record.items() if k != "backbone_sha256"})
        if not records:
            raise ValueError(f"{shards} has no tiles")
        total_tiles = sum(r["tiles"] for r in rates)
        wall = max(r["seconds"] for r in rates)
        index = {
            "format": BAGS_FORMAT,
            "backbone": {"path": str(backbone), "architecture": model.pretrained_cfg.get("architecture") or
                         json.loads((backbone / "config.json").read_text()).get("architecture"),
                         "sha256": backbone_sha,
                         "feature_dim": int(model.num_features), "input_size": size, "mean": mean, "std": std},
            "source": {"shards": location.redact(shards_text) if remote else str(shards), "name": manifest.name,
                       "digest": manifest.digest, "modality": manifest.modality,
                       "tiling": tiling(manifest.ingest)},
            "label_schema": manifest.label_schema.model_dump(),
            "slides": records,
            "seconds": round(wall, 1),
            "throughput": {"processes": world, "tiles_embedded": total_tiles,
                           "tiles_per_s": round(total_tiles / wall, 1) if wall > 0 and total_tiles else None,
                           "slides_reused": sum(r["reused"] for r in rates),
                           "slides_embedded": sum(r["embedded"] for r in rates)},
            "medfound_version": medfound.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        index["digest"] = hashlib.sha256(json.dumps([r["sha256"] for r in records]).encode()).hexdigest()
        atomic_write_json(out / BAGS_NAME, index)
    if dist is not None:
        dist.barrier()
        objs = [index]
        dist.broadcast_object_list(objs, src=0)
        index = objs[0] if rank == 0 else {}
        if started:
            dist.destroy_process_group()  # gloo aborts at exit when its group is left open
    return index


def _check_out(out: Path, backbone_sha: str, overwrite: bool) -> None:
    """Refuse a non-empty `out` that is not a bag folder, or holds bags of another backbone unless `overwrite`."""
    if not out.exists() or not any(out.iterdir()):
        return
    sidecars = list(out.glob("*.bag.json"))
    index = out / BAGS_NAME
    if not sidecars and not index.is_file():
        raise FileExistsError(f"{out} already exists and is not a bag folder; choose another --out")
    shas = set()
    for p in sidecars:
        try:
            shas.add(json.loads(p.read_text()).get("backbone_sha256"))
        except (OSError, ValueError):
            continue
    if index.is_file():
        try:
            shas.add(json.loads(index.read_text())["backbone"]["sha256"])
        except (OSError, ValueError, KeyError):
            pass
    other = shas - {backbone_sha}
    if other and not overwrite:
        raise FileExistsError(f"{out} holds bags made by another backbone (sha256 {sorted(other)[0][:12]}...); pass "
                              "--overwrite to replace them, or choose another --out")
    if other:  # --overwrite: the old index goes first, so the folder is never read as half old, half new
        index.unlink(missing_ok=True)


def _collate_meta(samples: list[dict]) -> dict:
    batch = collate([{k: v for k, v in s.items() if k not in ("meta", "thumb")} for s in samples])
    batch["meta"] = [s["meta"] for s in samples]
    batch["thumb"] = [s["thumb"] for s in samples]
    return batch

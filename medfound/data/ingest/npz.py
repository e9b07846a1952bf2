"""MedMNIST-layout `.npz`: `{split}_images` (N,H,W[,C] uint8) and `{split}_labels`: (N,1) class indices, or
(N,K) 0/1 findings for multi-label sets (ChestMNIST's 14 chest X-ray findings, as CheXNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from medfound.data.ingest import Ingested, label_schema_for
from medfound.data.manifest import LabelSchema
from medfound.io import sha256_file


def read_npz(path: str | Path, *, label_type: Optional[str] = None, label_names: Optional[list[str]] = None,
             site: Optional[str] = None, **_: object) -> Ingested:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz archive {path} not found")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    splits = [k[: -len("_images")] for k in arrays if k.endswith("_images")]
    if not splits:
        raise ValueError(f"{path}: no '<split>_images' arrays (found {sorted(arrays)}); "
                         "expected the MedMNIST layout train_images/train_labels/...")
    order = {"train": 0, "val": 1, "test": 2}
    splits.sort(key=lambda s: (order.get(s, 9), s))
    labels = {}
    widths = set()
    for s in splits:
        if f"{s}_labels" not in arrays:
            labels[s] = None
            continue
        y = arrays[f"{s}_labels"]
        if len(y) != len(arrays[f"{s}_images"]):
            raise ValueError(f"{path}: {s}_images has {len(arrays[f'{s}_images'])} images but {s}_labels has {len(y)}")
        widths.add(1 if y.ndim == 1 else y.shape[1])
        labels[s] = y.reshape(-1) if y.ndim == 1 or y.shape[1] == 1 else y
    multi = max(widths, default=1) > 1 or label_type == "multilabel"
    if multi:
        if len(widths) > 1 or min(widths) < 2:
            raise ValueError(f"{path}: multi-label archives hold (N, K) 0/1 label arrays with K >= 2 in every split "
                             f"(found widths {sorted(widths)})")
        k = widths.pop()
        names = label_names or [str(i) for i in range(k)]
        if len(names) != k:
            raise ValueError(f"{path}: {k} findings per image but {len(names)} --label-names {names}")
        if label_type not in (None, "multilabel"):
            raise ValueError(f"{path}: (N, {k}) labels are multi-label findings; --label-type {label_type} does not fit")
        schema = LabelSchema(type="multilabel", names=list(names))

        def to_index(row):
            if not np.isin(row, (0, 1)).all():
                raise ValueError(f"{path}: multi-label rows must be 0/1, got {row.tolist()}")
            return [int(i) for i in np.flatnonzero(row)]
    else:
        all_labels = [int(v) for s in splits if labels[s] is not None for v in labels[s]]
        schema, to_index = label_schema_for(all_labels, label_type, label_names)

    def samples():
        index = -1
        for s in splits:
            images = arrays[f"{s}_images"]
            if images.dtype != np.uint8:
                raise ValueError(f"{path}: {s}_images has dtype {images.dtype}; expected uint8")
            for i, img in enumerate(images):
                index += 1
                if not result.wants(index):
                    continue
                y = labels[s]
                yield {"key": f"{path.stem}_{s}_{i:06d}", "image": img, "split": s, "site": site,
                       "label": None if y is None else to_index(y[i] if multi else int(y[i])), "meta": {"index": i}}

    source = {"files": [{"name": path.name, "sha256": sha256_file(path)}]}
    settings = {"kind": "npz", "splits": {s: int(len(arrays[f"{s}_images"])) for s in splits}}
    result = Ingested(samples(), schema, source, settings)
    return result

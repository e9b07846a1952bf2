"""What the values of a segmentation mask mean, stated at ingest (`medfound shard images --mask-mode`).

A mask PNG can hold three different things, and guessing wrong silently ruins a model:
- `binary`: foreground where the value is > 0 (0/255 or 0/1 masks; stored as 0/255, 8-bit);
- `semantic`: the value is a class index (0 = background; a label map of organs; stored as is, 8-bit, so at most
  256 classes);
- `instance`: the value is an object id (0 = background, 1..N one id per nucleus or lesion, as MoNuSeg, HoVer-Net
  and Cellpose write them; stored at full depth, 16-bit PNG when N > 255). Trained as foreground vs background
  (`segment.num_classes: 2` maps every id > 0 to the foreground class); the ids stay in the shards for instance
  metrics.
Without `--mask-mode`, a mask that can only be read one way is taken as it is (0/255, or a few class values); one
with values over 255 (a 16-bit mask) is never clipped to 8 bits, and one that looks like instance labels (many ids in
one image, each a single connected blob) is never read as N classes: both stop the ingest asking for the mode.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

MASK_MODES = ("binary", "semantic", "instance")
INSTANCE_MIN_IDS = 24  # fewer distinct values are read as classes; label maps of more classes state --mask-mode


def instance_like(mask: np.ndarray) -> Optional[str]:
    """Why `mask` looks like instance labels, or None: more than INSTANCE_MIN_IDS distinct ids in one image, nine in
    ten of them a single 8-connected region (a class label map has a few values, and its classes often span several
    regions). A label map of many single-region classes is caught too: its user states --mask-mode semantic."""
    from scipy import ndimage

    ids = np.unique(mask)
    ids = ids[ids != 0]
    if len(ids) <= INSTANCE_MIN_IDS:
        return None
    boxes = ndimage.find_objects(mask.astype(np.int64, copy=False))
    single = 0
    for value in ids.tolist():
        box = boxes[value - 1] if value - 1 < len(boxes) else None
        if box is None:
            continue
        _, n = ndimage.label(mask[box] == value, structure=np.ones((3,) * mask.ndim))
        single += n == 1
    if single < 0.9 * len(ids):
        return None
    return f"{len(ids)} ids up to {int(ids.max())}, {single} of them one connected blob each"


def apply_mask_mode(mask: np.ndarray, mode: Optional[str], where: str) -> np.ndarray:
    """The mask to store under `mode` (see the module docstring); ValueError naming `where` and the fix when it
    cannot be stored without a stated mode, or does not fit the stated one."""
    if mode is not None and mode not in MASK_MODES:
        raise ValueError(f"--mask-mode {mode}: choose one of {', '.join(MASK_MODES)}")
    top = int(mask.max()) if mask.size else 0
    if mask.size and int(mask.min()) < 0:
        raise ValueError(f"{where}: the mask has negative values; masks hold 0 (background) and positive values")
    if mode == "binary":
        return (mask > 0).astype(np.uint8) * 255
    if mode == "instance":
        if top > 65535:
            raise ValueError(f"{where}: {top} instance ids do not fit a 16-bit PNG; split the image into tiles")
        return mask.astype(np.uint8 if top <= 255 else np.uint16)
    if top > 255:
        why = instance_like(mask)
        hint = (f"it looks like instance labels ({why}): pass --mask-mode instance to keep the ids (trained as "
                "foreground vs background) or --mask-mode binary" if why else
                "pass --mask-mode instance (object ids) or --mask-mode binary (foreground where > 0)")
        raise ValueError(f"{where}: the mask holds values up to {top} (a 16-bit mask), which 8 bits cannot store and "
                         f"medfound never clips; {hint}")
    if mode is None:
        why = instance_like(mask)
        if why:
            raise ValueError(f"{where}: the mask looks like instance labels ({why}), which would be read as "
                             f"{top + 1} classes; pass --mask-mode instance (keep the ids, trained as foreground vs "
                             "background), --mask-mode binary (foreground where > 0), or --mask-mode semantic if the "
                             "values really are class indices")
    return mask.astype(np.uint8)

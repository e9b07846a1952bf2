"""The ingest readers' options as `medfound shard KIND` shows them: each keyword parameter of a reader (its
signature is the declaration of what it reads, `medfound.data.ingest.reader_options`) has one entry here, its
type and help; `shard KIND --help` lists exactly the options KIND's reader reads (a test checks that every
reader option has an entry and no entry is orphaned). Torch-free."""

from __future__ import annotations

from typing import Any


def csv_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def fractions(value: str) -> dict[str, float]:
    """`train=0.8,val=0.1,test=0.1` -> {"train": 0.8, ...}."""
    import argparse

    out = {}
    for part in csv_list(value):
        k, _, v = part.partition("=")
        try:
            out[k] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--split-fractions expects name=fraction pairs, got {part!r}") from None
    return out


def int_list(value: str) -> list[int]:
    return [int(x) for x in value.split(",")]


FLAG = {"action": "store_true"}

OPTIONS: dict[str, dict[str, Any]] = {
    "label_type": {"choices": ["none", "binary", "multiclass", "ordinal", "multilabel"],
                   "help": "default: binary for 2 classes, else multiclass; use ordinal for grades"},
    "label_names": {"type": csv_list, "help": "class names in index order, comma-separated"},
    "keep_names": {**FLAG, "help": "use file/slide names in sample keys (only for public data whose names carry no "
                                   "PHI)"},
    "salt": {"help": "secret for patient tokens and keys (default: derived from the inputs' bytes, never stored); "
                     "give the same salt to every shard set of one cohort"},
    "table": {"help": "CSV or Parquet. images: path,label|labels[,patient_id,site,split,laterality,view,mask,fov,"
                      "mask_NAME]; dicom: path,label|labels[,split,site]; wsi: slide,label|labels[,split,site]; "
                      "volumes: path[,mask,label,patient_id,site,split]"},
    "split_fractions": {"type": fractions, "help": "split by patient when there is no split column, e.g. "
                                                   "train=0.8,val=0.1,test=0.1"},
    "allow_burned_in": {**FLAG, "help": "ingest images that may show PHI in their pixels (BurnedInAnnotation=YES, "
                                        "or ultrasound / secondary captures without BurnedInAnnotation=NO); only "
                                        "after cleaning them"},
    "require_spacing": {**FLAG, "help": "skip images without a pixel spacing (PixelSpacing / ImagerPixelSpacing "
                                        "absent or zero), counted with that reason, so every sample can be "
                                        "resampled by data.spacing_mm"},
    "fov": {"choices": ["none", "detect", "crop"], "help": "colour fundus: store a detected field-of-view mask, or "
                                                           "also crop to it (default none)"},
    "scale": {"type": float, "help": "resize every image (and its masks, by nearest neighbour) by this factor, e.g. "
                                     "0.5 to match another set's scale; recorded in the manifest (and --mpp is "
                                     "divided by it)"},
    "fov_diameter": {"type": int, "help": "fundus, with --fov detect: resize each image so its field of view is "
                                          "this many px wide (DRIVE: about 540)"},
    "mask_mode": {"choices": ["binary", "semantic", "instance"],
                  "help": "what mask values mean: binary (foreground where > 0, stored 0/255), semantic (class "
                          "indices, at most 255), instance (object ids 1..N, kept at full depth, trained as "
                          "foreground vs background). Needed for 16-bit masks and masks that look like instance "
                          "labels"},
    "spacing_mm": {"type": float, "help": "radiographs, mammograms: the images' pixel spacing in mm, stored per "
                                          "sample for data.spacing_mm (a spacing_mm column in the --table gives it "
                                          "per image instead)"},
    "mpp": {"type": float, "help": "wsi: target micrometres per pixel of the tiles (default 0.5); images: the "
                                   "images' resolution, recorded in the manifest and the model card"},
    "layout": {"choices": ["volume", "slices", "patches"], "help": "default volume"},
    "axis": {"type": int, "help": "slice axis (default: the one with the coarsest spacing)"},
    "patch": {"type": int_list, "help": "patch size, e.g. 64,64,16"},
    "tile_size": {"type": int, "help": "tile side in pixels at --mpp (default 224)"},
    "min_tissue": {"type": float, "help": "minimum tissue fraction of a tile (default 0.5)"},
    "slide_mpp": {"type": float, "help": "scan resolution for slides without mpp metadata"},
    "split": {"help": "split of tiles from slides without a table row (default train)"},
    "backend": {"choices": ["tiffslide", "openslide"], "help": "default tiffslide"},
}

"""Task kind `segmentation`: a registered segmentation network (ViT heads UNETR / TransUNet over a backbone, or
MONAI's U-Net / Attention U-Net / V-Net) with Dice + cross-entropy; the export is `segmenter.safetensors` +
`segmenter.json` (and, for ViT heads in 2-D, the adapted backbone as a timm folder in export/backbone)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from medfound.adapt.tasks import build_segmentation_task
from medfound.adapt.tuning import merged_copy, merged_segmenter
from medfound.data.ingest.volumes import nifti_bytes, read_volume
from medfound.data.loaders import image_train_loader, normalizer, prepare
from medfound.data.manifest import read_manifest
from medfound.data.pipeline import Decoding, Reading, make_loader, shard_urls
from medfound.data.scale import scale_stats
from medfound.data.seg_transforms import build_seg_transform
from medfound.evaluate.records import network_lineage
from medfound.evaluate.report import SegmentationScorer, normalised_scale
from medfound.evaluate.segmentation import (auto_factors, auto_target, predict_probs, predict_scaled, score_loader,
                                            training_calibre)
from medfound.io import atomic_write_bytes
from medfound.publish.export import export_model
from medfound.publish.licences import for_export
from medfound.run import backbone_structure, lineage, parent_lineage
from medfound.run.selection import build_selection
from medfound.tasks.base import NETWORK_SNIPPET, TrainData, load_strict, register_task
from medfound.tasks.images import ImageNetwork, tuning_words

KIND_TEXT = {"images": "image", "dicom": "DICOM"}
TUNING_TEXT = {"lora": "LoRA (r={r}, alpha={alpha})", "full": "full fine-tuning", "linear_probe": "frozen backbone",
               "last_k": "last {k} blocks"}


@register_task
class SegmentationSpec(ImageNetwork):
    name = "segmentation"
    weights_file = "segmenter.safetensors"
    meta_file = "segmenter.json"
    pipeline_tag = "image-segmentation"

    def build(self, recipe, data: TrainData):
        return build_segmentation_task(recipe)

    def train_loader(self, recipe, data: TrainData, ctx):
        transform = build_seg_transform(recipe.segment, train=True, window=recipe.data.window)
        return image_train_loader(recipe.data, recipe.trainer.seed, data.sets, data.manifests, transform,
                                  labelled=False, keys=data.keys)

    def normalizer(self, recipe):
        """ImageNet statistics on the device for 2-D `imagenet` intensity; None where the transform already
        normalised (z-score, CT)."""

        seg = recipe.segment
        return normalizer(recipe.data) if seg.intensity == "imagenet" and seg.spatial_dims == 2 else None

    def describe(self, recipe, data: TrainData) -> str:
        tuning = tuning_words(recipe, TUNING_TEXT)
        return f"{recipe.head.type} segmentation, {tuning}, Dice + cross-entropy"

    def lineage(self, recipe, state, data: TrainData) -> dict[str, Any]:
        record = lineage(recipe, state, data.manifests, self.stage, self.describe(recipe, data),
                         parent_lineage(recipe.backbone))

        scale = scale_stats(recipe.data.shards[0], recipe.data.train_split)  # the scale it expects
        if recipe.segment.spatial_dims == 2:  # segment.scale=auto's target, measured once here
            calibre = training_calibre(recipe.data.shards[0], recipe.data.train_split, recipe.segment, recipe.data)
            if calibre:
                scale["calibre_px"] = calibre
        record.update(tuning=recipe.tuning, head=recipe.head.model_dump(),
                      segment=recipe.segment.model_dump(mode="json"), scale=scale)
        return record

    def export(self, recipe, module, lineage: dict[str, Any], data: TrainData, export: Path) -> dict[str, Any]:
        from types import SimpleNamespace

        seg = recipe.segment
        merged = merged_segmenter(module.model).eval()
        if module.vit is not None and seg.spatial_dims == 2:  # the adapted backbone, reusable as a timm model
            prep = SimpleNamespace(mean=recipe.data.mean, std=recipe.data.std, img_size=seg.patch_size[-1])
            export_model(merged_copy(merged.net.encoder.vit), export / "backbone", data=prep, lineage=lineage,
                         license=for_export(recipe.card.license, lineage), adapter=module.vit if recipe.tuning == "lora" else None,
                         adapter_base_model=recipe.backbone.weights)
        return self.format(recipe).write(self, recipe, merged, export, lineage=lineage, meta={
            "medfound": lineage, "class_names": seg.names, "head": recipe.head.model_dump(),
            "segment": seg.model_dump(mode="json")})

    def load_network(self, export: Path, recipe) -> Any:
        """The trained network rebuilt from the recipe (the ViT's structure from export/backbone/config.json) and
        loaded strictly from export/segmenter.safetensors; eval mode. `[B, C, *S]` -> logits `[B, K, *S]`."""

        export = Path(export)
        update: dict[str, Any] = {"tuning": "full"}
        if recipe.backbone is not None and (export / "backbone" / "config.json").is_file():
            update["backbone"] = backbone_structure(recipe, export / "backbone")
        task = build_segmentation_task(recipe.model_copy(update=update))
        load_strict(task.model, export / self.weights_file, "network")
        return task.model.eval()

    def scorer(self, run, recipe, out: Path) -> Any:
        return SegmentationScorer(self.load(run.export, recipe), self.normalizer(recipe), recipe, run.export,
                                  run.export / self.weights_file, trained_segment=run.recipe.segment)

    def selection(self, recipe, data: TrainData, run_dir: Path) -> Any:
        """eval.every: the validation split segmented whole every N steps (Dice by default, nnU-Net's pseudo-Dice
        made exact; binary tasks may select on pixel_f1) and the best step exported (medfound.run.selection)."""

        m = data.manifests[0]
        return build_selection(recipe, m.counts["by_split"], m.label_schema.names, run_dir, "dice",
                               lambda module, keys: self.validate(recipe, module, keys))

    def validate(self, recipe, module, keys: Optional[frozenset] = None) -> dict[str, Any]:
        """The metrics of the training module (eval mode, on its device) on eval.select_split (only `keys` of it,
        when given): the evaluation's own sliding-window inference and scorer, native geometry, no intervals; HD95
        only when eval.select asks for it (it is the slow part)."""

        seg, d, ev = recipe.segment, recipe.data, recipe.eval
        urls = shard_urls([d.shards[0]], ev.select_split)[0]
        loader = make_loader(urls, Decoding(prepare(d, build_seg_transform(seg, train=False, window=d.window)),
                                            max_bad_fraction=d.max_bad_fraction), batch_size=1,
                             reading=Reading(split_by_node=False, keys=keys), num_workers=0)
        normalize = self.normalizer(recipe)
        if normalize is not None:
            normalize = normalize.to(next(module.model.parameters()).device)
        scorer, _, _ = score_loader(module.model, normalize, loader, seg, hd=seg.hd95 and ev.select == "hd95")
        if not scorer.per_image:
            raise ValueError(f"eval.select_split={ev.select_split!r} of {d.shards[0]} yielded no image to validate")
        return scorer.result()["metrics"]

    def scale_normalised(self, recipe) -> tuple[str, ...]:
        """The scale keys the segment.* resampling evens out (not compared by the scale check; evaluate's rule)."""

        return normalised_scale(recipe.segment)

    predict_options = frozenset({"save_probabilities", "overlay", "mask_format", "anonymous", "scale"})

    def predict(self, run, recipe, staged, out: Path, rt, **options: Any) -> list[dict[str, Any]]:
        """`medfound predict`: one mask per input in the input's own geometry (the evaluation's sliding windows on the
        image resampled as in evaluation, the probabilities mapped back to the input's grid): 2-D images as a PNG of
        class indices `masks/KEY.png`; volumes as gzipped NIfTI `masks/KEY.nii.gz` with the source file's affine
        (NIfTI or NRRD input, read as ingest reads it; a given shard set's volumes keep only their spacing).
        DICOM inputs get DICOM SEGs by default (`mask_format="auto"`; `write_dicom_segs`): one multi-frame SEG per
        source series (or multi-frame file) at `masks/KEY.dcm` of its first input, referencing every source instance;
        `mask_format="png"` or `anonymous` writes PNG instead (a SEG carries the source's patient and study
        attributes, as the standard requires; PNG carries none). predictions.csv maps each input to its mask (and
        its frame of the SEG, `seg_frame`) with voxel counts per class."""
        import io

        import numpy as np
        import torch
        from tqdm.auto import tqdm

        # the options predict_options declares (medfound.predict checks them): save_probabilities, overlay,
        # mask_format ("auto", "png", "dicom-seg"), anonymous, scale ("auto", "auto-image" or a factor)
        save_probabilities, overlay = options.get("save_probabilities", False), options.get("overlay", False)
        mask_format, anonymous = options.get("mask_format") or "auto", options.get("anonymous", False)
        scale = options.get("scale")
        seg, d = recipe.segment, recipe.data
        volumes = seg.spatial_dims == 3
        target = None
        if scale is not None:  # `--scale auto|FACTOR`: these inputs resized as evaluate's segment.scale would
            if volumes:
                raise ValueError("--scale resizes 2-D images; volumes are resampled by the recipe's segment.spacing")

            pool = "image" if str(scale) == "auto-image" else seg.auto_pool  # auto: segment.auto_pool
            scale = "auto" if str(scale) in ("auto", "auto-image") else float(scale)
            if scale == "auto":
                target = auto_target(network_lineage(run.export).get("scale"), recipe, seg)
            seg = seg.model_copy(update={"scale": scale, "fov_diameter": None, "mpp": None, "auto_pool": pool})
        if volumes and staged.kind in ("images", "dicom"):
            raise ValueError(f"this model segments volumes, but the inputs are {KIND_TEXT[staged.kind]} files: "
                             "give it NIfTI or NRRD volumes (a DICOM series: convert it to NIfTI first, e.g. with "
                             "dcm2niix)")
        if not volumes and staged.kind == "volumes":
            raise ValueError("this model segments 2-D images, but the inputs are volumes: give it image or DICOM "
                             "files (or shard the volumes as slices: shard volumes --layout slices)")
        if mask_format not in ("auto", "png", "dicom-seg"):
            raise ValueError(f"--mask-format {mask_format}: choose auto, png or dicom-seg")
        if mask_format == "dicom-seg" and (anonymous or staged.kind != "dicom"):
            raise ValueError("--mask-format dicom-seg needs DICOM inputs (and not --anonymous: a SEG carries the "
                             "source's patient and study attributes)")
        dicom_seg = staged.kind == "dicom" and not anonymous and mask_format in ("auto", "dicom-seg")
        manifest = read_manifest(staged.shards)
        urls = [u for split in manifest.counts["by_split"] for u in shard_urls([staged.shards], split)[0]]
        loader = make_loader(urls, Decoding(prepare(d, build_seg_transform(seg, False, d.window, predict=True)),
                                            max_bad_fraction=1.0), batch_size=1, reading=Reading(split_by_node=False),
                             num_workers=rt.workers(d.num_workers))
        device = rt.torch_device()
        model = self.load(run.export, recipe).to(device)
        normalize = self.normalizer(recipe)
        normalize = normalize.to(device) if normalize is not None else None
        rows: list[dict[str, Any]] = []
        pending: list[tuple[str, Any, Any, dict[str, Any]]] = []
        with torch.no_grad(), tqdm(total=manifest.counts["total"], desc="predict", unit="img",
                                   disable=not rt.progress) as bar:
            factors = auto_factors(model, normalize, loader, seg, target, lambda: rt.autocast(device)) \
                if seg.scale == "auto" else {}
            for batch in loader:
                image = batch["image"].to(device)
                image = image if normalize is None else normalize(image)
                own, factor = factors.get(batch["key"][0], (1.0, 1.0))
                with rt.autocast(device):  # eval.tta_scales and --scale auto as in evaluation (2-D)
                    probs = (predict_scaled(model, image.float(), seg,
                                            [factor * t for t in (recipe.eval.tta_scales or [1.0])])
                             if not volumes else
                             predict_probs(model, image.float(), seg.patch_size, seg.overlap))[0].float()
                size = tuple(int(v) for v in batch["native_size"][0])
                if tuple(probs.shape[1:]) != size:  # resampled for the model: mapped back to the input's grid
                    probs = torch.nn.functional.interpolate(probs[None], size=size, align_corners=False,
                                                            mode="trilinear" if volumes else "bilinear")[0]
                mask = probs.argmax(0).cpu().numpy().astype(np.uint8 if len(seg.names) <= 256 else np.uint16)
                key = batch["key"][0]
                spacing = batch["spacing"][0].tolist() if "spacing" in batch else None
                name = f"masks/{key}.nii.gz" if volumes else f"masks/{key}.png"
                row = {"input": staged.name(key), "key": key, "mask": name,
                       **{f"pixels_{c}": int((mask == i).sum()) for i, c in enumerate(seg.names)},
                       **({"scale_factor": round(factor, 4), "scale_factor_image": round(own, 4)}
                          if seg.scale == "auto" else {})}
                if dicom_seg:  # written per series once every frame of it is predicted
                    pending.append((key, staged.source(key), mask, row))
                else:
                    atomic_write_bytes(out / name, mask_bytes(mask, staged.source(key), spacing))
                if save_probabilities:  # nnU-Net's --save_probabilities: [K, *S] on the input's grid
                    buf = io.BytesIO()
                    np.savez_compressed(buf, probabilities=probs.cpu().numpy().astype(np.float16),
                                        class_names=np.array(seg.names))
                    row["probabilities"] = f"probabilities/{key}.npz"
                    atomic_write_bytes(out / row["probabilities"], buf.getvalue())
                if overlay and not volumes:
                    row["overlay"] = f"overlays/{key}.png"
                    atomic_write_bytes(out / row["overlay"], overlay_png(batch["image"][0], mask))
                rows.append(row)
                bar.update(1)
        if pending:
            write_dicom_segs(pending, out, seg.names, rt.warnings)
        if overlay and volumes:
            rt.warnings.append("--overlay draws 2-D images only; open the NIfTI masks over their volumes in a viewer")
        return rows

    def publish_details(self, recipe, meta: dict[str, Any], export: Path) -> tuple[list, dict[str, Any]]:
        seg = recipe.segment
        details = [("classes", ", ".join(seg.names))]
        input_cfg = {"spatial_dims": seg.spatial_dims, "patch_size": seg.patch_size, "overlap": seg.overlap,
                     "intensity": seg.intensity, "clip": seg.clip, "stats": seg.stats, "spacing": seg.spacing}
        if seg.intensity == "imagenet":
            input_cfg.update(mean=list(recipe.data.mean), std=list(recipe.data.std))
        return details, input_cfg

    def load_snippet(self) -> str:
        return NETWORK_SNIPPET.format(folder="PATH_TO_THIS_FOLDER", what="the segmentation network, eval mode") + """
# rows = model.predict(["scan_1.png", "scan_2.dcm"])  # a mask per input in its own geometry (rows[i]["mask"]),
# preprocessed exactly as in training (preprocessing.json: intensity, resampling, window); the same as the CLI:
#   medfound predict PATH_TO_THIS_FOLDER scans/ --out masks/
# by hand, after that preprocessing: medfound.evaluate.segmentation.predict_probs(model, image[None], patch_size,
# overlap) -> [1, K, *S] probabilities"""


def overlay_png(image, mask) -> bytes:
    """The image the model saw (min-max scaled per channel, brought to the mask's grid) with each foreground class
    painted in its colour at half opacity, as PNG: `image` `[C, *S]`, `mask` `[H, W]` class indices."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    x = image.float()
    if tuple(x.shape[1:]) != mask.shape:
        x = torch.nn.functional.interpolate(x[None], size=mask.shape, mode="bilinear", align_corners=False)[0]
    lo = x.amin(dim=(1, 2), keepdim=True)
    hi = x.amax(dim=(1, 2), keepdim=True)
    x = ((x - lo) / (hi - lo).clamp_min(1e-8) * 255).numpy()
    rgb = np.repeat(x[:1], 3, 0) if x.shape[0] == 1 else x[:3]
    rgb = np.moveaxis(rgb, 0, -1).astype(np.float64)
    colours = np.array([(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255)], float)
    for c in range(1, int(mask.max()) + 1):
        where = mask == c
        rgb[where] = 0.5 * rgb[where] + 0.5 * colours[(c - 1) % len(colours)]
    buf = io.BytesIO()
    Image.fromarray(rgb.round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_dicom_segs(pending: list[tuple[str, Any, Any, dict[str, Any]]], out: Path, class_names: list[str],
                     warnings: list[str]) -> None:
    """The masks predicted from DICOM inputs as DICOM SEGs: one multi-frame SEG per source series (the frames in the
    series' order, every source instance referenced) or per multi-frame source file, at `masks/KEY.dcm` of its
    first input; each row says which SEG holds its mask and at which frame. A group the SEG IOD cannot reference
    (no Frame of Reference, sources of several sizes) falls back to one PNG per input, with a warning by index."""

    groups: dict[str, list[tuple[str, Any, Any, dict[str, Any]]]] = {}
    for item in pending:
        groups.setdefault(_series_of(item[1]), []).append(item)
    for members in groups.values():
        members.sort(key=lambda m: _instance_order(m[1], m[0]))
        first = members[0][0].partition("_f")[0]
        try:
            data, frames = dicom_seg_bytes([m[2] for m in members], [m[1] for m in members], class_names)
        except ValueError as e:  # not every source can be referenced (e.g. no Frame of Reference)
            for key, _, mask, row in members:
                warnings.append(f"input #{int(key.partition('_f')[0])}: no DICOM SEG ({e}); wrote PNG")
                atomic_write_bytes(out / row["mask"], mask_bytes(mask, None, None))
            continue
        name = f"masks/{first}.dcm"
        atomic_write_bytes(out / name, data)
        for (_, _, _, row), numbers in zip(members, frames):
            row.update(mask=name, seg_frames=" ".join(map(str, numbers)))


def _series_of(source: Optional[Path]) -> str:
    """The SeriesInstanceUID a DICOM file belongs to (its own path where it has none, or cannot be read)."""
    import pydicom

    try:
        uid = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).get(
            "SeriesInstanceUID")
    except Exception:  # an unreadable header was already skipped by ingest: its own group
        uid = None
    return f"series:{uid}" if uid else f"file:{source}"


def _instance_order(source: Optional[Path], key: str) -> tuple:
    """Sort key of a series' frames: InstanceNumber, then the position along the slice normal, then the key (a
    multi-frame file's frames keep their order)."""
    import pydicom

    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True,
                             specific_tags=["InstanceNumber", "ImagePositionPatient"])
        number = int(ds.get("InstanceNumber") or 0)
        z = float(ds.ImagePositionPatient[2]) if ds.get("ImagePositionPatient") else 0.0
    except Exception:
        number, z = 0, 0.0
    return number, z, key


def dicom_seg_bytes(masks: list, sources: list[Optional[Path]], class_names: list[str]) -> tuple[bytes, list]:
    """Masks of class indices (one per source frame) as one DICOM SEG (highdicom; binary, one segment per foreground
    class, labelled with the class name, algorithm "medfound") referencing their source images: single-frame images
    of one series, or one multi-frame image (the masks in its frame order). Returns the file and, per mask, the SEG
    frames that hold it (one per segment; highdicom orders the frames by position, so they are read back from the
    SEG's per-frame references). ValueError when it cannot be (a source without what the SEG IOD needs, masks off
    the source grid, highdicom missing)."""
    import io

    import numpy as np

    if any(s is None for s in sources):
        raise ValueError("no source file (a shard set's sample)")
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise ValueError("highdicom is not installed (pip install medfound[dicom])") from None
    import medfound

    paths = list(dict.fromkeys(sources))  # a multi-frame file appears once per frame
    datasets = [pydicom.dcmread(p) for p in paths]
    frames = sum(int(getattr(ds, "NumberOfFrames", 1) or 1) for ds in datasets)
    if len(datasets) > 1 and frames != len(datasets):
        raise ValueError("a SEG references one multi-frame image or single-frame images of one series, not both")
    if frames != len(masks):
        raise ValueError(f"{len(masks)} masks for {frames} source frames")
    for ds, mask in zip(datasets * frames if len(datasets) == 1 else datasets, masks):
        if (int(ds.Rows), int(ds.Columns)) != mask.shape:
            raise ValueError(f"the mask {mask.shape} is not on the source's {ds.Rows}x{ds.Columns} grid")
    algorithm = hd.AlgorithmIdentificationSequence(name="medfound", version=medfound.__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    segments = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for i, name in enumerate(class_names) if i > 0]
    import warnings

    try:
        with warnings.catch_warnings():  # highdicom's notes on the source's own attribute formats
            warnings.simplefilter("ignore")
            seg = hd.seg.Segmentation(
                source_images=datasets, pixel_array=np.stack(masks).astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
                series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(), instance_number=1,
                manufacturer="medfound", manufacturer_model_name="medfound predict",
                software_versions=medfound.__version__, device_serial_number="n/a", omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(str(e).split("\n")[0][:160]) from None
    where: dict[tuple[str, int], list[int]] = {}
    for number, group in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        ref = group.DerivationImageSequence[0].SourceImageSequence[0]
        where.setdefault((str(ref.ReferencedSOPInstanceUID), int(ref.get("ReferencedFrameNumber") or 1)),
                         []).append(number)
    uid = {p: str(ds.SOPInstanceUID) for p, ds in zip(paths, datasets)}
    multiframe = len(datasets) == 1 and frames > 1
    buf = io.BytesIO()
    seg.save_as(buf)
    return buf.getvalue(), [where.get((uid[src], j + 1 if multiframe else 1), []) for j, src in enumerate(sources)]


def mask_bytes(mask, source: Optional[Path], spacing: Optional[list[float]]) -> bytes:
    """A predicted mask as its file: a 2-D mask as PNG; a volume's as gzipped NIfTI on the source file's grid (its
    affine, read as ingest reads it), or with its voxel spacing alone when no source file is known."""
    import io

    import numpy as np

    if mask.ndim == 2:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(mask).save(buf, format="PNG", compress_level=1)  # masks compress well at any level
        return buf.getvalue()

    if source is not None:
        array, affine = read_volume(source)
        if array.shape != mask.shape:
            raise ValueError(f"the mask {mask.shape} does not fit its input's grid {array.shape}")
    else:
        affine = np.diag([*(spacing or [1.0, 1.0, 1.0]), 1.0])
    return nifti_bytes(mask, affine)

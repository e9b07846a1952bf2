"""Box-prompt segmentation (MedSAM) end to end: training boxes from masks, training, export, prediction, evaluation.

This module holds the network-side pieces (boxes, transforms, the task module, the predictor); the run lifecycle
(training data, export, evaluation, loading) is the `box_prompt` task kind, medfound/tasks/box_prompt.py.

Training (`medfound finetune adapt/medsam.yaml`): each sample is one image and one structure's mask; the image is
resized to `data.img_size` (after a random window around the structure, flips and intensity jitter unless
`head.augment=false`), the box is the mask's bounding box with each side moved outwards by a random 0..20 px
(MedSAM), and the loss is Dice + binary cross-entropy on the mask logits.

Inference (`medfound prompt RUN_DIR IMAGE --box x0,y0,x1,y1 [--box ...] --out DIR`, or `medfound.load(RUN_DIR)`,
a `BoxPredictor`, in Python):
the image is encoded once and every box gives its own mask at the image's own resolution.

Evaluation (`medfound evaluate RUN_DIR`): every `eval.split` sample is predicted from its mask's tight box (no
jitter) on the original image; Dice per sample, per structure (the shard label, e.g. the organ) and overall.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfound.config import FinetuneRecipe
from medfound.io import atomic_write_bytes
from medfound.adapt.pictures import overlay_rows
from medfound.adapt.tasks import HeadWarmup, task_param_groups, vit_trainables
from medfound.adapt.tuning import tune_segmenter
from medfound.data.transforms import Normalize, to_image_tensor
from medfound.registry import HEADS


def box_from_mask(mask: np.ndarray | torch.Tensor, jitter: float = 0.0, rng: Optional[random.Random] = None
                  ) -> list[float]:
    """The bounding box `[x0, y0, x1, y1]` (inclusive pixel indices) of `mask > 0` `[H, W]`; with `jitter`, each
    side moves outwards by a random amount in [0, jitter] px, clipped to the image (MedSAM's perturbation)."""
    m = np.asarray(mask) > 0
    if m.ndim != 2:
        raise ValueError(f"a box comes from a 2-D mask, got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if len(xs) == 0:
        raise ValueError("the mask is empty: there is no structure to put a box around")
    h, w = m.shape
    x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())
    if jitter > 0:
        rng = rng or random.Random()
        x0, y0 = max(0.0, x0 - rng.uniform(0, jitter)), max(0.0, y0 - rng.uniform(0, jitter))
        x1, y1 = min(w - 1.0, x1 + rng.uniform(0, jitter)), min(h - 1.0, y1 + rng.uniform(0, jitter))
    return [x0, y0, x1, y1]


def _scale_box(box: Sequence[float], src: tuple[int, int], dst: int) -> list[float]:
    """A box in an (H, W) image -> the same box in the image resized to dst x dst."""
    h, w = src
    return [box[0] * dst / w, box[1] * dst / h, box[2] * dst / w, box[3] * dst / h]


def _crop_around(box: Sequence[float], h: int, w: int, zoom: tuple[float, float]) -> tuple[int, int, int, int]:
    """A random square-ish window (y0, x0, y1, x1) of the image that contains `box` whole: its side is a random
    fraction `zoom` of the image's, never smaller than the box, placed at random around it."""
    g = torch.empty(3).uniform_()
    frac = zoom[0] + (zoom[1] - zoom[0]) * float(g[0])
    ch = int(min(h, max(box[3] - box[1] + 1, round(h * frac))))
    cw = int(min(w, max(box[2] - box[0] + 1, round(w * frac))))
    y_lo, y_hi = max(0, int(box[3]) + 1 - ch), min(int(box[1]), h - ch)
    x_lo, x_hi = max(0, int(box[2]) + 1 - cw), min(int(box[0]), w - cw)
    y0 = y_lo + int(round(float(g[1]) * max(0, y_hi - y_lo)))
    x0 = x_lo + int(round(float(g[2]) * max(0, x_hi - x_lo)))
    return y0, x0, y0 + ch, x0 + cw


def box_window(box: Sequence[float], margin: float, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int]:
    """The square window (y0, x0, side) around `box` with `margin` x the box's longer side on each side, its centre
    moved by `shift` x side; it may reach outside the image (`crop_padded` pads with zeros)."""
    bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
    side = max(4, int(round(max(bw, bh) * (1 + 2 * margin))))
    cx, cy = (box[0] + box[2]) / 2 + shift[0] * side, (box[1] + box[3]) / 2 + shift[1] * side
    return int(round(cy - side / 2)), int(round(cx - side / 2)), side


def crop_padded(x: torch.Tensor, y0: int, x0: int, side: int) -> torch.Tensor:
    """`x[..., y0:y0+side, x0:x0+side]` with zeros where the window leaves the image."""
    h, w = x.shape[-2:]
    pad = (max(0, -x0), max(0, x0 + side - w), max(0, -y0), max(0, y0 + side - h))
    if any(pad):
        x = F.pad(x, pad)
        y0, x0 = y0 + pad[2], x0 + pad[0]
    return x[..., y0:y0 + side, x0:x0 + side]


def build_prompt_transform(img_size: int, mask: str, jitter: float, train: bool, augment: bool = True,
                           crop_to_box: Optional[float] = None, window: Optional[str] = None):
    """sample -> {"image" `[3, S, S]` (uint8 or float in [0, 1]), "mask" long `[1, S, S]`, "box" `[4]`}.

    Training with `augment`: a random window that contains the structure (40-100% of the image side: the same
    structure at other scales and positions), random flips and brightness/contrast jitter, so that the decoder
    learns to follow the box rather than to recall where structures sat in the few training images."""
    def apply(sample: dict) -> dict:
        masks = sample.get("masks") or {}
        if mask not in masks:
            raise ValueError(f"no '{mask}' mask in sample {sample.get('key')} (members: {sorted(masks)}); set head.mask")
        m = np.asarray(masks[mask])
        m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
        x = to_image_tensor(sample["image"], sample.get("meta"), window)  # DICOM: rescale + window (data.window)
        if tuple(x.shape[-2:]) != m.shape:
            raise ValueError(f"sample {sample.get('key')}: image {tuple(x.shape[-2:])} and mask {m.shape} differ in size")
        target = torch.from_numpy(m)
        try:
            tight = box_from_mask(m)
        except ValueError:
            raise ValueError(f"sample {sample.get('key')}: the '{mask}' mask is empty; drop it from the table") from None
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if crop_to_box is not None:  # the window the predictor will cut around the user's box, varied in training
            margin, shift = crop_to_box, (0.0, 0.0)
            if train and augment:
                margin = crop_to_box * float(torch.empty(()).uniform_(0.5, 1.5))
                shift = tuple(float(v) for v in torch.empty(2).uniform_(-0.1, 0.1))
            y0, x0, side = box_window(tight, margin, shift)
            x, target = crop_padded(x, y0, x0, side), crop_padded(target, y0, x0, side)
        elif train and augment:
            y0, x0, y1, x1 = _crop_around(tight, *m.shape, zoom=(0.4, 1.0))
            x, target = x[:, y0:y1, x0:x1], target[y0:y1, x0:x1]
        if train and augment:
            for axis in (-1, -2):
                if torch.rand(()) < 0.5:
                    x, target = x.flip(axis), target.flip(axis)
            contrast, brightness = 1 + 0.2 * (2 * torch.rand(()) - 1), 0.1 * (2 * torch.rand(()) - 1)
            x = ((x - x.mean()) * contrast + x.mean() + brightness).clamp(0, 1)
        box = box_from_mask(target.numpy(), jitter if train else 0.0, random.Random(torch.randint(0, 2**31, ()).item()))
        image = F.interpolate(x[None], size=(img_size, img_size), mode="bilinear", antialias=True,
                              align_corners=False)[0].clamp(0, 1)
        out_mask = F.interpolate(target[None, None].float(), size=(img_size, img_size), mode="nearest")[0]
        return {"image": image, "mask": out_mask.long(),
                "box": torch.tensor(_scale_box(box, tuple(target.shape), img_size), dtype=torch.float32)}

    return apply


class PromptTask(HeadWarmup, torch.nn.Module):
    """Box-prompt segmentation task: Dice (sigmoid, MONAI) + binary cross-entropy, as MedSAM trains."""

    def __init__(self, segmenter: torch.nn.Module, dice_weight: float = 1.0, bce_weight: float = 1.0,
                 full: bool = False, head_warmup_steps: int = 0):
        super().__init__()
        self.head_warmup_steps = head_warmup_steps
        from monai.losses import DiceLoss

        self.model = segmenter
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.dice_weight, self.bce_weight, self.full = dice_weight, bce_weight, full

    @property
    def vit(self) -> torch.nn.Module:
        return self.model.encoder.vit

    def param_groups(self, cfg):
        return task_param_groups(self, self.vit, cfg, self.full)

    def warmup_frozen(self) -> list[torch.nn.Parameter]:
        """The image encoder's trainable parameters; the prompt encoder and mask decoder warm up."""
        return vit_trainables(self.vit)

    def forward(self, batch: dict) -> dict:
        """batch["image"] `[B, 3, S, S]`, batch["box"] `[B, 4]`, optional batch["mask"] `[B, 1, S, S]`."""
        logits = self.model(batch["image"], batch["box"])
        out = {"logits": logits}
        if "mask" in batch:
            y = batch["mask"].float()
            out["loss"] = self.dice_weight * self.dice(logits.float(), y) + \
                self.bce_weight * F.binary_cross_entropy_with_logits(logits.float(), y)
            with torch.no_grad():
                p = logits > 0
                out["dice"] = 2 * (p & (y > 0)).sum() / (p.sum() + (y > 0).sum()).clamp_min(1)
        return out

    @torch.no_grad()
    def visualize(self, batch: dict, out: dict):
        """trainer.visualize_every: rows of image | ground truth | prediction, the prompt box outlined on each."""
        return overlay_rows(batch["image"], (batch["mask"] > 0).long(), (out["logits"] > 0).long(), boxes=batch["box"],
                            titles=["image + box", "truth", "prediction"])


def build_prompt_task(recipe: FinetuneRecipe) -> PromptTask:
    seg = tune_segmenter(HEADS.build(recipe.head.type, recipe), recipe.tuning, recipe.lora, recipe.last_k)
    return PromptTask(seg, recipe.head.dice_weight, recipe.head.bce_weight, full=recipe.tuning == "full",
                      head_warmup_steps=recipe.head_warmup_steps)


class BoxPredictor:
    """Masks from boxes on images of any size: `medfound.load("runs/medsam").predict(image, boxes)`.

    The image is resized to the model's input, encoded once, and each box decoded; the logits are resized back to
    the image and thresholded at probability `threshold`.
    """

    def __init__(self, segmenter: torch.nn.Module, img_size: int, mean: Sequence[float], std: Sequence[float],
                 device: str = "cpu", crop_to_box: Optional[float] = None):
        self.model = segmenter.eval().to(device)
        self.img_size, self.device, self.crop_to_box = img_size, device, crop_to_box
        self.normalize = Normalize(mean, std).to(device)

    @torch.no_grad()
    def predict(self, image: Any, boxes: Sequence[Sequence[float]], threshold: float = 0.5,
                return_probs: bool = False) -> np.ndarray:
        """image (PIL, `[H, W]` or `[H, W, 3]` array), boxes `[K, 4]` (x0, y0, x1, y1 in image pixels) -> bool masks
        `[K, H, W]` (or probabilities with `return_probs`)."""
        x = to_image_tensor(image)
        h, w = x.shape[-2:]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if len(boxes) == 0:
            raise ValueError("give at least one box (x0, y0, x1, y1)")
        bad = [b.tolist() for b in boxes if not (0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h)]
        if bad:
            raise ValueError(f"boxes {bad} are not x0 < x1 <= {w}, y0 < y1 <= {h} inside the {w}x{h} image")
        s = self.img_size
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
        if self.crop_to_box is not None:
            probs = np.stack([self._predict_in_window(x, b) for b in boxes])
            return probs if return_probs else probs > threshold
        img = F.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        img = self.normalize(img).to(self.device)
        scaled = torch.tensor([_scale_box(b, (h, w), s) for b in boxes], dtype=torch.float32, device=self.device)
        embedding = self.model.embed(img)
        logits = self.model.decode(embedding, (s, s), scaled)
        probs = torch.sigmoid(F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False))[:, 0]
        probs = probs.cpu().numpy()
        return probs if return_probs else probs > threshold

    def _predict_in_window(self, x: torch.Tensor, box: np.ndarray) -> np.ndarray:
        """crop_to_box models: the window around the box, resized, segmented, pasted back -> probabilities [H, W]."""
        h, w = x.shape[-2:]
        s = self.img_size
        y0, x0, side = box_window(box, self.crop_to_box)
        window = F.interpolate(crop_padded(x, y0, x0, side)[None], size=(s, s), mode="bilinear", antialias=True,
                               align_corners=False)
        local = [box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]
        scaled = torch.tensor([_scale_box(local, (side, side), s)], dtype=torch.float32, device=self.device)
        logits = self.model(self.normalize(window).to(self.device), scaled)
        p = torch.sigmoid(F.interpolate(logits.float(), size=(side, side), mode="bilinear", align_corners=False))[0, 0]
        out = torch.zeros(h, w)
        ys, xs = slice(max(0, y0), min(h, y0 + side)), slice(max(0, x0), min(w, x0 + side))
        out[ys, xs] = p.cpu()[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        return out.numpy()


GREY_MODALITIES = frozenset({"ct", "mr", "cxr", "xray", "mammography", "us", "oct"})  # manifest.MODALITIES
COLOUR_MODALITIES = frozenset({"fundus", "pathology"})


def xywh_to_xyxy(boxes: Sequence[Sequence[float]]) -> list[list[float]]:
    """COCO boxes `[x, y, w, h]` -> `[x0, y0, x1, y1]`."""
    return [[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in boxes]


def read_box_table(table: str | Path, inputs: dict[str, str]) -> dict[str, list[list[float]]]:
    """`--boxes TABLE.csv` (columns input,x0,y0,x1,y1; one row per structure) -> {input index: boxes}, `inputs`
    mapping each input's index to its path as given. A row's `input` is that path or the file's name; a row that
    matches no input, or two inputs, is an error naming the row."""
    import csv

    by_path = {v: k for k, v in inputs.items()}
    by_name: dict[str, list[str]] = {}
    for k, v in inputs.items():
        by_name.setdefault(Path(v).name, []).append(k)
    out: dict[str, list[list[float]]] = {}
    with open(table, newline="") as f:
        reader = csv.DictReader(f)
        need = ["input", "x0", "y0", "x1", "y1"]
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
            raise ValueError(f"{table}: needs the columns {','.join(need)} (it has {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            ref = (row["input"] or "").strip()
            hits = [by_path[ref]] if ref in by_path else by_name.get(Path(ref).name, [])
            if len(hits) != 1:
                raise ValueError(f"{table} row {n}: input {ref!r} " + ("matches no input given" if not hits else
                                 f"matches {len(hits)} inputs by name; give its path as on the command line"))
            try:
                box = [float(row[c]) for c in need[1:]]
            except (TypeError, ValueError):
                raise ValueError(f"{table} row {n}: x0,y0,x1,y1 must be numbers") from None
            out.setdefault(hits[0], []).append(box)
    return out


def modality_warnings(image: Any, trained: Sequence[str], stated: Optional[str] = None) -> list[str]:
    """Warnings when an image does not look like the run's training modalities: the modality the user states
    (`--modality`) is not one of them, or a colour image goes to a run trained only on greyscale modalities (CT,
    MR, X-ray...) or the other way round. The colour test: the mean absolute difference between the channels,
    over 8 (of 255) is a colour image."""
    trained = sorted({m for m in trained if m})
    if not trained:
        return []
    out = []
    if stated is not None and stated not in trained:
        out.append(f"the image is {stated}, but the run was trained on {', '.join(trained)}: its masks are not "
                   "validated for this modality")
    rgb = np.asarray(image, dtype=np.float32)
    colour = rgb.ndim == 3 and rgb.shape[-1] >= 3 and float(np.mean([
        np.abs(rgb[..., 0] - rgb[..., 1]).mean(), np.abs(rgb[..., 1] - rgb[..., 2]).mean()])) > 8.0
    if colour and set(trained) <= GREY_MODALITIES:
        out.append(f"the image is in colour, but the run was trained on greyscale {', '.join(trained)} images: "
                   "check that this is the modality the model was made for")
    elif not colour and set(trained) <= COLOUR_MODALITIES:
        out.append(f"the image is greyscale, but the run was trained on colour {', '.join(trained)} images: check "
                   "that this is the modality the model was made for")
    return out


def mask_warnings(masks: np.ndarray, boxes: Sequence[Sequence[float]], threshold: float,
                  probs: Optional[np.ndarray] = None) -> list[str]:
    """An empty mask, a mask of the whole image, or one that fills its whole box, each named with the fix."""
    out = []
    for i, (m, b) in enumerate(zip(masks, boxes)):
        x0, y0, x1, y1 = (int(round(v)) for v in b)
        inside = m[max(0, y0):y1, max(0, x0):x1]
        peak = f" (highest probability {float(probs[i].max()):.3f})" if probs is not None else ""
        if not m.any():
            out.append(f"box {i} {list(b)}: the mask is empty at --threshold {threshold}{peak}; lower --threshold, "
                       "or check that the box surrounds a structure of the kind the run was trained on")
        elif m.mean() >= 0.999:
            out.append(f"box {i} {list(b)}: the mask covers the whole image; raise --threshold or check the image")
        elif inside.size and inside.mean() >= 0.99:
            out.append(f"box {i} {list(b)}: the mask fills the whole box (a rectangle, not a structure); raise "
                       "--threshold, or check the box (COCO boxes are x, y, w, h: --box-format xywh)")
    return out


def read_image(path: Path):
    """An image file as RGB, or a ValueError naming the file and the fix: a decompression bomb (more pixels than
    PIL.Image.MAX_IMAGE_PIXELS allows) or a file that is not an image never reaches the model as a traceback."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{path}: {e}. If the image is genuine, crop or downsample it first (a box prompt needs the "
                         "region around the structure, not a whole slide)") from None
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image PIL can read (PNG, JPEG, TIFF)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{path} cannot be decoded ({type(e).__name__}: {e}); is it truncated?") from None


def segment_boxes(predictor: "BoxPredictor", image_path: str | Path, boxes: Sequence[Sequence[float]],
                  out: str | Path, threshold: float = 0.5, box_format: str = "xyxy",
                  modalities: Sequence[str] = (), modality: Optional[str] = None) -> tuple[list[Path], list[str]]:
    """`medfound prompt`: one mask PNG (0/255) per box and an overlay of all of them -> (the written paths, the
    warnings: empty or full masks, an image unlike the run's training `modalities`). `predictor`:
    `medfound.load(RUN_DIR)` of a box-prompt run; `box_format`: xyxy (x0,y0,x1,y1) or xywh (COCO)."""
    import io

    from PIL import Image, ImageDraw

    image_path, out = Path(image_path), Path(out)
    if not image_path.is_file():
        raise FileNotFoundError(f"image {image_path} not found")
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"--box {','.join(map(str, b))}: give four numbers x0,y0,x1,y1 (or x,y,w,h with "
                             "--box-format xywh)")
    if box_format not in ("xyxy", "xywh"):
        raise ValueError(f"--box-format {box_format}: choose xyxy (x0,y0,x1,y1) or xywh (COCO x,y,w,h)")
    if box_format == "xywh":
        boxes = xywh_to_xyxy(boxes)
    image = read_image(image_path)
    try:
        probs = predictor.predict(image, boxes, return_probs=True)
    except ValueError as e:
        if box_format == "xyxy" and "are not x0 < x1" in str(e):
            raise ValueError(f"{e}; COCO boxes are x, y, w, h: pass --box-format xywh") from None
        raise
    masks = probs > threshold
    warnings = modality_warnings(image, modalities, modality) + mask_warnings(masks, boxes, threshold, probs)
    colours = [(255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (255, 120, 255), (255, 150, 60)]
    overlay = np.asarray(image, dtype=np.float64).copy()
    written = []

    def png(img: Image.Image, path: Path) -> None:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        written.append(path)

    for i, m in enumerate(masks):
        png(Image.fromarray((m * 255).astype(np.uint8)), out / f"mask_{i}.png")
        overlay[m] = 0.5 * overlay[m] + 0.5 * np.array(colours[i % len(colours)])
    canvas = Image.fromarray(overlay.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for i, b in enumerate(boxes):
        draw.rectangle(list(b), outline=colours[i % len(colours)], width=2)
    png(canvas, out / "overlay.png")
    return written, warnings

"""`RUN_DIR/report/report.md`: the evaluation written up for a reader, with PNG plots, from eval.json.

Every number in the report is read from the eval.json dict it is given (formatted by `fmt` / `fmt_interval`, the
same helpers the model card uses), so the report cannot say something eval.json does not. Plots:
- roc.png: ROC curves (binary: the positive class; multi-class: one-vs-rest per class; multi-label: per finding)
  with a 95% bootstrap band (vertical averaging: TPR at fixed FPRs over resamples stratified by class), and one
  curve per external set;
- reliability.png: the calibration bins of eval.json (observed vs predicted, with the counts below);
- confusion.png: single-label confusion matrix (counts, coloured by the row share);
- overlay_<set>_<i>.png: segmentation, the first images of each set with truth (green) and prediction (red), and
  the filled error map; kept and drawn at most 1024 px a side (`overlay_picture`), so memory does not grow with the
  images' size;
- MIL: the attention heatmaps of RUN_DIR/heatmaps are linked.
The folder is replaced atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from medfound.data.fractions import describe
from medfound.io import atomic_dir

ORDER = ["auroc", "auprc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "sens_at_spec",
         "kappa_quadratic", "label_accuracy", "ece", "dice", "hd95", "pixel_f1", "pixel_auc", "pixel_sensitivity",
         "pixel_specificity", "pixel_accuracy"]
BAND_RESAMPLES = 200


def fmt(v: Any) -> str:
    """A metric value as cards and reports print it (4 decimals; n/a for undefined)."""
    return "n/a" if v is None else f"{float(v):.4f}"


def fmt_signed(v: Any) -> str:
    return "n/a" if v is None else f"{float(v):+.4f}"


def fmt_interval(iv: Optional[list[float]]) -> str:
    return "—" if not iv else f"{iv[0]:.4f} – {iv[1]:.4f}"


def ordered(metrics: dict[str, Any]) -> list[str]:
    """Metric names in reading order (known ones first, then the rest as they come)."""
    return [k for k in ORDER if k in metrics] + [k for k in metrics if k not in ORDER]


def headline(report: dict[str, Any]) -> list[str]:
    """The metrics shown in per-site and external tables, chosen by what the report scored (Dice: a segmenting
    kind; else class probabilities), so a new task kind needs no entry here."""
    if "dice" in report["metrics"]:
        keys = [k for k in ("dice", "hd95") if k in report["metrics"]]
        if "pixel_f1" in (report.get("intervals") or {}):  # pooled pixel metrics with intervals (binary tasks)
            keys += [k for k in ("pixel_f1", "pixel_auc", "pixel_sensitivity", "pixel_specificity")
                     if k in report["metrics"]]
        return keys
    keys = ["auroc", "auprc", "accuracy", "balanced_accuracy", "sens_at_spec", "kappa_quadratic", "ece"]
    return [k for k in keys if k in report["metrics"]]


TOO_FEW = "too few samples for an interval"


def metrics_table(metrics: dict[str, Any], intervals: Optional[dict[str, Any]], too_few: bool = False) -> list[str]:
    rows = ["| metric | value | 95% CI |", "|---|---|---|"]
    for k in ordered(metrics):
        if isinstance(metrics[k], (int, float)) or metrics[k] is None:
            ci = TOO_FEW if too_few else fmt_interval((intervals or {}).get(k))
            rows.append(f"| {k} | {fmt(metrics[k])} | {ci} |")
    return rows


def site_table(by_site: dict[str, Any], keys: list[str]) -> list[str]:
    rows = ["| site | n | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for site, r in by_site.items():
        cells = [f"{fmt(r.get(k))} ({TOO_FEW})" if r.get("too_few") else
                 f"{fmt(r.get(k))} ({fmt_interval(r.get('intervals', {}).get(k))})" if r.get("intervals")
                 else fmt(r.get(k)) for k in keys]
        rows.append(f"| {site} | {r['n']} | " + " | ".join(cells) + " |")
    return rows


def external_table(report: dict[str, Any], keys: list[str]) -> list[str]:
    rows = ["| set | n | metric | value (95% CI) | drop vs internal (95% CI) |", "|---|---|---|---|---|"]
    internal = report["metrics"]
    for k in keys:
        ci = TOO_FEW if (report.get("bootstrap") or {}).get("too_few") else \
            fmt_interval(report.get("intervals", {}).get(k))
        rows.append(f"| internal: {report['dataset']['name']} / {report['dataset']['split']} | "
                    f"{report['dataset']['num_samples']} | {k} | {fmt(internal.get(k))} ({ci}) | — |")
    for e in report.get("external", []):
        for k in keys:
            ci, dci = (TOO_FEW, TOO_FEW) if e.get("too_few") else (fmt_interval(e.get("intervals", {}).get(k)),
                                                                  fmt_interval(e.get("drop_intervals", {}).get(k)))
            label = f"external: {e['name']}" + (" (the training set, not external)" if e.get("same_as_training")
                                                 else "")
            rows.append(f"| {label} | {e['num_samples']} | {k} | {fmt(e['metrics'].get(k))} "
                        f"({ci}) | {fmt_signed(e['drop'].get(k))} ({dci}) |")
    return rows


def external_notes(e: dict[str, Any], keys: list[str]) -> list[str]:
    """Beside an external set's rows: its scale warnings, the evaluate-time overrides it was scored with, and its
    per-site table (an external archive often pools several hospitals)."""
    notes = [f"⚠ {w}" for w in e.get("warnings", [])]
    if e.get("inference_overrides"):
        notes.append("scored with " + ", ".join(f"`{k}={v}`" for k, v in e["inference_overrides"].items())
                     + " (an evaluate override, this set only; the internal split is scored as trained)")
    auto = e.get("auto_scale")
    if auto and auto.get("pool", "image") in ("set", "site"):
        own, per = auto["image_readings"], "per site, the median" if auto["pool"] == "site" else "the median"
        notes.append(f"`segment.scale=auto` resized its images by {auto['min']:.3g}-{auto['max']:.3g}x: {per}"
                     f" of the images' own readings ({own['min']:.3g}-{own['max']:.3g}x, median "
                     f"{own['median']:.3g}x), each reading the factor that gives the image's structures where the "
                     f"model finds them the training images' calibre, {auto['target_calibre_px']:.3g} px (per image: "
                     "predictions.csv)")
    elif auto:
        notes.append(f"`segment.scale=auto` resized its images by {auto['min']:.3g}-{auto['max']:.3g}x (median "
                     f"{auto['median']:.3g}x), each so that the image's structures where the model finds them have "
                     f"the training images' calibre, {auto['target_calibre_px']:.3g} px (per image: predictions.csv)")
    lines = [f"**{e['name']}**", "", *[f"- {n}" for n in notes], ""] if notes else []
    if e.get("by_site"):
        lines += [f"Per site of {e['name']}:", "", *site_table(e["by_site"], keys), ""]
    return lines


def per_class_table(per_class: dict[str, Any]) -> list[str]:
    first = next(iter(per_class.values()))
    cols = [k for k in first if k != "n"]
    rows = ["| class | " + ("n | " if "n" in first else "") + " | ".join(cols) + " |",
            "|---|" + ("---|" if "n" in first else "") + "---|" * len(cols)]
    for name, pc in per_class.items():
        cells = [str(pc[c]) if isinstance(pc.get(c), int) else fmt(pc.get(c)) for c in cols]
        rows.append(f"| {name} | " + (f"{pc['n']} | " if "n" in first else "") + " | ".join(cells) + " |")
    return rows


def evaluation_sections(report: dict[str, Any], level: str = "##", external_notes_too: bool = False) -> list[str]:
    """The evaluation as Markdown: metrics with intervals, per class, per site, external sets, units. Used by
    report.md and the model card; `medfound card check` re-renders it from eval.json and compares.
    `external_notes_too` (report.md): each external set's warnings, overrides, auto factors and per-site table
    beside it; a card leaves them out, so cards published by earlier versions still check against their eval.json."""
    boot = report.get("bootstrap")
    too_few = bool(boot and boot.get("too_few"))
    lines = [f"{level} Metrics", "", *metrics_table(report["metrics"], report.get("intervals"), too_few), ""]
    lines.append(f"Intervals: {boot['method']}, {boot['resamples']} resamples, seed {boot['seed']}, level "
                 f"{boot['level']}." if boot else "No intervals (eval.bootstrap = 0).")
    if too_few:
        lines.append(f"No interval is shown: {boot['too_few']}.")
    if any(r.get("too_few") for r in (report.get("by_site") or {}).values()):
        lines.append("Sites whose smallest class has fewer than eval.min_per_class samples show no interval.")
    if report.get("train_labels"):
        lines.append(f"Trained on {describe(report['train_labels'])}.")
    if (report.get("selection") or {}).get("policy") == "fixed steps":
        lines.append(f"Model selection: none; the export is the last step ({report['selection']['trained_steps']}), "
                     "fixed in advance (no eval.every).")
    elif report.get("selection"):
        sel = report["selection"]
        on = f" ({sel['samples']:,} of its {sel['of_samples']:,} samples, the training fraction)" \
            if sel.get("samples") is not None else ""
        lines.append(f"Model selection: the export is step {sel['selected_step']} of {sel['trained_steps']}, the best "
                     f"{sel['metric']} on split '{sel['split']}'{on} ({fmt(sel['value'])}; scored every "
                     f"{sel['every']} steps, {len(sel['scored_steps'])} times). The metrics above were computed once, "
                     "on that export.")
        if len(sel["scored_steps"]) > 1 and sel.get("tied") == len(sel["scored_steps"]):
            lines.append(f"Every look scored the same {sel['metric']} on the validation samples, so selection could "
                         "not choose (the earliest step is exported): the validation subset is too small for this "
                         "metric; fix the steps in advance (drop eval.every) or validate on more samples.")
    if report.get("operating_point"):
        op = report["operating_point"]
        lines.append(f"sens_at_spec is read at specificity >= {op['specificity_target']:.2f} "
                     f"(threshold {op['threshold']:.4f} on the positive probability)."
                     + (f" Positive class: {report['positive_class']}." if report.get("positive_class") else ""))
    lines.append("")
    if report.get("per_class"):
        lines += [f"{level} Per class", "", *per_class_table(report["per_class"]), ""]
    if report.get("by_site"):
        lines += [f"{level} Per site", "", "Value (95% CI) per site of the evaluated split.", "",
                  *site_table(report["by_site"], headline(report)), ""]
    if report.get("external"):
        lines += [f"{level} External validation", "",
                  "Each external set beside the internal test split; drop = external - internal, its interval "
                  "from the two independent bootstraps paired resample by resample.", "",
                  *external_table(report, headline(report)), ""]
        for e in report["external"] if external_notes_too else []:  # report.md; a card keeps its published text
            lines += external_notes(e, headline(report))
    if report.get("units"):
        u = report["units"]
        lines += [f"{level} Per unit ({' + '.join(u['by'])}, {u['reduce']} of {u['images']} images -> {u['n']})", "",
                  *metrics_table(u["metrics"], None), ""]
    return lines


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_band(scores: np.ndarray, y: np.ndarray, resamples: int, seed: int, grid: np.ndarray
             ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """TPR at the FPRs of `grid`, and its 2.5/97.5 percentiles over class-stratified resamples (or None)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, scores)
    mid = np.interp(grid, fpr, tpr)
    if resamples <= 0:
        return mid, None, None
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    curves = []
    for _ in range(resamples):
        idx = np.concatenate([pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]])
        f, t, _ = roc_curve(y[idx], scores[idx])
        curves.append(np.interp(grid, f, t))
    curves = np.array(curves)
    return mid, np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)


def plot_roc(path: Path, report: dict[str, Any], predictions: list[tuple], seed: int) -> bool:
    plt = _plt()
    names = report["class_names"]
    multilabel = report.get("label_type") == "multilabel"
    grid = np.linspace(0, 1, 101)
    resamples = min(BAND_RESAMPLES, report.get("bootstrap", {}).get("resamples", 0))
    fig, ax = plt.subplots(figsize=(5.5, 5))
    drawn = False
    for s, (set_name, probs, labels, _, _) in enumerate(predictions):
        positive = names.index(report["positive_class"]) if report.get("positive_class") in names else 1
        columns = [positive] if len(names) == 2 and not multilabel else range(len(names))
        for c in columns:
            y = (labels[:, c] > 0.5).astype(int) if multilabel else (labels == c).astype(int)
            if y.min() == y.max():
                continue
            mid, lo, hi = roc_band(probs[:, c], y, resamples, seed, grid)
            label = (names[c] if len(columns) > 1 else "") + (f" ({set_name})" if len(predictions) > 1 else "")
            line = ax.plot(grid, mid, lw=1.5, ls="-" if s == 0 else "--", label=label.strip() or None)[0]
            if lo is not None:
                ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)", xlim=(0, 1), ylim=(0, 1.01),
           title="ROC" + (" with 95% bootstrap bands" if resamples else ""))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_reliability(path: Path, calibration: dict[str, Any]) -> None:
    plt = _plt()
    bins = calibration["bins"]
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 5.5), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = bins[0]["hi"] - bins[0]["lo"] if bins else 0.066
    ax.bar(centres, [b["observed"] for b in bins], width=width * 0.9, color="#4878d0", label="observed")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], "o", color="#d65f5f", ms=4,
            label="mean predicted")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
    ax.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1),
           title=f"Reliability ({calibration['kind']}); ECE {calibration['ece']:.4f}")
    ax.legend(fontsize=7, loc="upper left")
    axn.bar(centres, [b["n"] for b in bins], width=width * 0.9, color="grey")
    axn.set(xlabel="predicted probability", ylabel="samples")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(path: Path, names: list[str], probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    plt = _plt()
    cm = confusion_matrix(labels, probs.argmax(1), labels=list(range(len(names))))
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(names), 1.0 + 0.7 * len(names)))
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (counts)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return cm


OVERLAY_SIDE = 1024  # the longest side an overlay is kept and drawn at (its panels print about 400 px wide)


def _slice2d(image: np.ndarray, truth: np.ndarray, pred: np.ndarray):
    """[C, *S] image and [*S] masks -> a 2-D view (3-D: the slice along the last axis with the most truth)."""
    if truth.ndim == 3:
        z = int(np.argmax((truth > 0).reshape(-1, truth.shape[-1]).sum(0)))
        return image[..., z], truth[..., z], pred[..., z]
    return image, truth, pred


def _blocks(a: np.ndarray, k: int, pad_mode: str) -> np.ndarray:
    """`[H, W, ...]` -> `[H/k, k, W/k, k, ...]` (padded to whole blocks)."""
    h, w = a.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        a = np.pad(a, [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2), mode=pad_mode)
    return a.reshape(a.shape[0] // k, k, a.shape[1] // k, k, *a.shape[2:])


def reduce_labels(mask: np.ndarray, k: int) -> np.ndarray:
    """A label map shrunk k times: each k x k block takes the foreground label with most pixels in it, background
    only where the block has no foreground (a 1-px vessel stays visible; a block is never given a label none of its
    pixels has)."""
    if k == 1:
        return mask
    blocks = _blocks(mask, k, "constant")
    labels = [c for c in np.unique(mask) if c != 0]
    out = np.zeros(blocks.shape[::2], mask.dtype)
    best = np.zeros(out.shape, np.int64)
    for c in labels:
        n = (blocks == c).sum(axis=(1, 3))
        out[n > best] = c
        best = np.maximum(best, n)
    return out


def overlay_picture(key: str, image: np.ndarray, truth: np.ndarray, pred: np.ndarray, dice: dict[str, float],
                    side: int = OVERLAY_SIDE) -> dict[str, Any]:
    """What report.md keeps of a segmented image to draw later: a 2-D view (a volume's slice with the most truth),
    the image as display uint8 (1-99 percentile window; RGB or gray) and both masks as small integers, shrunk by a
    whole factor to at most `side` px (image: block means; masks: `reduce_labels`). A 3390x3504 image is kept in
    3.4 MB instead of 330 MB (float32 image, int64 masks)."""
    image, truth, pred = _slice2d(np.asarray(image), np.asarray(truth), np.asarray(pred))
    img = np.moveaxis(image, 0, -1) if image.shape[0] == 3 else image.mean(0)
    k = max(1, -(-max(truth.shape) // side))
    dtype = np.uint8 if max(int(truth.max(initial=0)), int(pred.max(initial=0))) < 256 else np.int32
    if k > 1:
        img = _blocks(img.astype(np.float32), k, "edge").mean(axis=(1, 3))
    lo, hi = np.percentile(img, [1, 99])
    img = (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)
    return {"key": key, "image": img, "truth": reduce_labels(truth.astype(dtype), k),
            "pred": reduce_labels(pred.astype(dtype), k), "dice": dice, "shrunk": k}


ERROR_COLOURS = {"tp": (0, 200, 0), "fp": (230, 0, 0), "fn": (30, 90, 255)}  # filled: found, extra, missed


def error_map(truth: np.ndarray, pred: np.ndarray, gray: Optional[np.ndarray] = None) -> np.ndarray:
    """RGB uint8 `[H, W, 3]`: foreground found (TP) green, predicted where there is none (FP) red, missed (FN) blue,
    filled, over the dimmed image `gray` (in [0, 1]) elsewhere. Filled, so a structure found only at its edges
    shows its missed core at once (an outline drawing looks the same whether it is found or hollow)."""
    t, p = truth > 0, pred > 0
    base = (0.45 * (gray if gray is not None else np.zeros(t.shape)) * 255).astype(np.uint8)
    out = np.repeat(base[..., None], 3, axis=2)
    for name, where in (("tp", t & p), ("fp", p & ~t), ("fn", t & ~p)):
        out[where] = ERROR_COLOURS[name]
    return out


def plot_overlay(path: Path, item: dict[str, Any]) -> None:
    """Draw an `overlay_picture`: truth and prediction outlined on the image, and the filled error map."""
    plt = _plt()
    img, truth, pred = item["image"].astype(np.float32) / 255, item["truth"], item["pred"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    for ax, mask, colour, title in ((axes[0], truth, "lime", "truth"), (axes[1], pred, "red", "prediction")):
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray")
        for c in np.unique(mask[mask > 0]):
            ax.contour(mask == c, levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_axis_off()
        ax.set_title(title, fontsize=9)
    axes[2].imshow(error_map(truth, pred, img.mean(-1) if img.ndim == 3 else img))
    axes[2].set_axis_off()
    axes[2].set_title("found (green), extra (red), missed (blue)", fontsize=9)
    dice = ", ".join(f"{k.split('/', 1)[1]} {fmt(v)}" for k, v in item.get("dice", {}).items())
    shrunk = f" (drawn at 1/{item['shrunk']} of its size)" if item.get("shrunk", 1) > 1 else ""
    fig.suptitle(f"{item['key']}: Dice {dice}{shrunk}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run_dir: Path, report: dict[str, Any], predictions: Optional[list[tuple]] = None,
                 overlays: Optional[dict[str, list[dict]]] = None) -> Path:
    """Write RUN_DIR/report/ (report.md + PNGs) from eval.json's dict and the in-memory predictions."""
    run_dir = Path(run_dir)
    ds = report["dataset"]
    export = Path(report["model"]["export"])  # the model's name: its run (RUN/export) or its published folder
    lines = [f"# Evaluation report: {export.parent.name if export.name == 'export' else export.name}", "",
             f"- model: `{report['model']['export']}` (sha256 `{report['model']['sha256'][:16]}…`)",
             f"- data: **{ds['name']}**, split `{ds['split']}`, {ds['num_samples']} "
             f"{ds.get('unit', 'image')}{'s' if ds['num_samples'] != 1 else ''}, manifest digest `{ds['manifest_digest'][:16]}…`",
             f"- task: {report['task']}" + (f" ({report['label_type']})" if report.get("label_type") else ""),
             f"- created {report['created']} by medfound {report['medfound_version']}; numbers from `eval.json`", ""]
    seed = report.get("bootstrap", {}).get("seed", 0)
    with atomic_dir(run_dir / "report", overwrite=True) as tmp:
        plots: list[tuple[str, str]] = []
        if predictions:  # class probabilities (the kinds that score them pass them)
            if plot_roc(tmp / "roc.png", report, predictions, seed):
                plots.append(("ROC", "roc.png"))
            if report.get("label_type") != "multilabel":
                plot_confusion(tmp / "confusion.png", report["class_names"], predictions[0][1], predictions[0][2])
                plots.append(("Confusion matrix", "confusion.png"))
        if report.get("calibration", {}).get("bins"):
            plot_reliability(tmp / "reliability.png", report["calibration"])
            plots.append(("Reliability diagram", "reliability.png"))
        for set_name, items in (overlays or {}).items():
            for i, item in enumerate(items):
                name = f"overlay_{_safe(set_name)}_{i}.png"
                plot_overlay(tmp / name, item)
                plots.append((f"{set_name}: {item['key']}", name))
        lines += evaluation_sections(report, level="##", external_notes_too=True)
        if plots:
            lines += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in plots]
        if report.get("heatmaps"):
            maps = sorted((run_dir / report["heatmaps"]).glob("*.png"))[:8]
            lines += ["## Attention heatmaps", ""] + [f"![{p.stem}](../heatmaps/{p.name})" for p in maps] + [""]
        if report.get("warnings"):
            lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
        if report.get("definitions"):
            lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in report["definitions"].items()] + [""]
        (tmp / "report.md").write_text("\n".join(lines))
    return run_dir / "report" / "report.md"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)

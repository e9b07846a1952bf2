"""The one evaluation procedure every task kind goes through; a kind brings only its scorer.

    internal split -> score -> each external set -> score, drop against the internal one, scale check ->
    one eval.json -> predictions.csv -> report/

A `Scorer` (one per task kind, returned by its `TaskSpec.scorer`) knows how to run its model over one set and what
its eval.json fields are; this module owns the order, the external-set blocks (`records.external_block`), the scale
check, the tail every record carries (`records.record_tail`) and the one place eval.json is written. `eval.every`
selection, `predict` and `medfound bench` call the same per-kind inference the scorers call (`score_loader`,
`score_boxes`, `score_bags`, `report.predict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medfound.data.manifest import read_manifest
from medfound.data.scale import SCALE_TOLERANCE, scale_stats, scale_warnings
from medfound.evaluate.markdown import write_report
from medfound.evaluate.records import external_block, network_lineage, record_tail, trained_on
from medfound.io import atomic_write_json, sha256_file


@dataclass
class ScoredSet:
    """One scored set: the internal split (`name` "internal") or an external set (its manifest's name).
    `result`: at least "metrics", and "bootstrap" (with "values" when an external drop needs them); `rows`: what the
    kind's predictions writer reads; `pictures`: what report.md shows (overlays), by the kind's own format."""

    name: str
    path: str
    splits: list[str]
    n: int
    result: dict[str, Any]
    by_site: dict[str, Any] = field(default_factory=dict)
    digests: tuple = ()
    dataset: Optional[dict[str, Any]] = None  # eval.json's `dataset` block (the internal split)
    rows: Any = None
    pictures: Any = None
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


class Scorer:
    """A task kind's part of evaluation. Subclasses implement `score`; the other hooks default to a
    kind with nothing more to say. `scale`: the scale keys its preprocessing evens out (medfound.data.scale), or None
    where the kind's records carry no scale (then no scale check runs)."""

    scale: Optional[tuple[str, ...]] = None
    scale_targets: dict[str, float] = {}  # what every image is resampled to (segmentation: a FOV diameter, um/px)

    def __init__(self, recipe: Any, export: Path, weights: Path) -> None:
        self.recipe, self.export, self.weights = recipe, Path(export), Path(weights)
        self.task = recipe.task  # the kind's one name (eval.json `task`), from the recipe's head

    def check(self, internal: str, split: str, externals: list[str]) -> None:
        """Refuse, before anything is scored, a set that cannot be scored (a missing mask member, no spacing)."""

    def score(self, where: str, split: Optional[str], external: bool, keep_values: bool) -> ScoredSet:
        """Run the model over `split` of the set at `where` (None: every split, as for an external site) and score
        it; `keep_values`: keep the bootstrap resamples (an external drop's interval needs them)."""
        raise NotImplementedError

    def header(self, internal: ScoredSet) -> dict[str, Any]:
        """eval.json fields after `task` (label type, class names)."""
        return {}

    def model_fields(self) -> dict[str, Any]:
        """More fields of eval.json's `model` block (the head, the bag backbone)."""
        return {}

    def body(self, internal: ScoredSet) -> dict[str, Any]:
        """eval.json's fields of the internal split's scores."""
        return {"metrics": internal.result["metrics"]}

    def external_fields(self, scored: ScoredSet) -> dict[str, Any]:
        """More fields of an external set's entry (per class, calibration, per structure)."""
        return {}

    def write_predictions(self, path: Path, sets: list[ScoredSet]) -> None:
        """predictions.csv of every scored set (None rows: the kind writes none)."""

    def report_inputs(self, sets: list[ScoredSet]) -> dict[str, Any]:
        """Keyword arguments of `markdown.write_report` beyond the record (predictions, overlays)."""
        return {}


def evaluate_with(scorer: Scorer, split: str, out: Path) -> dict[str, Any]:
    """Score the internal `split` and every eval.external set with `scorer`, write `out`/eval.json, predictions.csv
    and report/ (eval.report), and return the record."""
    recipe = scorer.recipe
    ev, internal_set = recipe.eval, str(recipe.data.shards[0])
    externals_at = [str(e) for e in ev.external]
    scorer.check(internal_set, split, externals_at)
    lineage = network_lineage(scorer.export)
    trained = trained_on(lineage)
    expected = lineage.get("scale") if scorer.scale is not None else None  # the training data's scale
    # the scale check reads only the manifests and sample metadata: it speaks (or, eval.strict_scale, stops)
    # before anything is scored, not after hours of inference
    checked = {where: scale_check(where, expected, scorer.scale, ev.strict_scale, scorer.scale_targets)
               for where in externals_at} if expected else {}
    start = time.time()
    internal = scorer.score(internal_set, split, external=False, keep_values=bool(externals_at))
    sets, externals = [internal], []
    for where in externals_at:
        scored = scorer.score(where, ev.external_split, external=True, keep_values=True)
        entry = external_block(scored.name, where, scored.splits, scored.n, scored.result, scored.by_site,
                               internal.result, scored.digests, trained)
        entry.update(scorer.external_fields(scored))
        if where in checked:
            entry["scale"] = checked[where]["scale"]
            if checked[where]["warnings"]:
                entry.setdefault("warnings", []).extend(checked[where]["warnings"])
        sets.append(scored)
        externals.append(entry)
    warnings = [w for s in sets for w in s.warnings]
    report = {
        "task": scorer.task,
        **scorer.header(internal),
        "dataset": internal.dataset,
        "model": {"export": str(scorer.export), "sha256": sha256_file(scorer.weights), **scorer.model_fields()},
        **({"scale": expected} if expected else {}),
        **scorer.body(internal),
        **({"external": externals} if externals else {}),
        **record_tail(warnings, internal.skipped, start, externals, lineage),
    }
    out = Path(out)
    scorer.write_predictions(out / "predictions.csv", sets)
    atomic_write_json(out / "eval.json", report)
    if ev.report:
        write_report(out, report, **scorer.report_inputs(sets))
    return report


def scale_check(where: str, expected: dict[str, Any], normalised: tuple[str, ...], strict: bool = False,
                targets: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """An external set's scale beside the training data's (eval.json `scale`), from its manifest and sample
    metadata only (`targets`: what the run resamples every image to, e.g. {"fov_diameter_px": 540}, after which the
    masks' structure size is compared too); each difference beyond medfound.data.scale.SCALE_TOLERANCE is printed
    at once as one line
    (stderr) and returned for eval.json, report.md and the card; `strict` (eval.strict_scale, `--strict-scale`)
    raises instead, before any scoring."""
    import sys

    stats = scale_stats(where)
    name = read_manifest(where).name
    found = scale_warnings(name, stats, expected, normalised) + residual_warnings(name, stats, expected, targets or {})
    if found and strict:
        raise ValueError("; ".join(found) + " (eval.strict_scale: nothing was scored; drop --strict-scale to score "
                                            "it anyway with this warning)")
    for w in found:
        print(f"medfound evaluate: warning: {w}", file=sys.stderr, flush=True)
    return {"scale": stats, "warnings": found}


# how a physical scale key's target resizes an image whose value is v: by target / v (a FOV diameter in px) or by
# v / target (um/px, mm/px)
_RESIZE = {"fov_diameter_px": lambda v, t: t / v, "mpp": lambda v, t: v / t, "spacing_mm": lambda v, t: v / t}


def residual_warnings(name: str, stats: dict[str, Any], expected: dict[str, Any], targets: dict[str, float]
                      ) -> list[str]:
    """After the run's normalisation (a FOV diameter, um/px or spacing each image is resampled to), the labelled
    structures of both sets should be equally thick; a residual beyond SCALE_TOLERANCE means the normalised
    quantity is not the scale the network learned (fundus cameras whose vessels are traced thinner at the same
    FOV), named with the segment.scale that matches the structure size instead."""

    out = []
    for key, target in targets.items():
        if not target or key not in _RESIZE or not all(key in d and d.get("structure_px") for d in (stats, expected)):
            continue
        ext = stats["structure_px"] * _RESIZE[key](stats[key], target)
        trained = expected["structure_px"] * _RESIZE[key](expected[key], target)
        ratio = ext / trained
        if max(ratio, 1 / ratio) > SCALE_TOLERANCE:
            out.append(f"external set {name}: after resampling to {key.removesuffix('_px')} {target:g}, its labelled "
                       f"structures are {ext:.3g} px thick, the training data's {trained:.3g} px ({ratio:.2f}x, "
                       f"beyond the {SCALE_TOLERANCE}x tolerance): {key.removesuffix('_px')} is not the scale this "
                       f"model learned here; score it with `segment.scale={trained / stats['structure_px']:.3g}` "
                       "(structure size matched) instead")
    return out

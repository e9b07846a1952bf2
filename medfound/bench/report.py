"""What `medfound bench` writes: results.csv (long format), results.json, paired.csv, leaderboard.md and one
label-efficiency plot per task."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from medfound.io import atomic_write_bytes, atomic_write_json, atomic_write_text

RESULT_COLUMNS = ["task", "backbone", "protocol", "setting", "fraction", "shots", "seed", "metric", "value", "low",
                  "high", "n_train", "degenerate", "notes"]
PAIRED_COLUMNS = ["task", "protocol", "setting", "seed", "metric", "a", "b", "diff", "low", "high", "p"]


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else json.dumps(r[k], sort_keys=True) if isinstance(r.get(k), dict)
                        else r.get(k)) for k in columns})
    return buf.getvalue().encode()


def _cell(r: dict[str, Any]) -> str:
    if r["value"] is None:
        return "n/a"
    text = f"{r['value']:.3f}"
    if r["low"] is not None:
        text += f" [{r['low']:.3f}, {r['high']:.3f}]"
    return text + (" ⚠" if r.get("degenerate") else "")


def leaderboard(results: list[dict[str, Any]], paired: list[dict[str, Any]], suite: Any) -> str:
    """Markdown: per task, a table of backbone x protocol by fraction (and by shots), then the paired differences."""
    lines = [f"# Benchmark: suite {suite.name}", "",
             f"Metric per task on its test split with 95% intervals (BCa bootstrap, {suite.bootstrap} resamples, "
             f"seed {suite.bootstrap_seed}; few-shot: mean and 2.5-97.5 percentiles over draws). Seeds "
             f"{suite.seeds}. ⚠ marks a degenerate probe (it predicts one class for every test sample).", ""]
    for task in dict.fromkeys(r["task"] for r in results):
        rows = [r for r in results if r["task"] == task]
        metric = rows[0]["metric"]
        lines += [f"## {task} ({metric})", ""]
        for kind, key in (("fraction", "fraction"), ("shots", "shots")):
            these = [r for r in rows if r[key] is not None]
            if not these:
                continue
            cols = sorted({r[key] for r in these})
            head = [f"{c:g}" if kind == "fraction" else f"{c}-shot" for c in cols]
            lines += ["| backbone | protocol | seed | " + " | ".join(head) + " |",
                      "|---|---|---|" + "---|" * len(cols)]
            for b, p, s in dict.fromkeys((r["backbone"], r["protocol"], r["seed"]) for r in these):
                cells = []
                for c in cols:
                    hit = [r for r in these if (r["backbone"], r["protocol"], r["seed"], r[key]) == (b, p, s, c)]
                    cells.append(_cell(hit[0]) if hit else "—")
                lines.append(f"| {b} | {p} | {s} | " + " | ".join(cells) + " |")
            lines.append("")
        fixed = [r for r in rows if (r.get("notes") or {}).get("fixed_steps_because")]
        if fixed:  # selection was asked for but the fraction's validation subset could not rank steps
            lines += ["Trained for steps fixed in advance, no selection (too few validation samples to rank steps):",
                      ""] + [f"- {r['backbone']} / {r['protocol']} at {r['setting']}, seed {r['seed']}: "
                             f"{r['notes']['fixed_steps_because']}" for r in fixed] + [""]
        pairs = [q for q in paired if q["task"] == task]
        if pairs:
            lines += ["Paired differences on the same test samples (A - B, 95% interval, two-sided bootstrap p):", "",
                      "| protocol | setting | seed | A | B | A - B | interval | p |", "|---|---|---|---|---|---|---|---|"]
            for q in pairs:
                interval = "—" if q["low"] is None else f"[{q['low']:+.3f}, {q['high']:+.3f}]"
                lines.append(f"| {q['protocol']} | {q['setting']} | {q['seed']} | {q['a']} | {q['b']} | "
                             f"{q['diff']:+.3f} | {interval} | {'—' if q['p'] is None else q['p']} |")
            lines.append("")
        lines += [f"![label efficiency]({task}_label_efficiency.png)", ""]
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], task: str, path: Path) -> bool:
    """The task's metric against the label fraction (log scale), a line per backbone x protocol, intervals shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["task"] == task and r["fraction"] is not None and r["value"] is not None]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for b, p in dict.fromkeys((r["backbone"], r["protocol"]) for r in rows):
        pts = sorted((r["fraction"], r["value"], r["low"], r["high"]) for r in rows
                     if (r["backbone"], r["protocol"]) == (b, p) and r["seed"] == rows[0]["seed"])
        xs = [x[0] for x in pts]
        ax.plot(xs, [x[1] for x in pts], marker="o", label=f"{b} / {p}")
        if all(x[2] is not None for x in pts):
            ax.fill_between(xs, [x[2] for x in pts], [x[3] for x in pts], alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel(rows[0]["metric"])
    ax.set_title(f"{task}: label efficiency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


def write_all(out: Path, results: list[dict[str, Any]], paired_rows: list[dict[str, Any]], suite: Any,
              record: dict[str, Any]) -> list[Path]:
    """Every output file; returns their paths (the CLI lists them)."""
    written = [out / "results.csv", out / "results.json", out / "paired.csv", out / "leaderboard.md"]
    atomic_write_bytes(written[0], _csv(results, RESULT_COLUMNS))
    atomic_write_json(written[1], {**record, "results": results, "paired": paired_rows})
    atomic_write_bytes(written[2], _csv(paired_rows, PAIRED_COLUMNS))
    atomic_write_text(written[3], leaderboard(results, paired_rows, suite))
    for task in dict.fromkeys(r["task"] for r in results):
        path = out / f"{task}_label_efficiency.png"
        if plot(results, task, path):
            written.append(path)
    return written

r"""`medfound card check DIR`: prove a published folder's card still says what its files say.

Checked:
- every `| weights | \`FILE\`, sha256 \`HEX\` |` row of the card against the sha256 of FILE in the folder, and
  likewise every `| config |` and `| adapter |` row (config.json / the network's json, each LoRA adapter file), and
  that every adapter file in the folder has a row (a swapped or added adapter file is caught);
- the label names of config.json (timm) or export/*.json (networks) against eval.json's class names;
- the generated evaluation section (between the medfound:evaluation markers) against the same Markdown rendered
  afresh from the folder's eval.json (`evaluate.markdown.evaluation_sections`): every number of every metric,
  interval, per-class, per-site and external row;
- the YAML model-index results against eval.json;
- eval.json's own record of the weights it scored against the main weights file;
- the Preprocessing table against preprocessing.json, and that against config.json's pretrained_cfg (timm).
Returns the mismatches, each naming the file, line or metric; the CLI exits non-zero when there is any.
"""

from __future__ import annotations

import json
import re
from itertools import zip_longest
from pathlib import Path

from medfound.io import sha256_file
from medfound.publish.licences import RIGHTS_MARK, inputs, weaker_than

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

WEIGHTS_ROW = re.compile(r"^\| weights \| `([^`]+)`, sha256 `([0-9a-f]{64})` \|\s*$", re.M)
FILE_ROW = re.compile(r"^\| (config|adapter) \| `([^`]+)`, sha256 `([0-9a-f]{64})` \|\s*$", re.M)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _line_problem(i: int, got: str | None, want: str | None) -> str:
    if got is None:
        return f"card evaluation section ends early: eval.json also gives line {i} '{want}'"
    if want is None:
        return f"card evaluation line {i} '{got}' is not in eval.json's evaluation"
    g, w = NUMBER.findall(got), NUMBER.findall(want)
    for a, b in zip(g, w):
        if a != b:
            return f"card evaluation line {i} says {a} where eval.json gives {b}: '{got.strip()}'"
    return f"card evaluation line {i} differs from eval.json: '{got.strip()}' vs '{want.strip()}'"


def _cell(v) -> str:
    """A preprocessing value as the card's table prints it (template.md)."""
    if v is None:
        return "—"
    return ", ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _check_preprocessing(folder: Path, text: str) -> list[str]:
    """The card's Preprocessing table against preprocessing.json, and (timm folders) preprocessing.json against the
    pretrained_cfg timm itself will apply."""
    path = folder / "preprocessing.json"
    if not path.is_file():
        return [f"{path} missing: the card's preprocessing cannot be verified"]
    prep = json.loads(path.read_text())
    problems = []
    section = text.split("## Preprocessing", 1)[1].split("\n## ", 1)[0] if "## Preprocessing" in text else ""
    rows = dict(re.findall(r"^\| (\w+) \| (.*) \|$", section, re.M))
    for k, v in prep.items():
        if rows.get(k) != _cell(v):
            problems.append(f"card preprocessing '{k}' says {rows.get(k)!r}, preprocessing.json gives {_cell(v)!r}")
    config = folder / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text()).get("pretrained_cfg", {})
        for k in ("input_size", "mean", "std", "interpolation", "crop_pct"):
            if k in prep and k in cfg and _cell(prep[k]) != _cell(cfg[k]):
                problems.append(f"preprocessing.json {k} {prep[k]} differs from config.json pretrained_cfg {cfg[k]} "
                                "(what timm applies)")
    return problems


def _check_label_names(folder: Path, evaluation: dict) -> list[str]:
    """The class names the weights are loaded with (config.json's label_names for timm, class_names in a network's
    json) must be eval.json's, in order: a reversed list would silently swap every prediction."""
    want = evaluation.get("class_names")
    if not want:
        return []
    problems = []
    sources = [folder / "config.json"] + sorted(folder.glob("export/*.json"))
    for path in sources:
        if not path.is_file():
            continue
        cfg = json.loads(path.read_text())
        names = cfg.get("label_names", cfg.get("class_names"))
        if names is not None and list(names) != list(want):
            problems.append(f"{path.relative_to(folder)} names the classes {names}, eval.json scored {want}: the "
                            "label order changed after evaluation; re-publish the run")
    return problems


DATASET_LICENCE = re.compile(r"^- \*\*(.+?)\*\* \(.*\n\s+Manifest digest .*; licence (\S+?)\.$", re.M)


def _check_licence(folder: Path, text: str, licence: str | None) -> list[str]:
    """The card's licence carries every restriction of the data and imported weights the model was made from (read
    from the folder's lineage; for a folder without its weights, from the card's own Training data lines), unless
    the card prints the publisher's statement of rights (`medfound publish --rights-cleared`)."""

    lineage = {}
    for path in [folder / "config.json", *sorted(folder.glob("export/*.json"))]:
        try:
            found = json.loads(path.read_text()).get("medfound") if path.is_file() else None
        except ValueError:
            found = None
        if isinstance(found, dict):
            lineage = found
            break
    made_from = inputs(lineage) if lineage else [(f"data {name}", lic) for name, lic in DATASET_LICENCE.findall(text)]
    if licence is None:
        return ["the card's metadata states no licence"]
    weaker = weaker_than(licence, made_from)
    if weaker and RIGHTS_MARK not in text:
        return [f"the card's licence {licence} is less restrictive than "
                f"{', '.join(f'{w} ({lic})' for w, lic in weaker)}, and the card states no rights to publish so: "
                "re-publish (the default licence follows the inputs) or with --rights-cleared"]
    return []


def check_card(folder: str | Path) -> list[str]:
    from huggingface_hub import ModelCard

    from medfound.evaluate.markdown import evaluation_sections
    from medfound.publish.card import EVAL_BEGIN, EVAL_END, eval_results

    folder = Path(folder)
    readme = folder / "README.md"
    if not readme.is_file():
        return [f"{readme} missing: not a published medfound folder (run `medfound publish RUN --out DIR`)"]
    text = readme.read_text()
    problems = []
    rows = WEIGHTS_ROW.findall(text)
    if not rows:
        problems.append(f"{readme} names no weights with a sha256 (a '| weights | `FILE`, sha256 `HEX` |' row)")
    actual = {}
    for file, sha in rows:
        path = folder / file
        if not path.is_file():
            problems.append(f"the card names weights {file}, which is not in {folder}")
            continue
        actual[file] = sha256_file(path)
        if actual[file] != sha:
            problems.append(f"weights {file}: the card says sha256 {sha[:16]}…, the file has {actual[file][:16]}… "
                            "(the weights changed after the card was written; re-publish the run)")
    for label, file, sha in FILE_ROW.findall(text):
        path = folder / file
        if not path.is_file():
            problems.append(f"the card names {label} file {file}, which is not in {folder}")
        elif sha256_file(path) != sha:
            problems.append(f"{label} file {file}: its sha256 differs from the card's (changed after publishing; "
                            "re-publish the run)")
    described = {f for _, f, _ in FILE_ROW.findall(text)}
    for path in sorted(folder.glob("adapter/**/*")) + sorted(folder.glob("export/backbone/adapter/**/*")):
        if path.is_file() and path.relative_to(folder).as_posix() not in described:
            problems.append(f"adapter file {path.relative_to(folder).as_posix()} is not described by the card")
    problems += _check_preprocessing(folder, text)
    problems += _check_licence(folder, text, ModelCard.load(readme).data.to_dict().get("license"))
    eval_path = folder / "eval.json"
    has_block = EVAL_BEGIN in text and EVAL_END in text
    if not eval_path.is_file():
        if has_block:
            problems.append(f"the card reports an evaluation but {eval_path} is missing")
        return problems
    evaluation = json.loads(eval_path.read_text())
    problems += _check_label_names(folder, evaluation)
    if rows and rows[0][0] in actual and evaluation["model"]["sha256"] != actual[rows[0][0]]:
        problems.append(f"eval.json scored weights with sha256 {evaluation['model']['sha256'][:16]}…, not "
                        f"{rows[0][0]} ({actual[rows[0][0]][:16]}…)")
    if not has_block:
        problems.append(f"{eval_path} is in the folder but the card has no generated evaluation section")
    else:
        block = text.split(EVAL_BEGIN, 1)[1].split(EVAL_END, 1)[0]
        got = [ln.rstrip() for ln in block.strip("\n").splitlines()]
        want = [ln.rstrip() for ln in "\n".join(evaluation_sections(evaluation, level="###")).strip("\n").splitlines()]
        for i, (g, w) in enumerate(zip_longest(got, want), start=1):
            if g != w:
                problems.append(_line_problem(i, g, w))
                break
    card_data = ModelCard.load(readme).data
    expected = {(r.dataset_name, r.dataset_split, r.metric_name): r.metric_value
                for r in eval_results(evaluation, card_data.pipeline_tag or "image-classification")}
    found = {(r.dataset_name, r.dataset_split, r.metric_name): r.metric_value for r in (card_data.eval_results or [])}
    for key, v in found.items():
        if key not in expected:
            problems.append(f"model-index result {key[2]} on {key[0]}/{key[1]} is not in eval.json")
        elif round(float(v), 4) != expected[key]:
            problems.append(f"model-index {key[2]} on {key[0]}/{key[1]}: the card says {v}, eval.json gives "
                            f"{expected[key]}")
    for key in expected.keys() - found.keys():
        problems.append(f"model-index lacks {key[2]} on {key[0]}/{key[1]} (eval.json gives {expected[key]})")
    return problems

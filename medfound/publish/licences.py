"""The licence a model is published under follows what it was made from.

Weights trained on data, or continued from imported weights, carry their terms: a model of CC BY-NC-SA data is not
Apache-2.0 because the recipe's card said so. The inputs are every training set of every stage of the lineage (its
`--license` at ingest) and every imported checkpoint (its `medfound import --license`). Each licence is read as its
restrictions:
- permissive (Apache-2.0, MIT, BSD, CC0, CC BY, PDDL, ODC-By...): none;
- `nc` non-commercial, `nd` no derivatives, `sa` share-alike (CC's -NC/-ND/-SA, GPL and ODbL are share-alike);
- `custom`: anything else ("other", a model's own licence such as DINOv3's): only "other" or that same licence
  covers it.
A published licence must carry every restriction of every input (`weaker_than`). Without a stated licence the model
gets the most restrictive combination of its inputs (`required`; Apache-2.0 when every input is permissive or none
records a licence). A less restrictive licence is refused unless the publisher states why they hold the rights
(`medfound publish --license L --rights-cleared "REASON"`), and that statement is printed in the card and checked by
`medfound card check`. An input whose licence was never recorded is named in the card as such.
"""

from __future__ import annotations

from typing import Any, Optional

PERMISSIVE = ("apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "bsd", "isc", "cc0-1.0", "cc0", "pddl",
              "odc-by", "unlicense", "zlib", "bsl-1.0", "mpl-2.0", "cc-by-4.0", "cc-by-3.0", "cc-by-2.0", "cc-by-2.5")
SHARE_ALIKE = ("gpl", "agpl", "lgpl", "odbl", "cc-by-sa")
DEFAULT = "apache-2.0"
RIGHTS_MARK = "on the publisher's statement"


def normalise(licence: Optional[str]) -> Optional[str]:
    if licence is None or not str(licence).strip():
        return None
    return str(licence).strip().lower().replace("_", "-").replace(" ", "-")


def terms(licence: Optional[str]) -> Optional[frozenset[str]]:
    """The restrictions of a licence ({} permissive; "nc", "nd", "sa"; {"custom"} unrecognised), None unrecorded."""
    name = normalise(licence)
    if name is None:
        return None
    if name.startswith("cc"):
        parts = name.split("-")
        if name.startswith("cc0") or name.startswith("cc-by"):
            return frozenset(t for t in ("nc", "nd", "sa") if t in parts)
    if name in PERMISSIVE:
        return frozenset()
    if name.startswith(SHARE_ALIKE):
        return frozenset({"sa"})
    return frozenset({"custom"})


def inputs(lineage: dict[str, Any]) -> list[tuple[str, Optional[str]]]:
    """(what, licence) for every training set and imported checkpoint of a lineage, oldest stage first."""
    chain, node = [], lineage
    while node:
        chain.append(node)
        node = node.get("parent")
    found: list[tuple[str, Optional[str]]] = []
    seen = set()
    for stage in reversed(chain):
        if stage.get("stage") == "import":
            source = stage.get("source") or {}
            item = (f"imported weights {source.get('file', '?')}", source.get("license"))
            if item not in seen:
                seen.add(item)
                found.append(item)
        for d in stage.get("datasets", []):
            src = d.get("source") if isinstance(d.get("source"), dict) else {}
            item = (f"data {d.get('name', '?')}", (src or {}).get("license") or d.get("license"))
            if item not in seen:
                seen.add(item)
                found.append(item)
    return found


def required(found: list[tuple[str, Optional[str]]]) -> str:
    """The least restrictive licence that carries every restriction of the recorded inputs."""
    recorded = [(lic, terms(lic)) for _, lic in found if terms(lic) is not None]
    union = frozenset().union(*(t for _, t in recorded)) if recorded else frozenset()
    if not union:
        return DEFAULT
    if "custom" in union:
        customs = {normalise(lic) for lic, t in recorded if "custom" in t}
        return customs.pop() if len(customs) == 1 and union == {"custom"} else "other"
    for lic, t in recorded:  # an input licence that already is the combination
        if t == union:
            return normalise(lic)
    if {"nd", "sa"} <= union:
        return "other"  # no-derivatives and share-alike cannot both hold
    return "cc-by" + ("-nc" if "nc" in union else "") + ("-nd" if "nd" in union else "-sa" if "sa" in union else "") \
        + "-4.0"


def weaker_than(licence: str, found: list[tuple[str, Optional[str]]]) -> list[tuple[str, str]]:
    """The recorded inputs whose restrictions `licence` does not carry (empty: it may be published so)."""
    chosen = terms(licence) or frozenset()
    if normalise(licence) == "other":
        return []  # "other": the card states the terms, input by input
    out = []
    for what, lic in found:
        t = terms(lic)
        if t is None:
            continue
        if "custom" in t and normalise(lic) != normalise(licence):
            out.append((what, lic))
        elif not t <= chosen:
            out.append((what, lic))
    return out


def describe(licence: str, found: list[tuple[str, Optional[str]]], rights: Optional[str] = None) -> str:
    """The card's licence row: the licence, what it follows from, and a rights statement where one was needed."""
    listed = "; ".join(f"{what}: {lic or 'not recorded'}" for what, lic in found) or "no recorded inputs"
    text = f"{normalise(licence)}; inputs: {listed}"
    if rights:
        text += f". Less restrictive than its inputs {RIGHTS_MARK}: \"{rights}\""
    return text


def resolve(chosen: Optional[str], lineage: dict[str, Any], rights: Optional[str] = None) -> tuple[str, str]:
    """(licence, the card's licence row) for publishing weights of `lineage` under `chosen` (None: `required`);
    ValueError naming the inputs when `chosen` is less restrictive than they are and no `rights` are stated."""
    found = inputs(lineage)
    licence = normalise(chosen) or required(found)
    weaker = weaker_than(licence, found)
    if weaker and not rights:
        listed = ", ".join(f"{what} ({lic})" for what, lic in weaker)
        raise ValueError(f"licence {licence} is less restrictive than what the model was made from: {listed}. Publish "
                         f"under {required(found)} (the default when no licence is given), or, if you hold the "
                         "rights to release it under "
                         f"{licence}, say so: --license {licence} --rights-cleared \"WHO GRANTED IT, WHEN\" (printed "
                         "in the card)")
    return licence, describe(licence, found, rights if weaker else None)


def for_export(chosen: Optional[str], lineage: dict[str, Any]) -> str:
    """The licence an export records at the end of training: the recipe's card.license when its inputs allow it,
    else (with a warning, never failing the run) the one they require; `medfound publish` decides finally."""
    import warnings

    found = inputs(lineage)
    licence = normalise(chosen) or required(found)
    weaker = weaker_than(licence, found)
    if weaker:
        warnings.warn(f"card.license {licence} is less restrictive than "
                      f"{', '.join(f'{w} ({lic})' for w, lic in weaker)}: the export records {required(found)}; "
                      "publishing under another licence needs `medfound publish --rights-cleared`", stacklevel=2)
        return required(found)
    return licence

"""`manifest.json`: what a shard set holds, and the checksums that prove it.

One manifest per shard-set directory. It records every shard (split, sample count, bytes, sha256),
the label schema, modality, site, the source and the ingest settings, counts per split/label/site,
and one `digest` over all of that (not the creation time), so two shard sets with the same digest
hold the same samples. Model cards cite the digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator, model_validator

from medfound.config import Strict
from medfound.data import location
from medfound.data.location import RemoteDataError, join, open_binary, read_bytes, redact
from medfound.data.samples import demo_set_command
from medfound.io import atomic_write_json

# Loaded by torch-free commands (`medfound ls`, `validate`, `--help`): medfound modules that bring in torch or
# numpy are imported inside the functions that need them (tests/test_layering.py keeps it so).

MANIFEST_NAME = "manifest.json"
FORMAT = "medfound-shards/1"
MODALITIES = ("fundus", "oct", "cxr", "xray", "mammography", "ct", "mr", "us", "pathology", "other", "mixed")


class LabelSchema(Strict):
    """`type`: none (unlabelled), binary, multiclass, ordinal (grades: kappa is quadratic-weighted), or
    multilabel (any subset of the classes per sample, e.g. CheXNet's 14 findings)."""

    type: Literal["none", "binary", "multiclass", "ordinal", "multilabel"]
    names: list[str] = Field(default_factory=list, description="class index -> name")

    @model_validator(mode="after")
    def _check(self) -> "LabelSchema":
        if self.type == "none" and self.names:
            raise ValueError("an unlabelled schema (type none) has no class names")
        if self.type == "binary" and len(self.names) != 2:
            raise ValueError(f"a binary schema has exactly 2 class names, got {self.names}")
        if self.type in ("multiclass", "ordinal") and len(self.names) < 2:
            raise ValueError(f"a {self.type} schema needs at least 2 class names, got {self.names}")
        if self.type == "multilabel" and not self.names:
            raise ValueError("a multilabel schema needs its class names")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"class names must be unique, got {self.names}")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.names)


SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*\.tar$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ShardInfo(Strict):
    path: str = Field(description="file name relative to the shard-set directory")
    split: str
    count: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # A manifest is data: a shard path must be a plain file name inside its set. A scheme (`pipe:` runs a
        # shell command in webdataset's opener), a `/`, `..` or an absolute path is refused here, before any
        # reader sees it.
        if not SHARD_NAME.match(v) or ".." in v:
            raise ValueError(f"shard path {v!r} is not a plain .tar file name inside the shard set (letters, digits, "
                             "'_', '-', '.'; no '/', '..', scheme or absolute path)")
        return v

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        if not SHA256.match(v):
            raise ValueError(f"sha256 {v!r} is not 64 lower-case hex digits")
        return v


class Manifest(Strict):
    format: Literal["medfound-shards/1"] = FORMAT
    name: str
    modality: Literal[MODALITIES]  # type: ignore[valid-type]
    site: Optional[str] = None
    label_schema: LabelSchema
    source: dict[str, Any] = Field(description="input file name(s), their sha256, licence and attribution")
    ingest: dict[str, Any] = Field(description="the ingest kind and every setting it used")
    shards: list[ShardInfo]
    counts: dict[str, Any]
    fields: Optional[list[str]] = Field(None, description="tar members of every sample, e.g. png, mask.png, cls, json")
    bags: Optional[list[dict[str, Any]]] = Field(None, description="slide-level bags (WSI): slide, label, split, tiles")
    skipped: Optional[dict[str, Any]] = Field(None, description="inputs not written, counted by reason")
    deidentification: Optional[dict[str, Any]] = Field(None, description="what was removed and how IDs were hashed")
    digest: str = ""
    medfound_version: str = ""
    created: str = ""

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def class_counts(self, split: str) -> list[int]:
        """Samples per class (per finding, for multi-label) in `split`, in class-index order."""
        by_name = self.counts.get("by_label", {}).get(split, {})
        return [int(by_name.get(name, 0)) for name in self.label_schema.names]

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def compute_digest(self) -> str:
        """sha256 over the canonical JSON of everything but `digest`, `created` and `medfound_version`."""
        body = self.model_dump(mode="json", exclude={"digest", "created", "medfound_version"}, exclude_none=True)
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def by_split_order(counts: dict[str, Any]) -> dict[str, Any]:
    """`counts` keyed by split, in the manifest's order: train, val, test, then the others alphabetically."""
    order = {"train": 0, "val": 1, "test": 2}
    return dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], 9), kv[0])))


def count_table(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts per split, per split x label (each label of a multi-label sample counts), per site and per
    modality, from one small record per sample."""
    by_split = Counter(r["split"] for r in records)
    by_label: dict[str, Counter] = {}
    for r in records:
        labels = r.get("label")
        for lab in (labels if isinstance(labels, list) else [] if labels is None else [labels]):
            by_label.setdefault(r["split"], Counter())[str(lab)] += 1
    by_site = Counter(r["site"] for r in records if r.get("site"))
    by_modality = Counter(r["modality"] for r in records if r.get("modality"))
    return {
        "total": len(records),
        "by_modality": dict(sorted(by_modality.items())),
        "by_split": by_split_order(dict(by_split)),
        "by_label": by_split_order({k: dict(sorted(v.items())) for k, v in by_label.items()}),
        "by_site": dict(sorted(by_site.items())),
    }


def write_manifest(directory: str | Path, manifest: Manifest) -> Manifest:
    manifest.digest = manifest.compute_digest()
    atomic_write_json(Path(directory) / MANIFEST_NAME, manifest.model_dump(mode="json"))
    return manifest


def read_manifest(directory: str | Path) -> Manifest:
    """Read and validate `directory/manifest.json` (a local folder or a remote location, `medfound.data.location`);
    errors name the file and the fix."""

    if location.is_url(directory):
        url = location.join(location.check_location(directory), MANIFEST_NAME)
        try:
            text, path = location.read_bytes(url).decode("utf-8", "replace"), location.redact(url)
        except location.RemoteNotFound:
            raise FileNotFoundError(f"no {MANIFEST_NAME} at {location.redact(url)}: write the shard set there "
                                    f"(`medfound shard KIND INPUT --out {location.redact(str(directory))}`) or fix "
                                    "the location") from None
    else:
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            hint = "" if directory.exists() else " (the directory does not exist)"
            demo = demo_set_command(directory)
            if demo:
                raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}{hint}: it is one of the demo's shard "
                                        f"sets; `medfound demo --out {directory.parent.parent}` runs the whole demo, "
                                        f"or make this set with `{demo}`")
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}{hint}: create the shard set with "
                                    f"`medfound shard KIND INPUT --out {directory}`")
        text = path.read_text()
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as e:
        raise ValueError(f"{path} is not a valid medfound manifest ({e.error_count()} problems): {e}; "
                         "re-create the shard set with `medfound shard`") from None
    if manifest.digest != manifest.compute_digest():
        raise ValueError(f"{path}: the digest does not match the manifest's content (edited by hand?); "
                         "re-create the shard set with `medfound shard`")
    return manifest


def verify_shards(directory: str | Path, manifest: Optional[Manifest] = None) -> list[str]:
    """Check every shard against the manifest: presence, byte size, sha256, and (reading it) its sample count;
    and that no sample key is in two shards. Returns the problems found, each naming the shard."""
    from medfound.data.tario import ShardError, shard_keys

    manifest = manifest or read_manifest(directory)
    problems = []
    owner: dict[str, str] = {}
    for s in manifest.shards:
        p = location.join(directory, s.path)
        if not location.exists(p):
            problems.append(f"{p}: missing (listed in {MANIFEST_NAME})")
            continue
        try:  # the streaming checks at their strictest: size, sha256, then every header and the sample count
            keys = shard_keys(str(p), s.model_dump(), "sha256")
        except (ShardError, location.RemoteDataError) as e:
            problems.append(str(e))
            continue
        for key in keys:
            if key in owner:
                problems.append(f"{p}: sample key {key!r} is also in {owner[key]} (a key must be unique in the set)")
            owner.setdefault(key, s.path)
    total = sum(s.count for s in manifest.shards)
    if manifest.counts.get("total") not in (None, total):
        problems.append(f"{location.join(directory, MANIFEST_NAME)}: counts.total {manifest.counts['total']} but its shards list "
                        f"{total} samples")
    return problems


def patient_leakage(directory: str | Path, manifest: Optional[Manifest] = None) -> Optional[dict[str, list[str]]]:
    """Patient tokens found in more than one split (e.g. from a user's own split column), with their splits;
    None when the samples carry no patient tokens (leakage cannot be checked)."""
    from medfound.data.tario import iter_members

    manifest = manifest or read_manifest(directory)
    splits: dict[str, set[str]] = {}
    for s in manifest.shards:
        for member in iter_members(location.join(directory, s.path)):
            name = member["fname"]
            if name.endswith(".json") and not name.endswith(".labels.json"):
                meta = json.loads(member["data"])
                if meta.get("patient"):
                    splits.setdefault(meta["patient"], set()).add(meta.get("split", s.split))
    if not splits:
        return None
    return {p: sorted(v) for p, v in sorted(splits.items()) if len(v) > 1}


def salt_fingerprint(manifest: Manifest) -> Optional[str]:
    """The fingerprint of the salt behind the set's patient tokens (`ingest.patient_salt`), or None when not recorded
    (a set written before medfound recorded it, or one without tokens: npz, slides)."""
    salt = manifest.ingest.get("patient_salt")
    return salt.get("fingerprint") if isinstance(salt, dict) else None


def salt_caveat(manifest: Manifest) -> Optional[str]:
    """Why the set's own leakage check cannot vouch for its splits, or None: a set merged from parts without a
    recorded salt fingerprint may hold parts whose tokens come from different salts (the same patient under two
    tokens, in two splits, invisible to the check)."""
    if manifest.ingest.get("merged_parts") and salt_fingerprint(manifest) is None:
        return (f"merged from {manifest.ingest['merged_parts']} parts whose salts were not recorded (made before "
                "medfound recorded salt fingerprints): if they were ingested with different --salt values, the same "
                "patient has two tokens and can sit in two splits unseen; re-ingest the parts to check")
    return None


def download_set(url: str, dest: Path) -> Path:
    """Download the shard set at `url` (its manifest and every shard it lists) into the new folder `dest`, each shard
    capped at its listed size and refused when its sha256 differs (RemoteDataError); returns `dest`."""

    raw = read_bytes(join(url, MANIFEST_NAME))
    listed = json.loads(raw).get("shards", [])
    dest.mkdir(parents=True)
    for entry in listed:
        name = str(entry.get("path", ""))
        if not name or "/" in name or "\\" in name or name in (".", "..") or name == MANIFEST_NAME:
            raise RemoteDataError(f"{redact(url)}/{MANIFEST_NAME} lists {name!r}, not a plain shard file name")
        h = hashlib.sha256()
        with open_binary(join(url, name), limit=int(entry.get("bytes", 0))) as src, open(dest / name, "wb") as f:
            while block := src.read(8 << 20):
                h.update(block)
                f.write(block)
        if h.hexdigest() != entry.get("sha256"):
            raise RemoteDataError(f"{redact(join(url, name))}: sha256 differs from its manifest (corrupt, replaced or "
                                  "cut short); re-create that shard set")
    (dest / MANIFEST_NAME).write_bytes(raw)
    return dest

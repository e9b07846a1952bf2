"""A benchmark suite (`medfound bench --suite SUITE`): the tasks a backbone is scored on and the protocols that score
it, as a strict YAML schema (torch-free, like recipes).

```yaml
name: medmnist
tasks:
  - name: pneumoniamnist
    npz: ../shared/data/medmnist/pneumoniamnist.npz     # or shards: DIR, or sample: pneumoniamnist (bundled)
    modality: cxr
    label_names: [normal, pneumonia]
    img_size: 32
fractions: [0.01, 0.1, 1.0]
seeds: [0]
protocols:
  - name: knn
  - name: linear
  - name: fewshot
    shots: [1, 2, 4, 8, 16]
  - name: lora
    steps: 500
```

Protocols are registered components (`medfound.registry.BENCH_PROTOCOLS`, config class + runner), so a new one is a
config class here (or in a plugin) and its runner; `medfound ls` lists them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from medfound.config.base import ConfigError, ShardLocation, Strict
from medfound.registry import BENCH_PROTOCOLS

SAMPLE_SETS = ("retinamnist", "pneumoniamnist")  # the bundled sets a task may name (`sample:`)
METRICS = ("auroc", "accuracy", "balanced_accuracy", "kappa_quadratic")


class BenchTask(Strict):
    """One labelled data set, its splits and the metric it is scored by."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$", description="the task's name in results and file names")
    shards: Optional[ShardLocation] = Field(None, description="a labelled shard set (medfound shard ...)")
    sample: Optional[Literal[SAMPLE_SETS]] = Field(None, description="a bundled sample set, sharded under OUT/shards")
    npz: Optional[str] = Field(None, description="a MedMNIST-layout npz, sharded under OUT/shards on first use")
    modality: str = Field("other", description="npz: the modality recorded at sharding")
    label_type: Optional[Literal["binary", "multiclass", "ordinal"]] = Field(None, description="npz: label type")
    label_names: Optional[list[str]] = Field(None, description="npz: class names in label order")
    train_split: str = Field("train", description="the labelled training split (fractions are drawn from it)")
    val_split: str = Field("val", description="selection: the linear probe's regularisation, fine-tuning steps")
    test_split: str = Field("test", description="the split every protocol reports")
    metric: Literal[METRICS] = Field("auroc", description="the metric results and paired differences are on")
    img_size: Optional[int] = Field(None, gt=0, description="input edge (default: the backbone's own input size)")

    @model_validator(mode="after")
    def _one_source(self) -> "BenchTask":
        given = [k for k in ("shards", "sample", "npz") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"task {self.name}: give exactly one of shards, sample, npz (got {given or 'none'})")
        return self


class ProtocolBase(Strict):
    """What every protocol accepts."""

    backbones: Optional[list[str]] = Field(None, description="only these backbones (their labels), e.g. full "
                                                             "fine-tuning for the CNN baseline, LoRA for the ViTs")


class KNNProtocol(ProtocolBase):
    """k nearest neighbours on L2-normalised frozen features, cosine similarity, votes weighted exp(sim / T) (DINO,
    Wu et al. 2018); k is capped at the number of training samples."""

    uses_fractions: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True  # frozen features of every split
    name: Literal["knn"] = "knn"
    k: int = Field(20, gt=0, description="neighbours (DINO: 20)")
    temperature: float = Field(0.07, gt=0, description="vote temperature (DINO: 0.07)")


class LinearProtocol(ProtocolBase):
    """Logistic regression on standardised frozen features (scikit-learn, L-BFGS), its inverse regularisation C
    chosen on the validation split (the same fraction of it as of the training split) by the task's metric."""

    uses_fractions: ClassVar[bool] = True
    needs_features: ClassVar[bool] = True  # frozen features of every split
    name: Literal["linear"] = "linear"
    c_grid: list[float] = Field([10.0 ** e for e in range(-4, 5)], min_length=1,
                                description="candidate C values (the smallest wins ties: more regularisation)")
    max_iter: int = Field(1000, gt=0, description="L-BFGS iterations")


class FewShotProtocol(ProtocolBase):
    """SimpleShot (Wang et al. 2019): features centred on the support set's mean and L2-normalised, one prototype
    per class, nearest prototype; `draws` seeded supports per shot count, reported as the mean with the 2.5-97.5
    percentiles over draws."""

    uses_fractions: ClassVar[bool] = False
    needs_features: ClassVar[bool] = True  # frozen features of every split
    name: Literal["fewshot"] = "fewshot"
    shots: list[int] = Field([1, 2, 4, 8, 16], min_length=1, description="samples per class in the support set")
    draws: int = Field(100, gt=0, description="supports drawn per shot count (THUNDER: 1,000)")


class FinetuneProtocol(ProtocolBase):
    """The fine-tuning path itself (`medfound finetune`), at each fraction: LoRA or full fine-tuning from the
    backbone, validation-based selection on the same fraction of the validation split (`eval.every`), or the last
    of a number of steps fixed in advance (`every: null`, and, with `min_val_per_class`, every fraction whose
    validation subset has fewer samples than that in a class: a 1% subset of a few hundred validation images is about
    5 of them, and an AUROC over them ties at every look or ranks steps by noise). Off by default: the same `steps`
    at every fraction over-fit 11 and 109 RetinaMNIST images, where the selected early steps did better
    (benchmarks/results/label_efficiency_thin_validation_retinamnist.json)."""

    uses_fractions: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False  # frozen features of every split
    name: Literal["lora", "full"]
    recipe: str = Field("demo_classify_lora", description="the classification recipe the runs start from")
    steps: int = Field(500, gt=0, description="optimizer steps per run (fixed in advance)")
    every: Optional[int] = Field(50, gt=0, description="validate every N steps (eval.every); the best step is "
                                                       "exported. null: no validation, the last step is exported "
                                                       "(steps fixed in advance: at 1% of labels the validation "
                                                       "subset is a handful of samples and cannot choose)")
    min_val_per_class: Optional[int] = Field(None, ge=1, description="select only where the fraction's validation "
                                                                   "subset has this many samples in every class; a "
                                                                   "fraction with fewer runs its steps fixed in "
                                                                   "advance and exports the last (as every: null), "
                                                                   "and its row says so. null: always select")
    lr: Optional[float] = Field(None, gt=0, description="optim.lr (default: the recipe's)")
    batch_size: int = Field(32, gt=0, description="data.batch_size")
    overrides: list[str] = Field(default_factory=list, description="more key=value overrides of the recipe")


for _name, _cfg, _builder, _text in (
        ("knn", KNNProtocol, "medfound.bench.protocols:run_knn", "k-NN on frozen features (DINO's weighted votes)"),
        ("linear", LinearProtocol, "medfound.bench.protocols:run_linear",
         "logistic regression on frozen features, C chosen on validation"),
        ("fewshot", FewShotProtocol, "medfound.bench.protocols:run_fewshot",
         "SimpleShot prototypes from 1-16 samples per class, many seeded draws"),
        ("lora", FinetuneProtocol, "medfound.bench.protocols:run_finetune", "LoRA fine-tuning (medfound finetune)"),
        ("full", FinetuneProtocol, "medfound.bench.protocols:run_finetune", "full fine-tuning (medfound finetune)")):
    BENCH_PROTOCOLS.register(_name, config=_cfg, builder=_builder, description=_text)

ProtocolConfig = Annotated[Union[KNNProtocol, LinearProtocol, FewShotProtocol, FinetuneProtocol],
                           Field(discriminator="name")]


class Suite(Strict):
    """Tasks x protocols x fractions x seeds."""

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    tasks: list[BenchTask] = Field(min_length=1)
    protocols: list[ProtocolConfig] = Field(min_length=1)
    fractions: list[float] = Field([0.01, 0.1, 1.0], min_length=1, description="label fractions of the training "
                                                                               "split (nested per seed)")
    seeds: list[int] = Field([0], min_length=1, description="fraction draws (data.fraction_seed) and training seeds")
    bootstrap: int = Field(1000, ge=0, description="resamples of the test split for intervals and paired differences")
    bootstrap_seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _checks(self) -> "Suite":
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"fractions must be in (0, 1], got {bad}")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        protocols = [p.name for p in self.protocols]
        if len(set(protocols)) != len(protocols):
            raise ValueError(f"each protocol once, got {protocols}")
        return self


def suite_dirs() -> list[Path]:
    import importlib.resources

    dirs = [Path("bench")]
    try:
        dirs.append(Path(str(importlib.resources.files("medfound") / "recipes" / "bench")))
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        pass
    dirs.append(Path(__file__).resolve().parents[2] / "bench")
    return dirs


def find_suite(name_or_path: str | os.PathLike) -> Path:
    """A suite YAML given as a path, or by name from ./bench, the wheel's shipped suites, or the checkout's bench/."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    stem = p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml"
    for d in suite_dirs():
        if (d / stem).is_file():
            return d / stem
    shipped = sorted({q.stem for d in suite_dirs()[1:] if d.is_dir() for q in d.glob("*.yaml")})
    raise ConfigError(f"no suite {name_or_path!r}: give a YAML path, or one of the shipped suites "
                      f"({', '.join(shipped) or 'none found'})")


def load_suite(name_or_path: str | os.PathLike) -> tuple[Path, Suite]:
    """Read and validate a suite; relative `shards:` and `npz:` paths are read from the current directory (as
    recipes' are), except in the shipped suites, whose paths are relative to the checkout."""
    path = find_suite(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    try:
        return path, Suite.model_validate(raw)
    except ValidationError as e:
        lines = [f"  - {'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"invalid suite {path}:\n" + "\n".join(lines)) from None

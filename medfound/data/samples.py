"""The bundled sample archive (data/README.md) and the `medfound shard` commands that make the demo's shard sets.

Torch-free and in the data layer, so a missing demo shard set's error can give the exact command that makes it.
"""

from __future__ import annotations

import importlib.resources
import shlex
from pathlib import Path
from typing import Optional

SAMPLES = ("medmnist/retinamnist_demo.npz", "medmnist/pneumoniamnist_demo.npz", "wsi/CMU-1-Small-Region.svs")


def sample_data() -> Path:
    """The bundled sample archive: the checkout's data/ when running from the repository, else the copy installed
    with the package (medfound/sample_data)."""
    for base in (Path(__file__).resolve().parents[2] / "data",
                 Path(str(importlib.resources.files("medfound") / "sample_data"))):
        if all((base / s).is_file() for s in SAMPLES):
            return base
    raise FileNotFoundError("the bundled sample archive is missing (medfound/sample_data in the wheel, data/ in a "
                            "checkout): reinstall medfound")


def shard_commands(out: Path, data: Path) -> list[list[str]]:
    """The `medfound shard` argument lists that make the demo's three shard sets under OUT/shards."""
    s = out / "shards"
    return [
        ["shard", "npz", str(data / SAMPLES[0]), "--out", str(s / "retinamnist"), "--name", "retinamnist",
         "--modality", "fundus", "--label-type", "ordinal", "--label-names", "no DR,mild,moderate,severe,proliferative",
         "--max-count", "256", "--license", "CC-BY-4.0",
         "--attribution", "RetinaMNIST, MedMNIST v2 (Yang et al., Scientific Data 2023); images from DeepDRiD"],
        ["shard", "npz", str(data / SAMPLES[1]), "--out", str(s / "pneumoniamnist"), "--name", "pneumoniamnist",
         "--modality", "cxr", "--label-names", "normal,pneumonia", "--max-count", "256", "--license", "CC-BY-4.0",
         "--attribution",
         "PneumoniaMNIST, MedMNIST v2 (Yang et al., Scientific Data 2023); images from Kermany et al., Cell 2018"],
        ["shard", "wsi", str(data / SAMPLES[2]), "--out", str(s / "he_cmu1"), "--name", "he_cmu1", "--modality",
         "pathology", "--mpp", "1.0", "--tile-size", "64", "--min-tissue", "0.5", "--keep-names", "--max-count", "256",
         "--license", "CC0-1.0",
         "--attribution", "CMU-1-Small-Region.svs, OpenSlide test data (Carnegie Mellon University), CC0"],
    ]


def demo_set_command(directory: Path) -> Optional[str]:
    """The exact command that makes `directory` when it is one of the demo's shard sets (OUT/shards/NAME), else
    None."""
    directory = Path(directory)
    if directory.parent.name != "shards":
        return None
    try:
        data = sample_data()
    except FileNotFoundError:
        return None
    for argv in shard_commands(directory.parent.parent, data):
        if Path(argv[argv.index("--out") + 1]) == directory:
            return "medfound " + shlex.join(argv)
    return None

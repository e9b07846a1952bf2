"""Helpers shared by the tests (importable as `helpers`; conftest.py holds the fixtures)."""

from __future__ import annotations

import json
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
SHARED = (ROOT.parent / "shared" / "data").resolve()

# A ViT small enough to train for a few steps in a second or two on one CPU core.
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def shared(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test saying what is missing."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data {p} is absent (the ../shared/data checkout is not on this machine)")
    return p


def tiny_pretrain_overrides(shards: dict[str, Path], out: Path, steps: int = 4, objective: str = "mae") -> list[str]:
    sets = ",".join(str(shards[k]) for k in ("retina", "pneumonia", "he"))
    common = [
        f"data.shards=[{sets}]", "data.batch_size=16", "data.shuffle_buffer=64", "data.img_size=32",
        "data.num_workers=0", "data.weights=null",
        f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.log_every=1",
        "trainer.checkpoint_every=1000", "trainer.progress=false", "trainer.loggers=[]", "trainer.resume=null",
        "trainer.precision=fp32", "trainer.visualize_every=null", "optim.warmup_steps=1",
    ]
    if objective == "dinov2":
        return common + [
            "backbone.model_args={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2, "
            "dynamic_img_size: true}", "backbone.weights=null",
            "objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
            "data.multicrop={global_crops: 2, local_crops: 2, local_size: 16}", "data.batch_size=8",
        ]
    return common + [
        "backbone.model_args={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
        "backbone.weights=null", "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
    ]


def tiny_finetune_overrides(shards: dict[str, Path], backbone: Path, out: Path, steps: int = 4,
                            key: str = "retina") -> list[str]:
    return [
        f"backbone.weights={backbone}", f"data.shards=[{shards[key]}]", "data.batch_size=16",
        "data.shuffle_buffer=64", "data.eval_batch_size=128", "data.img_size=32", f"trainer.output_dir={out}",
        f"trainer.max_steps={steps}", "trainer.log_every=1", "trainer.checkpoint_every=1000",
        "trainer.progress=false", "trainer.loggers=[]",
    ]


def tar_samples(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard set read with Python's tarfile (independently of medfound's reader):
    key -> {extension: bytes}."""
    out: dict[str, dict[str, bytes]] = {}
    for tar in sorted(Path(directory).glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def tar_metas(directory: Path) -> list[dict[str, Any]]:
    """The JSON meta of every sample of a shard set."""
    return [json.loads(s["json"]) for s in tar_samples(directory).values()]


def wait_for_checkpoint(proc: Any, last: Path, at_least: str, timeout: float) -> None:
    """Poll until `last` names a checkpoint >= `at_least` (e.g. "step_00000020") while `proc` still runs."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if last.is_file() and last.read_text().strip() >= at_least:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: raise max_steps"


def tiny_segment_overrides(head: str, seg_shards: dict[str, Path], backbone: Path | None, out: Path,
                           steps: int = 2) -> list[str]:
    """Shrink a segmentation recipe for CPU tests and point it at the bundled segmentation shards."""
    common = [f"trainer.output_dir={out}", f"trainer.max_steps={steps}", "trainer.log_every=1",
              "trainer.checkpoint_every=1000", "trainer.progress=false", "trainer.loggers=[]", "trainer.resume=null",
              "data.batch_size=2", "data.shuffle_buffer=4", "segment.crops_per_image=2", "segment.roi=null",
              "optim.warmup_steps=1"]
    if head in ("unet3d", "vnet"):
        channels = ["head.channels=[8,16,32]", "head.strides=[[2,2,1],2]"] if head == "unet3d" else []
        return common + channels + [f"data.shards=[{seg_shards['volume']}]", "segment.patch_size=[32,32,16]",
                                    "segment.spacing=null", "eval.split=train"]
    common += [f"data.shards=[{seg_shards['ct']}]", "segment.patch_size=[64,64]", "segment.class_names=null"]
    if head in ("unet", "attention_unet"):
        return common + ["head.channels=[8,16,32]"]
    return common + [f"backbone.weights={backbone}", "head.feature_size=8"] if head == "unetr" else \
        common + [f"backbone.weights={backbone}", "head.decoder_channels=[32,16,8]"]


def assert_gradients_only_where_trainable(module: Any, label: str) -> None:
    """After backward: every trainable parameter has a non-zero gradient and no frozen one has any."""
    for n, p in module.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{label}: no gradient for {n}"
        else:
            assert p.grad is None, f"{label}: frozen {n} got a gradient"


def descendants(pid: int) -> list[int]:
    """All processes below `pid` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def base_requirements(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist lines without an extra: exactly what `pip install medfound` installs."""
    import zipfile
    from email.parser import Parser

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        message = Parser().parsestr(z.read(meta).decode())
    return [r for r in message.get_all("Requires-Dist") or [] if "extra ==" not in r]


def install_fresh_venv(root: Path) -> dict[str, Any]:
    """Build the wheel of the checkout at `root` and install it, as a user would, into a new virtual environment
    under `root`/venv: `--no-deps` for medfound itself, then exactly its base requirements (no extras), within the
    tested ranges. Returns {"venv", "wheel", "base", "env"} (env: the environment to run the venv's commands in)."""
    import os
    import subprocess
    import sys

    wheel_dir = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheel_dir), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next(wheel_dir.glob("medfound-*.whl"))
    base = base_requirements(wheel)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=600)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TQDM_DISABLE="1")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    for args in (["--no-deps", str(wheel)], [*base, "-c", str(ROOT / "constraints" / "tested.txt")]):
        r = subprocess.run(pip + args, env=env, capture_output=True, text=True, timeout=1800)
        if r.returncode:
            raise RuntimeError(f"pip install {' '.join(args[:3])}... failed:\n{r.stdout[-2000:]}{r.stderr[-3000:]}")
    return {"venv": venv, "wheel": wheel, "base": base, "env": env}


def two_class_bags(bags: Path, dest: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A copy of a one-slide bag folder at `dest` with a second bag of the negated features (`neg.safetensors`), so a
    head has two classes to separate: (its index, the slide's record, a record of the negated bag as class 1). The
    caller sets index["slides"] from the two records and writes bags.json (`write_bags`)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from medfound.data.bags import read_bags

    shutil.copytree(bags, dest)
    index = read_bags(dest)
    slide = dict(index["slides"][0])
    feats = load_file(str(dest / slide["file"]))
    save_file({"features": -feats["features"], "coords": feats["coords"]}, str(dest / "neg.safetensors"))
    return index, slide, {**slide, "label": 1, "file": "neg.safetensors"}


def write_bags(dest: Path, index: dict[str, Any], slides: list[dict[str, Any]]) -> None:
    (dest / "bags.json").write_text(json.dumps({**index, "slides": slides}))


GOLDEN = Path(__file__).resolve().parent / "evaluate" / "golden"
VOLATILE = {"seconds", "created", "medfound_version"}
# digests of what training computed (the model's weights, a trained backbone's bag features): the same run gives the
# same bits on one CPU, but the CPU's kernels (AVX2, AVX-512, AMX) change the last bits of trained weights, so these
# are compared as well-formed sha256s only; data digests (manifest_digest) stay exact
TRAINED_DIGESTS = {"sha256", "bags_digest"}


def _normal(value: Any, tmp: str) -> Any:
    import re

    if isinstance(value, dict):
        return {k: _trained_digest(v) if k in TRAINED_DIGESTS else _normal(v, tmp)
                for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_normal(v, tmp) for v in value]
    if isinstance(value, str):  # a temporary folder, in paths and in warnings: <tmp>/LAST (numbered folders vary)
        value = value.replace(tmp, "<tmp>")
        return re.sub(r"<tmp>(/[^/\s'\"]+)*/([^/\s'\"(),]+)", r"<tmp>/\2", value)
    return value


def _trained_digest(value: Any) -> Any:
    import re

    return "<sha256 of trained tensors>" if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else value


def _same(got: Any, want: Any, where: str, problems: list[str]) -> None:
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in got or k not in want:
                problems.append(f"{where}.{k}: {'missing now' if k not in got else 'new'}")
            else:
                _same(got[k], want[k], f"{where}.{k}", problems)
    elif isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            problems.append(f"{where}: {len(got)} items, golden {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]", problems)
    elif isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if abs(got - want) > 1e-3 + 1e-3 * abs(want):  # the numbers of a tiny model trained on this CPU
            problems.append(f"{where}: {got} != golden {want}")
    elif got != want:
        problems.append(f"{where}: {got!r} != golden {want!r}")


def assert_matches_golden(report: dict[str, Any], name: str, tmp_root: Path) -> None:
    """An eval.json equals its committed golden copy (tests/evaluate/golden/NAME.json): every key, list length and
    string exactly (temporary paths folded to <tmp>/LAST), numbers within 1e-3, timing and version left out,
    digests of trained tensors (TRAINED_DIGESTS) checked as sha256s, not by value. The
    evaluation of every task kind is pinned this way so that a change to the one evaluation skeleton shows up as a
    diff. MEDFOUND_UPDATE_GOLDEN=1 rewrites the copy (review the git diff)."""
    import os

    got = _normal(json.loads(json.dumps(report)), str(tmp_root))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("MEDFOUND_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        return
    want = _normal(json.loads(path.read_text()), str(tmp_root))
    problems: list[str] = []
    _same(got, want, name, problems)
    assert not problems, f"eval.json differs from {path.name} in {len(problems)} places:\n" + "\n".join(problems[:30])


def moved_by_step(task, batch, steps: int, lr: float = 1e-2) -> list[set[str]]:
    """Train `task` on `batch` for `steps` AdamW steps, calling its `before_optimizer_step` as the loop does; after
    each step, the names of the trainable parameters that differ from their starting values."""
    import torch

    start = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    moved = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        task(batch)["loss"].backward()
        task.before_optimizer_step(step, steps)
        opt.step()
        moved.append({n for n, p in task.named_parameters() if n in start and not torch.equal(p, start[n])})
    return moved

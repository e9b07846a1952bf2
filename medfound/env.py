"""The installed torch stack, checked before a verb that needs it: a torchvision built for another torch (a CPU torch
beside a CUDA torchvision, or two releases apart) fails deep inside timm with a bare `operator torchvision::nms does
not exist`; here it is one error naming both versions and the command that reinstalls a matching pair."""

from __future__ import annotations

import re
from importlib import metadata
from typing import Optional

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def matching_torchvision(torch_version: str) -> Optional[str]:
    """The torchvision release built for a torch release (torch 2.x.y pairs with torchvision 0.(x+15).y)."""
    m = re.match(r"^2\.(\d+)\.(\d+)", torch_version)
    return f"0.{int(m.group(1)) + 15}.{m.group(2)}" if m else None


def mismatch_message(torch_version: Optional[str], vision_version: Optional[str], error: str) -> str:
    """What is wrong and what to run, from the two installed versions and the import error."""
    base = (torch_version or "?").split("+")[0]
    want = matching_torchvision(base) if torch_version else None
    variant = (torch_version or "").partition("+")[2] or "the PyPI build"
    vision_variant = (vision_version or "").partition("+")[2] or "the PyPI build"
    why = []
    if want and vision_version and not vision_version.startswith(want.rsplit(".", 1)[0] + "."):
        why.append(f"torch {base} pairs with torchvision {want}")
    if variant != vision_variant:
        why.append(f"torch is {variant}, torchvision is {vision_variant}")
    reason = "; ".join(why) or "they were built for different torch releases or devices"
    pin = f"torch=={base} torchvision=={want}" if want else "torch torchvision"
    cpu = " --index-url " + CPU_INDEX if "cpu" in variant else ""
    return (f"torchvision {vision_version or '?'} does not work with torch {torch_version or '?'} ({reason}; the "
            f"import failed with: {error.splitlines()[0][:200] if error else 'an error'}). Reinstall both from one "
            f"index, together: pip install --force-reinstall {pin}{cpu}")


def check_torch_stack() -> None:
    """Import torchvision (and so torch) once; an ImportError naming both versions and the fix if they do not fit."""
    try:
        import torchvision  # noqa: F401  (timm imports it: a mismatch fails here first, in one named place)
    except ImportError as e:
        if "torchvision" in str(e) and _version("torchvision") is None:
            raise ImportError("medfound needs torchvision (timm imports it): pip install torchvision, from the same "
                              "index as your torch") from None
        raise ImportError(mismatch_message(_version("torch"), _version("torchvision"), str(e))) from None
    except (RuntimeError, AttributeError, OSError) as e:  # "operator torchvision::nms does not exist", a bad .so
        raise ImportError(mismatch_message(_version("torch"), _version("torchvision"), str(e))) from None

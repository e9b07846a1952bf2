"""What every verb module of the CLI shares: errors as one line, and the check that the torch stack loads."""

from __future__ import annotations

from medfound.env import check_torch_stack
from medfound.io import write_failure


def is_input_error(e: BaseException) -> bool:
    """A library's own error on bad input (unpickling, a tar, a safetensors header)."""
    import pickle
    import tarfile

    return isinstance(e, (pickle.UnpicklingError, tarfile.TarError)) or type(e).__name__ == "SafetensorError"


def one_line(e: BaseException) -> str:
    """The error as one line; a failed write (full disk, read-only) names the file and the fix."""

    reason = write_failure(e)
    if reason is not None and "writing checkpoint" not in str(e):
        where = getattr(e, "filename", None)
        return (f"{reason}{f' writing {where}' if where else ''}: free space or write elsewhere; outputs are written "
                "atomically, so what was there before is intact")
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename and str(e.filename) not in e.strerror else e.strerror
    if is_input_error(e):  # a library's message: its first line only
        text = str(e).strip()
        return f"{type(e).__name__}: {text.splitlines()[0][:500] if text else ''}"
    return str(e)


def torch_stack() -> None:
    """Before a verb that needs torch: a torchvision built for another torch is named here, with the fix."""

    check_torch_stack()


def print_push(push: dict) -> None:
    if push.get("dry_run"):
        print(f"dry run: would upload {len(push['files'])} files ({push['bytes']:,} bytes) to "
              f"{push['repo_id'] or '<REPO_ID>'}:")
        for f in push["files"]:
            print(f"  {f['path']}  {f['bytes']:,} bytes")
    else:
        print(f"uploaded {len(push['files'])} files ({push['bytes']:,} bytes) to {push['repo_id']}: {push['url']}")

"""Upload a published folder to the Hugging Face Hub (huggingface_hub), after `check_card` passes.

With no token the upload stops at once and says how to log in; with no network it fails within seconds (a plain
TCP connect to the Hub endpoint, `HF_ENDPOINT` respected) instead of hanging in retries. The folder on disk is
complete either way: push it later with `medfound card push DIR --repo ID`. `dry_run` lists the files that would
be uploaded and touches no network.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import medfound

from medfound.publish.check import check_card


def push_folder(folder: str | Path, repo_id: Optional[str], dry_run: bool = False, private: bool = False,
                timeout: float = 5.0) -> dict[str, Any]:

    folder = Path(folder)
    problems = check_card(folder)
    if problems:
        raise ValueError(f"{folder}: the card does not match the folder, so it is not pushed: " + "; ".join(problems))
    files = [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file()]
    summary = {"repo_id": repo_id, "files": files, "bytes": sum(f["bytes"] for f in files)}
    if dry_run:
        return {**summary, "dry_run": True}
    if not repo_id:
        raise ValueError("pushing needs a repo id, e.g. --push my-org/retina-vit")
    from huggingface_hub import HfApi, constants, get_token

    later = f"the folder {folder} is complete; push it later with `medfound card push {folder} --repo {repo_id}`"
    token = get_token()
    if not token:
        raise RuntimeError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {later}")
    endpoint = constants.ENDPOINT
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(f"cannot reach {endpoint} ({e.__class__.__name__}: {e}) within {timeout:g} s: no "
                              f"network from this machine? {later}") from None
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                               commit_message=f"medfound {medfound.__version__}: publish {folder.name}")
    return {**summary, "dry_run": False, "url": str(getattr(commit, "commit_url", commit))}

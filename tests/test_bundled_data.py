"""Every file shipped in data/ is attributed in data/README.md with its licence and current sha256."""

from __future__ import annotations

import fnmatch
import re

from medfound.io import sha256_file

from helpers import DATA


def test_every_bundled_file_is_listed_with_its_checksum():
    readme = (DATA / "README.md").read_text()
    listed = dict((path, sha) for sha, path in re.findall(r"^([0-9a-f]{64})  data/(\S+)$", readme, re.M))
    files = sorted(p.relative_to(DATA).as_posix() for p in DATA.rglob("*") if p.is_file() and p.name != "README.md")
    assert files and sorted(listed) == files
    for f in files:
        assert sha256_file(DATA / f) == listed[f], f"{f} changed: update data/README.md"
        rows = re.findall(r"`([^`]+)`", readme)
        assert any(fnmatch.fnmatch(f, r) for r in rows), f"{f} has no row (or pattern) in the attribution table"
    assert readme.count("CC BY 4.0") >= 2 and "CC0" in readme

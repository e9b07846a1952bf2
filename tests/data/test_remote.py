"""Shard sets on a web server and on S3: read, verified, trained on and evaluated exactly as from local disk.

Both servers are real and local: Python's HTTP server over a shard folder, and moto's S3-compatible server holding a
bucket, each started by this module on 127.0.0.1 and stopped by it. Credentials come from the environment only.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from medfound.cli import main
from medfound.data import location
from medfound.data.manifest import read_manifest, verify_shards
from medfound.data.pipeline import Decoding, make_loader, shard_urls
from medfound.data.tario import ShardError
from medfound.data.transforms import build_transform

from helpers import DATA, ROOT, tiny_pretrain_overrides

BUCKET = "medfound-test"
SETS = ("retina", "pneumonia", "he")


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path.startswith("/forbidden/"):
            self.send_error(403, "Forbidden")
            return
        super().do_GET()

    do_HEAD = do_GET


@pytest.fixture(scope="module")
def served(shards, tmp_path_factory):
    """An HTTP server on 127.0.0.1 over a folder holding the three bundled shard sets (and a damaged copy)."""
    root = tmp_path_factory.mktemp("www")
    for k in SETS:
        shutil.copytree(shards[k], root / k)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def s3(shards):
    """moto's S3 server on 127.0.0.1 with a bucket holding the three shard sets under sets/; the AWS_* environment
    points at it (as a user's would at their own endpoint)."""
    pytest.importorskip("s3fs", reason="s3:// shards need s3fs (pip install medfound[remote])")
    moto_server = pytest.importorskip("moto.server", reason="the S3 test server is moto[server] (medfound[dev])")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        for k in SETS:
            for f in sorted(Path(shards[k]).iterdir()):
                client.upload_file(str(f), BUCKET, f"sets/{k}/{f.name}")
        yield f"s3://{BUCKET}/sets", client
    server.stop()


def test_inspect_verifies_remote_sets_like_local_ones(shards, served, s3, capsys):
    http, _ = served
    for base in (http, s3[0]):
        for k in SETS:
            url = f"{base}/{k}"
            assert read_manifest(url).digest == read_manifest(shards[k]).digest
            assert verify_shards(url) == []
        assert main(["inspect", f"{base}/retina"]) == 0
        assert "all checksums verified" in capsys.readouterr().out


def test_a_damaged_remote_shard_is_named(shards, served):
    http, root = served
    bad = root / "damaged"
    shutil.copytree(shards["retina"], bad)
    first = sorted(bad.glob("train-*.tar"))[0]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF  # same size, other content: only sha256 sees it
    first.write_bytes(bytes(data))
    problems = verify_shards(f"{http}/damaged")
    assert len(problems) == 1 and f"{http}/damaged/{first.name}" in problems[0] and "sha256" in problems[0]
    cut = sorted(bad.glob("train-*.tar"))[1]
    cut.write_bytes(cut.read_bytes()[:-2048])  # truncated: the streaming `size` check refuses it before reading
    urls, _ = shard_urls([f"{http}/damaged"], "train")
    loader = make_loader([u for u in urls if u.endswith(cut.name)], Decoding(build_transform(
        "none", 32, (0.5,) * 3, (0.5,) * 3, train=False),
                                                                             labelled=True), batch_size=8)
    with pytest.raises(ShardError, match=f"{cut.name} is .* bytes, its manifest says"):
        next(iter(loader))


def test_two_workers_stream_every_remote_sample_once(shards, served):
    http, _ = served
    t = build_transform("none", 32, (0.5,) * 3, (0.5,) * 3, train=False)
    local, (m,) = shard_urls([shards["retina"]], "train")
    remote, _ = shard_urls([f"{http}/retina"], "train")
    kw = dict(batch_size=64, num_workers=2)
    keys_local = [k for b in make_loader(local, Decoding(t, labelled=True), **kw) for k in b["key"]]
    keys_remote = [k for b in make_loader(remote, Decoding(t, labelled=True), **kw) for k in b["key"]]
    assert keys_remote == keys_local and len(set(keys_remote)) == m.counts["by_split"]["train"]


def _pretrain_losses(sets: list[str], out: Path) -> list[float]:
    from medfound.config import load_recipe
    from medfound.workflows import run_pretrain

    shards = dict(zip(SETS, sets))
    recipe = load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml",
                         tiny_pretrain_overrides(shards, out, steps=3) + ["data.verify=sha256"])
    run_pretrain(recipe)
    return [json.loads(x)["loss"] for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_from_http_and_s3_matches_local_disk(shards, served, s3, tmp_path):
    local = _pretrain_losses([str(shards[k]) for k in SETS], tmp_path / "local")
    assert len(local) == 3
    assert _pretrain_losses([f"{served[0]}/{k}" for k in SETS], tmp_path / "http") == local
    assert _pretrain_losses([f"{s3[0]}/{k}" for k in SETS], tmp_path / "s3") == local
    recorded = (tmp_path / "s3" / "config.yaml").read_text()
    assert f"{s3[0]}/retina" in recorded and "testing" not in recorded  # the location, never a credential


def test_evaluation_of_remote_external_sets_matches_local(finetuned, shards, served, s3, tmp_path):
    from medfound.workflows import evaluate as evaluate_run

    run = tmp_path / "run"
    shutil.copytree(finetuned, run)
    results = {}
    for name, where in (("local", str(shards["pneumonia"])), ("http", f"{served[0]}/pneumonia"),
                        ("s3", f"{s3[0]}/pneumonia")):
        # a binary set against a 5-class model is refused, so score the retina set under three locations
        where = where.replace("pneumonia", "retina")
        report = evaluate_run(run, external=[where], out=tmp_path / name)
        (e,) = report["external"]
        assert e["path"] == where
        results[name] = (report["metrics"], e["metrics"], e["num_samples"])
    assert results["http"] == results["local"] and results["s3"] == results["local"]


def test_unreachable_locations_name_the_url_and_the_cause_quickly(served):
    http, _ = served
    port = int(http.rsplit(":", 1)[1])
    cases = [(f"http://127.0.0.1:{port + 1 if port < 65535 else port - 1}/sets/retina", "connection refused"),
             ("http://no-such-host.invalid/sets/retina", "no such host"),
             (f"{http}/forbidden/retina", "access denied"),
             (f"{http}/absent", "no manifest.json at")]
    for url, cause in cases:
        start = time.time()
        with pytest.raises(OSError) as err:
            read_manifest(url)
        assert time.time() - start < 10, url
        assert url in str(err.value) and cause in str(err.value), str(err.value)


def test_locations_that_could_run_code_or_leak_credentials_are_refused():
    from medfound.config import ConfigError, load_recipe

    for bad, why in (("pipe:curl http://x | sh", "never run"), ("https://user:secret@host/sets", "credentials"),
                     ("ftp://host/sets", "scheme 'ftp'"), ("https://host/sets?X-Amz-Signature=abc", "plain prefix")):
        with pytest.raises(ValueError, match=why) as err:
            location.check_location(bad)
        assert "secret" not in str(err.value)
    with pytest.raises(ConfigError, match="credentials") as err:
        load_recipe(ROOT / "pretrain" / "demo_mae_tiny.yaml", ["data.shards=[https://u:secret@host/a]"])
    assert "secret" not in str(err.value)


def test_shard_writes_straight_to_s3_and_overwrites_only_when_asked(shards, s3):
    from medfound.workflows import shard

    base, client = s3
    url = f"s3://{BUCKET}/written/retina"
    kw = dict(name="retinamnist", modality="fundus", label_type="ordinal",
              label_names=["no DR", "mild", "moderate", "severe", "proliferative"], license="CC-BY-4.0")
    manifest, _ = shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", url, max_count=128, **kw)
    assert manifest.digest == read_manifest(shards["retina"]).digest == read_manifest(url).digest
    assert verify_shards(url) == []
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", url, max_count=128, **kw)
    before = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="written/")["Contents"]}
    manifest, _ = shard("npz", DATA / "medmnist" / "retinamnist_demo.npz", url, max_count=512, overwrite=True, **kw)
    after = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="written/")["Contents"]}
    assert len(after) < len(before)  # the old set's unlisted shards are gone
    assert after == {"written/retina/manifest.json"} | {f"written/retina/{s.path}" for s in manifest.shards}
    assert verify_shards(url) == []


def test_extract_reads_tiles_from_a_web_server_like_local_disk(shards, served, pretrained, tmp_path):
    from medfound.adapt.extract import extract_bags

    local = extract_bags(shards["he"], pretrained / "export", tmp_path / "local")
    remote = extract_bags(f"{served[0]}/he", pretrained / "export", tmp_path / "remote")
    assert remote["digest"] == local["digest"] and remote["slides"] == local["slides"]
    assert remote["source"]["shards"] == f"{served[0]}/he"


_KILL_BEFORE_MANIFEST = """
import os, sys
reads = []
def hook(event, args):  # killed after every new shard is up, as the new manifest is opened for its upload: the
    # staged manifest is read twice, by upload_shard_set (to list the shards) and then by the upload itself
    if event == "open" and str(args[0]).endswith("/manifest.json") and args[1] == "r" and \\
            "medfound-shards-" in str(args[0]):
        reads.append(args[0])
        if len(reads) == 2:
            os._exit(137)
sys.addaudithook(hook)
from medfound.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_interrupted_remote_overwrite_leaves_the_old_set_whole(shards, s3):
    import subprocess
    import sys

    from medfound.workflows import shard

    base, client = s3
    url = f"s3://{BUCKET}/interrupted/retina"
    npz = DATA / "medmnist" / "retinamnist_demo.npz"
    old, _ = shard("npz", npz, url, name="retina", max_count=128)
    killed = subprocess.run([sys.executable, "-c", _KILL_BEFORE_MANIFEST, "shard", "npz", str(npz), "--out", url,
                             "--name", "retina", "--max-count", "100", "--overwrite"], cwd=ROOT, capture_output=True,
                            text=True)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert read_manifest(url).digest == old.digest and verify_shards(url) == []  # the old set, whole and readable
    new, _ = shard("npz", npz, url, name="retina", max_count=100, overwrite=True)
    assert verify_shards(url) == [] and read_manifest(url).digest == new.digest
    keys = {o["Key"].rsplit("/", 1)[1] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="interrupted/")["Contents"]}
    assert keys == {"manifest.json"} | {s.path for s in new.shards}  # the old set and the orphans are gone
    assert any(s.path.count(".") == 2 for s in new.shards)  # names the old set used for other bytes were not reused
    with pytest.raises(ValueError, match="--resume continues an ingest into a local folder"):
        shard("npz", npz, url, name="retina", resume=True, overwrite=True)


def test_parts_on_s3_merge_into_a_set_on_s3(s3, tmp_path):
    from medfound.data.shards import merge_parts
    from medfound.workflows import shard

    npz = DATA / "medmnist" / "retinamnist_demo.npz"
    parts = [f"s3://{BUCKET}/parts/retina_{i}" for i in range(2)]
    for i, url in enumerate(parts):
        shard("npz", npz, url, name="retina", part=f"{i}/2", max_count=100)
    whole, _ = shard("npz", npz, tmp_path / "whole", name="retina", max_count=100)
    merged = merge_parts(parts, f"s3://{BUCKET}/merged/retina")
    assert read_manifest(f"s3://{BUCKET}/merged/retina").digest == merged.digest
    assert merged.counts == whole.counts and verify_shards(f"s3://{BUCKET}/merged/retina") == []
    local = merge_parts(parts, tmp_path / "local")  # remote parts into a local set
    assert local.digest == merged.digest
    with pytest.raises(FileExistsError, match="already holds a shard set"):
        merge_parts(parts, f"s3://{BUCKET}/merged/retina")

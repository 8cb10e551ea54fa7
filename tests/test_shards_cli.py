"""``seqface shards build|info|verify`` as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image


def seqface(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seqface_dist.cli", "shards", *args],
                          capture_output=True, text=True, timeout=120)


def test_build_info_verify_and_tampering_is_caught(tmp_path):
    root = tmp_path / "faces"
    for i in range(3):
        os.makedirs(root / f"p{i}")
        for j in range(4):
            arr = (np.random.default_rng(10 * i + j).random((40, 30, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / f"p{i}" / f"{j}.jpg")
    (root / "p1" / "readme.md").write_text("hi")
    out = tmp_path / "shards"

    r = seqface("build", "identity-tree", str(root), str(out), "--image-size", "32x24",
                "--max-samples", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "3 classes, 12 samples in 3 shards" in r.stdout
    assert "p1/readme.md: not an image file" in r.stdout

    r = seqface("info", str(out))
    assert r.returncode == 0 and "N_id = 3" in r.stdout and "32x24" in r.stdout

    r = seqface("verify", str(out))
    assert r.returncode == 0 and r.stdout.strip().endswith("3 shards, 12 samples: OK")

    shard = out / "ids-000001.tar"
    data = bytearray(shard.read_bytes())
    data[1500] ^= 0x01  # one bit inside an image
    shard.write_bytes(bytes(data))
    r = seqface("verify", str(out))
    assert r.returncode == 1
    assert "FAIL" in r.stdout and "ids-000001.tar: sha256 differs" in r.stdout

    data[1500] ^= 0x01
    with tarfile.open(shard) as tf:  # the third sample's first header
        third = tf.getmembers()[4].offset
    # Its checksum: tarfile, and so webdataset's reader, takes that for the archive's end
    # and stops silently; the sample count against the manifest tells.
    data[third + 148] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = seqface("verify", str(out))
    assert r.returncode == 1
    assert "ids-000001.tar: 2 samples, manifest says 5" in r.stdout, r.stdout

    shard.unlink()
    r = seqface("verify", str(out))
    assert r.returncode == 1 and "ids-000001.tar: cannot read" in r.stdout

    r = seqface("build", "identity-tree", str(tmp_path / "nope"), str(out), "--no-progress")
    assert r.returncode == 1 and "nope: not a folder" in r.stderr

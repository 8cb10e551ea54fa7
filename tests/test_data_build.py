"""Shard building: identity/sequence trees, bad inputs, pass-through vs resize, resume,
idempotence, parallel determinism, and sets written from arrays."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from seqface_dist.data import build
from seqface_dist.data.build import BuildOptions, build_identity_tree, build_sequence_tree
from seqface_dist.data.manifest import PARTIAL_NAME, load_manifest, resolve_shard_set
from seqface_dist.data.samples import SampleStream

SIZE = (32, 24)  # height, width


def smooth_image(seed: int, h: int, w: int) -> np.ndarray:
    """A smooth colour gradient (JPEG keeps it close), different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a, b, c = rng.uniform(0.5, 4, 3)
    img = np.stack([np.sin(y / h * a + c) * 100 + 128, np.cos(x / w * b) * 100 + 128,
                    (y + x) / (h + w) * 200 + 20 * c], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, "JPEG", quality=95)


def shard_samples(path: str) -> list[tuple[str, bytes, dict]]:
    out, cur = [], {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            cur.setdefault(key, {})[ext] = t.extractfile(m).read()
    for key, d in cur.items():
        out.append((key, d["jpg"], json.loads(d["json"])))
    return out


@pytest.fixture
def identity_tree(tmp_path):
    root = tmp_path / "ids"
    n = 0
    for ident in ["carol", "alice", "bob", "dave"]:
        for j in range(5):
            save_jpeg(str(root / ident / f"{j:03d}.jpg"), smooth_image(n, *SIZE))
            n += 1
    # Bad inputs of every kind the builder must skip and list.
    (root / "alice" / "notes.txt").write_text("not an image")
    (root / "bob" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (root / "empty").mkdir()
    (root / "stray.jpg").write_bytes((root / "alice" / "000.jpg").read_bytes())
    outside = tmp_path / "outside.jpg"
    save_jpeg(str(outside), smooth_image(99, *SIZE))
    os.symlink(outside, root / "carol" / "link.jpg")
    return root


def test_identity_tree_builds_skips_bad_inputs_and_maps_sorted_labels(identity_tree, tmp_path):
    out = str(tmp_path / "out")
    rep = build_identity_tree(str(identity_tree), out,
                              BuildOptions(image_size=SIZE, max_samples=6, progress=False))
    m = load_manifest(os.path.join(out, "manifest.json"))
    assert m.kind == "identity" and m.num_classes == 4 and m.num_samples == 20
    assert m.label_map == {"alice": 0, "bob": 1, "carol": 2, "dave": 3}
    # 21 listed images in shards of 6; the undecodable one is dropped by its shard's worker.
    assert len(m.shards) == 4 and sum(s.count for s in m.shards) == 20
    reasons = {p.source: p.reason for p in rep.problems}
    assert reasons["alice/notes.txt"] == "not an image file"
    assert reasons["bob/broken.jpg"].startswith("unreadable image")
    assert reasons["empty/"].startswith("empty folder")
    assert reasons["stray.jpg"] == "not inside an identity folder"
    assert reasons["carol/link.jpg"] == "escapes the root"
    assert len(reasons) == 5
    on_disk = json.loads(open(os.path.join(out, "build_report.json")).read())["skipped"]
    assert sorted(map(tuple, on_disk)) == sorted((p.source, p.reason) for p in rep.problems)
    # Every sample's json index agrees with its source folder through the label map.
    seen = []
    for s in m.shards:
        for _, _, meta in shard_samples(os.path.join(out, s.name)):
            assert meta["kind"] == "identity"
            assert meta["index"] == m.label_map[meta["source"].split("/")[0]]
            seen.append(meta["source"])
    assert len(seen) == len(set(seen)) == 20


@pytest.mark.timeout(120)
def test_a_fifo_named_like_an_image_is_skipped_not_read(identity_tree, tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: the builder must not try.
    os.mkfifo(identity_tree / "dave" / "pipe.jpg")
    out = str(tmp_path / "out")
    rep = build_identity_tree(str(identity_tree), out,
                              BuildOptions(image_size=SIZE, max_samples=6, progress=False))
    reasons = {p.source: p.reason for p in rep.problems}
    assert reasons["dave/pipe.jpg"] == "not a regular file"
    assert load_manifest(os.path.join(out, "manifest.json")).num_samples == 20


def test_right_size_jpegs_pass_through_others_are_resized(tmp_path):
    root = tmp_path / "ids"
    right = smooth_image(1, *SIZE)
    save_jpeg(str(root / "a" / "right.jpg"), right)
    save_jpeg(str(root / "a" / "big.jpg"), smooth_image(2, 64, 48))
    Image.fromarray(smooth_image(3, *SIZE)).save(root / "a" / "png.png")
    out = str(tmp_path / "out")
    build_identity_tree(str(root), out, BuildOptions(image_size=SIZE, progress=False))
    shard = os.path.join(out, "ids-000000.tar")
    samples = {meta["source"]: jpg for _, jpg, meta in shard_samples(shard)}
    assert samples["a/right.jpg"] == (root / "a" / "right.jpg").read_bytes()
    for name in ("a/big.jpg", "a/png.png"):
        with Image.open(io.BytesIO(samples[name])) as im:
            assert im.format == "JPEG" and im.size == (SIZE[1], SIZE[0]) and im.mode == "RGB"


def test_rebuild_is_idempotent_and_a_change_rewrites_only_its_shard(identity_tree, tmp_path):
    out = tmp_path / "out"
    opts = BuildOptions(image_size=SIZE, max_samples=6, progress=False)
    first = build_identity_tree(str(identity_tree), str(out), opts)
    assert len(first.written) == 4
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = build_identity_tree(str(identity_tree), str(out), opts)
    assert again.written == [] and len(again.reused) == 4
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # Change one image: only the shard holding it is rewritten.
    target = identity_tree / "dave" / "002.jpg"
    save_jpeg(str(target), smooth_image(1234, *SIZE))
    os.utime(target, ns=(1, 1))
    third = build_identity_tree(str(identity_tree), str(out), opts)
    holder = [s.name for s in first.manifest.shards
              for _, _, meta in shard_samples(str(out / s.name))
              if meta["source"] == "dave/002.jpg"]
    assert third.written == holder


def test_interrupted_build_resumes_where_it_stopped(identity_tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    opts = BuildOptions(image_size=SIZE, max_samples=6, progress=False)
    real = build._write_shard

    def dies_on_third(job):
        if job["shard_index"] == 2:
            raise KeyboardInterrupt("simulated kill")
        return real(job)

    monkeypatch.setattr(build, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_identity_tree(str(identity_tree), str(out), opts)
    assert not (out / "manifest.json").exists()  # nothing looks complete
    assert (out / PARTIAL_NAME).exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]  # no half shards
    monkeypatch.setattr(build, "_write_shard", real)
    rep = build_identity_tree(str(identity_tree), str(out), opts)
    assert rep.reused == ["ids-000000.tar", "ids-000001.tar"]
    assert rep.written == ["ids-000002.tar", "ids-000003.tar"]
    assert not (out / PARTIAL_NAME).exists()
    # Same bytes as an uninterrupted build.
    clean = build_identity_tree(str(identity_tree), str(tmp_path / "clean"), opts)
    assert [s.sha256 for s in rep.manifest.shards] == [s.sha256 for s in clean.manifest.shards]


def test_parallel_build_writes_the_same_bytes(identity_tree, tmp_path):
    serial = build_identity_tree(str(identity_tree), str(tmp_path / "a"),
                                 BuildOptions(image_size=SIZE, max_samples=4, progress=False))
    par = build_identity_tree(str(identity_tree), str(tmp_path / "b"),
                              BuildOptions(image_size=SIZE, max_samples=4, workers=2,
                                           progress=False))
    assert [s.sha256 for s in par.manifest.shards] == [s.sha256 for s in serial.manifest.shards]
    assert len(par.manifest.shards) == 6  # 21 listed images, 4 per shard


def test_sequence_tree_labels_are_track_folders_at_either_depth(tmp_path):
    root = tmp_path / "seqs"
    n = 0
    for track in ["vid1/t0", "vid1/t1", "vid0/t0", "solo"]:
        for j in range(3):
            save_jpeg(str(root / track / f"f{j}.jpg"), smooth_image(n, *SIZE))
            n += 1
    out = str(tmp_path / "out")
    rep = build_sequence_tree(str(root), out, BuildOptions(image_size=SIZE, progress=False))
    m = rep.manifest
    assert m.kind == "sequence" and m.num_classes == 4
    assert m.label_map == {"solo": 0, "vid0/t0": 1, "vid1/t0": 2, "vid1/t1": 3}
    got = sorted((s["center"], s["key"]) for s in SampleStream([resolve_shard_set(out)]))
    assert [c for c, _ in got] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_write_shard_set_from_arrays_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    digits = [(int(rng.integers(0, 10)), smooth_image(i, 28, 28)[:, :, 0]) for i in range(50)]
    out = str(tmp_path / "mnist")
    m = build.write_shard_set(digits, out, "identity", num_classes=10, max_samples=16)
    assert [s.count for s in m.shards] == [16, 16, 16, 2]
    assert m.image_size == [28, 28] and m.channels == 1 and m.num_classes == 10
    got = sorted(SampleStream([resolve_shard_set(out)]), key=lambda s: s["key"])
    assert [s["center"] for s in got] == [lab for lab, _ in digits]
    for s, (_, arr) in zip(got, digits, strict=True):
        assert s["image"].shape == (28, 28, 1)
        err = np.abs(s["image"][:, :, 0].astype(int) - arr.astype(int))
        assert err.mean() < 2.0  # JPEG q95 of a smooth image: close, not exact
    with pytest.raises(build.BuildError, match="index 12"):
        build.write_shard_set([(12, digits[0][1])], str(tmp_path / "bad"), "identity",
                              num_classes=10)

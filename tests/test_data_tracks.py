"""``seqface shards tracks``: detector boxes linked into tracks, aligned, then shards."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from seqface_dist.data.tracks import (
    ARCFACE_112,
    Detection,
    TrackOptions,
    crop,
    link_tracks,
    similarity_transform,
    template,
)


def seqface(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seqface_dist.cli", "shards", *args],
                          capture_output=True, text=True, timeout=120)


def similarity(scale: float, angle: float, shift: tuple[float, float]) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def test_similarity_transform_recovers_a_known_one():
    m = similarity(1.7, 0.4, (30.0, -12.0))
    got = similarity_transform(ARCFACE_112, apply(m, ARCFACE_112))
    np.testing.assert_allclose(got, m, atol=1e-9)
    # A reflection is not a similarity: the fit stays a rotation.
    mirrored = ARCFACE_112 * [-1, 1]
    r = similarity_transform(ARCFACE_112, mirrored)[:, :2]
    assert np.linalg.det(r) > 0


def test_templates_are_arcface_and_sphereface():
    np.testing.assert_allclose(template((112, 112)), ARCFACE_112)
    np.testing.assert_allclose(template((112, 96)), ARCFACE_112 - [8.0, 0.0])  # SphereFace
    np.testing.assert_allclose(template((224, 224)), 2 * ARCFACE_112)


def det(order: int, x: float, y: float = 50.0, w: float = 40.0) -> Detection:
    return Detection(f"{order:04d}", order, np.array([x, y, x + w, y + w]), None)


def test_iou_tracker_links_follows_bridges_gaps_and_splits_beyond_them():
    a = [det(t, 10 + 3 * t) for t in range(10) if t != 5]  # moves right, missed at t = 5
    b = [det(t, 200, 60) for t in range(10)]  # stands still elsewhere
    noise = [det(3, 400, 300)]
    tracks = link_tracks(a + b + noise, TrackOptions(max_gap=1))
    got = sorted(sorted(d.order for d in t) for t in tracks)
    assert got == sorted([[t for t in range(10) if t != 5], list(range(10)), [3]])
    # No gap allowed: a splits at the missed frame.
    split = link_tracks(a, TrackOptions(max_gap=0))
    assert sorted(len(t) for t in split) == [4, 5]
    # Two faces in one frame never join one track.
    same_frame = link_tracks([det(0, 10), det(0, 14), det(1, 12)], TrackOptions())
    assert sorted(len(t) for t in same_frame) == [1, 2]


def dots_image(points: np.ndarray, size=(320, 240)) -> Image.Image:
    im = Image.new("RGB", size, (0, 0, 0))
    draw = ImageDraw.Draw(im)
    for x, y in points:
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255))
    return im


def centroids(arr: np.ndarray, near: np.ndarray, radius: int = 8) -> np.ndarray:
    out = []
    ys, xs = np.mgrid[: arr.shape[0], : arr.shape[1]]
    for x, y in near:
        mask = (np.abs(xs - x) <= radius) & (np.abs(ys - y) <= radius)
        w = arr * mask
        out.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    return np.array(out)


@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_alignment_puts_the_landmarks_on_the_template(size):
    m = similarity(1.6, -0.3, (90.0, 40.0))
    lms = apply(m, ARCFACE_112)  # a tilted, larger face somewhere in the frame
    face = crop(dots_image(lms), Detection("0", 0, np.array([0, 0, 1, 1]), lms),
                TrackOptions(size=size))
    assert face.size == (size[1], size[0])
    arr = np.asarray(face.convert("L"), dtype=np.float64)
    found = centroids(arr, template(size))
    np.testing.assert_allclose(found, template(size), atol=1.0)


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def write_video(root: Path, name: str, frames: int, faces) -> list[dict]:
    """Frames with a coloured square per face; returns the detector's rows."""
    rows = []
    (root / name).mkdir(parents=True)
    for t in range(frames):
        im = Image.new("RGB", (320, 240), (40, 40, 40))
        draw = ImageDraw.Draw(im)
        for colour, (x, y) in faces(t):
            draw.rectangle([x, y, x + 60, y + 60], fill=colour)
            rows.append({"video": name, "frame": str(t + 1), "x1": x, "y1": y,
                         "x2": x + 60, "y2": y + 60, "score": 0.99})
        im.save(root / name / f"{t + 1:06d}.jpg")
    return rows


def test_tracks_cli_to_a_sequence_shard_set(tmp_path):
    frames = tmp_path / "frames"
    red, blue = (220, 30, 30), (30, 30, 220)
    rows = write_video(frames, "clip1", 8, lambda t: [(red, (20 + 4 * t, 40)),
                                                      (blue, (220, 120))])
    rows += write_video(frames, "clip2", 3, lambda t: [(red, (100, 100))])  # too short
    rows.append({"video": "clip1", "frame": "99", "x1": 0, "y1": 0, "x2": 9, "y2": 9,
                 "score": 1})  # a frame that does not exist
    dets = write_csv(tmp_path / "dets.csv", rows)

    out = tmp_path / "tracks"
    r = seqface("tracks", str(frames), str(dets), str(out), "--min-len", "5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "2 videos, 19 detections -> 2 tracks (16 crops; 1 tracks shorter" in r.stdout
    assert "dets.csv:21: no frame '99' in clip1/" in r.stdout
    tracks = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*"))
    assert tracks == ["clip1/t0000", "clip1/t0001"]
    for track in tracks:
        crops = sorted((out / track).glob("*.jpg"))
        assert len(crops) == 8 and Image.open(crops[0]).size == (112, 112)
        colours = {tuple(np.asarray(Image.open(c))[56, 56] // 64) for c in crops}
        assert len(colours) == 1, f"{track} mixes faces: {colours}"  # one face per track

    shards = tmp_path / "shards"
    r = seqface("build", "sequence-tree", str(out), str(shards), "--no-progress")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["num_classes"] == 2 and sum(s["count"] for s in manifest["shards"]) == 16
    assert manifest["image_size"] == [112, 112]  # the default keeps the crops' size


def test_tracks_cli_refuses_a_csv_without_boxes(tmp_path):
    (tmp_path / "frames").mkdir()
    bad = tmp_path / "d.csv"
    bad.write_text("video,frame,left,top\nv,1,0,0\n")
    r = seqface("tracks", str(tmp_path / "frames"), str(bad), str(tmp_path / "o"))
    assert r.returncode == 1 and "d.csv: the header must name" in r.stderr


def test_a_box_at_the_frame_edge_is_padded_not_refused():
    im = Image.new("RGB", (50, 50), (200, 200, 200))
    face = crop(im, Detection("0", 0, np.array([0.0, 0.0, 20.0, 20.0]), None),
                TrackOptions(size=(32, 32), margin=0.5))
    arr = np.asarray(face)
    assert face.size == (32, 32)
    assert arr[0, 0].max() < 10 and arr[-1, -1].min() > 150  # black past the edge, face inside


def test_align_cli_aligns_photos_keeping_the_identity_tree(tmp_path):
    photos = tmp_path / "photos"
    rows = []
    for person, (scale, angle) in {"ann": (1.5, 0.2), "bob": (2.0, -0.35)}.items():
        (photos / person).mkdir(parents=True)
        lms = apply(similarity(scale, angle, (60.0, 20.0)), ARCFACE_112 - [8.0, 0.0])
        dots_image(lms).save(photos / person / "1.png")
        rows.append({"image": f"{person}/1.png", **{f"l{a}{k}": lms[k][i]
                                                     for k in range(5)
                                                     for i, a in enumerate("xy")}})
    rows.append({**rows[0]})  # a second face in ann/1.png
    rows.append({**rows[0], "image": "../outside.png"})  # never read
    faces = write_csv(tmp_path / "faces.csv", rows)

    out = tmp_path / "aligned"
    r = seqface("align", str(photos), str(faces), str(out), "--size", "112x96",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "4 faces listed -> 3 crops written (1 problems)" in r.stdout, r.stdout
    assert "no image '../outside.png'" in r.stdout
    got = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert got == ["ann/1.jpg", "ann/1_1.jpg", "bob/1.jpg"]
    for crop_path in got:
        arr = np.asarray(Image.open(out / crop_path).convert("L"), dtype=np.float64)
        assert arr.shape == (112, 96)
        np.testing.assert_allclose(centroids(arr, template((112, 96))), template((112, 96)),
                                   atol=1.5)
    r = seqface("build", "identity-tree", str(out), str(tmp_path / "ids"), "--no-progress")
    assert r.returncode == 0 and "2 classes, 3 samples" in r.stdout, r.stdout + r.stderr

"""Video verification: feature pooling by hand, the splits reader, and the full protocol."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from seqface_dist.cli import main
from seqface_dist.eval.evaluate import evaluate_video_model
from seqface_dist.eval.video import (
    evaluate_video_pairs,
    pool_video,
    pool_videos,
    read_video_splits,
    video_frames,
)


def test_pool_video_by_hand() -> None:
    # Frames (3,4), (1,0), (0,2) normalise to (.6,.8), (1,0), (0,1); their mean is
    # (1.6, 1.8) / 3, normalised: (1.6, 1.8) / sqrt(1.6^2 + 1.8^2).
    got = pool_video(np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]]))
    n = math.sqrt(1.6**2 + 1.8**2)
    np.testing.assert_allclose(got, [1.6 / n, 1.8 / n], rtol=1e-12)
    # Not the normalised mean of raw features, (4, 6) / |(4, 6)|.
    assert not np.allclose(got, np.array([4.0, 6.0]) / math.sqrt(52))


def test_pool_videos_groups_frames_by_index() -> None:
    feats = np.array([[3.0, 4.0], [5.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 7.0]])
    owner = np.array([0, 1, 0, 0, 1])
    got = pool_videos(feats, owner)
    np.testing.assert_allclose(got[0], pool_video(feats[[0, 2, 3]]))
    np.testing.assert_allclose(got[1], [math.sqrt(0.5), math.sqrt(0.5)])
    with pytest.raises(ValueError, match="video 0 has no frames"):
        pool_videos(feats[:1], np.array([2]))
    with pytest.raises(ValueError, match="n_frames >= 1"):
        pool_video(np.zeros((0, 3)))


def _splits(path: Path, n_split: int = 10, per: int = 4) -> None:
    # Person k has videos k/0 and k/1; matched pairs (k/0, k/1), mismatched (k/0, k+1/1).
    lines = ["split number, first name, second name, is same person, is same"]
    for s in range(n_split):
        for j in range(per):
            k = (s * per + j) % 6
            same = j % 2 == 0
            other = k if same else (k + 1) % 6
            lines.append(f"{s + 1}, P{k}/0, P{other}/1, {int(same)}, {int(same)}")
    path.write_text("\n".join(lines) + "\n")


def test_read_video_splits_and_protocol(tmp_path: Path) -> None:
    _splits(tmp_path / "splits.txt")
    vp = read_video_splits(tmp_path / "splits.txt")
    assert len(vp) == 40 and vp.folds.tolist() == sorted(vp.folds.tolist())
    assert set(vp.folds.tolist()) == set(range(1, 11))
    assert (vp.video1[0], vp.video2[0], bool(vp.issame[0])) == ("P0/0", "P0/1", True)
    assert (vp.video1[1], vp.video2[1], bool(vp.issame[1])) == ("P1/0", "P2/1", False)
    # One direction per person, its two videos near it: separable.
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(6, 16))
    feats = {f"P{k}/{v}": pool_video(dirs[k] + 0.05 * rng.normal(size=(5, 16)))
             for k in range(6) for v in (0, 1)}
    res = evaluate_video_pairs(feats, vp)
    assert res.accuracy == 1.0 and len(res.fold_accuracies) == 10
    del feats["P2/1"]
    with pytest.raises(KeyError, match="P2/1"):
        evaluate_video_pairs(feats, vp)
    (tmp_path / "bad.txt").write_text("1, a/0, b/0, 2\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        read_video_splits(tmp_path / "bad.txt")


class ColorNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_size = (8, 8)
        self.w = nn.Parameter(torch.eye(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ self.w


COLORS = [(250, 5, 5), (5, 250, 5), (5, 5, 250), (250, 250, 5), (5, 250, 250), (250, 5, 250)]


def test_video_model_end_to_end(tmp_path: Path, capsys) -> None:
    _splits(tmp_path / "splits.txt")
    rng = np.random.default_rng(1)
    for k, rgb in enumerate(COLORS):
        for v in (0, 1):
            d = tmp_path / "frames" / f"P{k}" / str(v)
            d.mkdir(parents=True)
            for i in range(4):
                arr = np.clip(np.array(rgb) + rng.integers(-5, 6, (8, 8, 3)), 0, 255)
                Image.fromarray(arr.astype(np.uint8)).save(d / f"{i}.png")
    assert len(video_frames(tmp_path / "frames", "P0/0", max_frames=2)) == 2
    vp = read_video_splits(tmp_path / "splits.txt")
    res = evaluate_video_model(ColorNet(), vp, tmp_path / "frames", progress=False)
    assert res.accuracy == 1.0

    torch.jit.script(ColorNet()).save(str(tmp_path / "m.pt"))
    rc = main(["eval", "video", "--model", str(tmp_path / "m.pt"), "--trust-model", "--splits",
               str(tmp_path / "splits.txt"), "--root", str(tmp_path / "frames"),
               "--max-frames", "3", "--no-progress"])
    assert rc == 0 and "10-fold accuracy: 1.0000" in capsys.readouterr().out

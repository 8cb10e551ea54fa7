"""Video verification, YouTube-Faces style: one feature per video, pairs in 10 splits.

A video's feature is the L2-normalised mean of its frames' L2-normalised features
(normalising the frames first stops one high-norm frame from dominating the mean).

    feats = {v: pool_video(frame_feats[v]) for v in videos}
    res = evaluate_video_pairs(feats, read_video_splits("splits.txt"))

The split file is read as comma-separated lines ``split, video1, video2, ..., issame``
(YouTube Faces' ``splits.txt``: split number, the two video names such as
``Aaron_Eckhart/0``, and the same/different flag last); a header line is skipped. The
split number is the fold of the 10-fold protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqface_dist.eval.pairs import IMAGE_EXTS
from seqface_dist.eval.verification import (
    DEFAULT_FARS,
    VerificationResult,
    evaluate_scores,
    l2_normalize,
)


def pool_video(frame_features: np.ndarray) -> np.ndarray:
    """(n_frames, D) -> (D,): normalise each frame, average, normalise the mean."""
    f = np.asarray(frame_features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"pool_video: need (n_frames >= 1, D) features, got shape {f.shape}")
    return l2_normalize(l2_normalize(f, axis=1).mean(axis=0))


def pool_videos(features: np.ndarray, video_index: np.ndarray) -> np.ndarray:
    """Features of many frames with each frame's video index -> (n_videos, D), in order."""
    features = np.asarray(features, dtype=np.float64)
    video_index = np.asarray(video_index).reshape(-1)
    if features.ndim != 2 or features.shape[0] != video_index.size:
        raise ValueError(f"pool_videos: {features.shape[0] if features.ndim else 0} "
                         f"features for {video_index.size} frame indices")
    n = int(video_index.max()) + 1 if video_index.size else 0
    missing = np.setdiff1d(np.arange(n), video_index)
    if missing.size:
        raise ValueError(f"pool_videos: video {int(missing[0])} has no frames")
    return np.stack([pool_video(features[video_index == v]) for v in range(n)])


@dataclass
class VideoPairs:
    video1: list[str]
    video2: list[str]
    issame: np.ndarray  # (n,) bool
    folds: np.ndarray  # (n,) int, the split of each pair

    def __len__(self) -> int:
        return len(self.video1)

    def videos(self) -> list[str]:
        """Every video named by a pair, each once, in first-seen order."""
        return list(dict.fromkeys(v for ab in zip(self.video1, self.video2, strict=True)
                                  for v in ab))


def read_video_splits(path: str | Path) -> VideoPairs:
    """Read a YouTube-Faces-style ``splits.txt`` (see the module docstring)."""
    path = Path(path)
    v1: list[str] = []
    v2: list[str] = []
    same: list[bool] = []
    folds: list[int] = []
    for lineno, ln in enumerate(path.read_text().splitlines(), start=1):
        f = [x.strip() for x in ln.split(",")]
        if not ln.strip():
            continue
        try:
            split = int(f[0])
        except ValueError:
            if lineno == 1:
                continue  # header
            raise ValueError(f"{path}:{lineno}: split number expected, got {f[0]!r}") from None
        if len(f) < 4 or f[-1] not in ("0", "1"):
            raise ValueError(f"{path}:{lineno}: expected 'split, video1, video2, ..., "
                             f"issame(0/1)', got {ln!r}")
        v1.append(f[1])
        v2.append(f[2])
        same.append(f[-1] == "1")
        folds.append(split)
    if not v1:
        raise ValueError(f"{path}: no video pairs")
    return VideoPairs(v1, v2, np.asarray(same, dtype=bool), np.asarray(folds))


def video_frames(root: str | Path, video: str, max_frames: int = 0) -> list[Path]:
    """The image files of ``root/video`` (sorted); at most ``max_frames``, evenly spaced."""
    folder = Path(root) / video
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} not found")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not frames:
        raise FileNotFoundError(f"video folder {folder} holds no images")
    if max_frames and len(frames) > max_frames:
        pick = np.linspace(0, len(frames) - 1, max_frames).round().astype(int)
        frames = [frames[i] for i in pick]
    return frames


def evaluate_video_pairs(video_features: Mapping[str, np.ndarray], pairs: VideoPairs,
                         far_targets: tuple[float, ...] = DEFAULT_FARS) -> VerificationResult:
    """The 10-fold protocol on video pairs; ``video_features`` holds pooled features."""
    missing = [v for v in pairs.videos() if v not in video_features]
    if missing:
        raise KeyError(f"no features for video {missing[0]!r} ({len(missing)} missing)")
    a = np.stack([l2_normalize(video_features[v]) for v in pairs.video1])
    b = np.stack([l2_normalize(video_features[v]) for v in pairs.video2])
    return evaluate_scores(np.sum(a * b, axis=1), pairs.issame, folds=pairs.folds,
                           far_targets=far_targets)

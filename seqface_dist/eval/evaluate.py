"""Model -> verification result, on a pairs set loaded once and evaluated many times.

    vset = load_verification_set("lfw/pairs.txt", root="lfw/images")   # or "lfw.bin"
    res = evaluate_model(net, vset, flip=True)                          # VerificationResult
    log.info(res.summary()); metrics.update(res.metrics(prefix=f"{vset.name}_"))

The trainer's rank 0 loads the set at start-up and calls :func:`evaluate_model` every N
steps with its backbone (``engine.module``); the model's train/eval mode is restored.
Each distinct image is embedded once, however many pairs use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from seqface_dist.eval.embed import ImageSource, embed_images
from seqface_dist.eval.pairs import read_bin, read_lfw_pairs
from seqface_dist.eval.verification import (
    DEFAULT_FARS,
    VerificationResult,
    cosine_scores,
    evaluate_scores,
)
from seqface_dist.eval.video import VideoPairs, evaluate_video_pairs, pool_videos, video_frames


@dataclass
class VerificationSet:
    """Distinct images and the pairs over them: pair i is (images[idx1[i]], images[idx2[i]])."""

    name: str
    images: list[ImageSource]
    idx1: np.ndarray
    idx2: np.ndarray
    issame: np.ndarray
    folds: np.ndarray | None  # None: 10 contiguous folds

    def __len__(self) -> int:
        return len(self.issame)


def load_verification_set(path: str | Path, root: str | Path | None = None) -> VerificationSet:
    """A ``.bin`` file, or an LFW-style ``pairs.txt`` whose images live under ``root``."""
    path = Path(path)
    if path.suffix == ".bin":
        b = read_bin(path)
        n = len(b)
        return VerificationSet(path.stem, list(b.images), np.arange(0, 2 * n, 2),
                               np.arange(1, 2 * n, 2), b.issame, None)
    if root is None:
        raise ValueError(f"{path}: a pairs list needs the image root folder (--root)")
    pl = read_lfw_pairs(path, root)
    index: dict[Path, int] = {}
    for p in pl.path1 + pl.path2:
        index.setdefault(p, len(index))
    return VerificationSet(Path(root).name or path.stem, list(index),
                           np.asarray([index[p] for p in pl.path1]),
                           np.asarray([index[p] for p in pl.path2]), pl.issame, pl.folds)


def evaluate_model(model: nn.Module, vset: VerificationSet, *, flip: bool = True,
                   batch_size: int = 64, input_size: Sequence[int] | None = None,
                   far_targets: Sequence[float] = DEFAULT_FARS, progress: bool = True,
                   **embed_kw: object) -> VerificationResult:
    """Embed the set's images and run the 10-fold protocol on cosine scores."""
    feats = embed_images(model, vset.images, flip=flip, batch_size=batch_size,
                         input_size=input_size, progress=progress, desc=vset.name,
                         **embed_kw)
    scores = cosine_scores(feats[vset.idx1], feats[vset.idx2])
    return evaluate_scores(scores, vset.issame, folds=vset.folds, far_targets=far_targets)


def evaluate_video_model(model: nn.Module, pairs: VideoPairs, root: str | Path, *,
                         max_frames: int = 0, flip: bool = False, batch_size: int = 64,
                         input_size: Sequence[int] | None = None,
                         far_targets: Sequence[float] = DEFAULT_FARS, progress: bool = True,
                         **embed_kw: object) -> VerificationResult:
    """Embed each video's frames (``root/<video>/*``), pool per video, 10-fold protocol."""
    videos = pairs.videos()
    frames: list[Path] = []
    owner: list[int] = []
    for i, v in enumerate(videos):
        fs = video_frames(root, v, max_frames)
        frames += fs
        owner += [i] * len(fs)
    feats = embed_images(model, frames, flip=flip, batch_size=batch_size,
                         input_size=input_size, progress=progress, desc="video frames",
                         **embed_kw)
    pooled = pool_videos(feats, np.asarray(owner))
    return evaluate_video_pairs(dict(zip(videos, pooled, strict=True)), pairs,
                                far_targets=tuple(far_targets))

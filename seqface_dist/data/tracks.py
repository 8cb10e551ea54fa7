"""Face tracks from videos: a detector's boxes linked into tracks, cropped, aligned; and
the same crop or alignment for photos (``seqface shards align``).

``seqface shards tracks FRAMES DETECTIONS OUT`` turns

- ``FRAMES/<video>/<frame>.jpg`` (e.g. ``ffmpeg -i v.mp4 FRAMES/v/%06d.jpg``), and
- ``DETECTIONS``: a CSV, one face a row, from any detector run by the user::

      video,frame,x1,y1,x2,y2[,score][,track][,lx0,ly0,...,lx4,ly4]

  ``frame`` names the file in ``FRAMES/<video>/`` (with or without its extension);
  ``track`` (optional) is a given track id: rows are then grouped by it and not tracked;
  the ten landmark columns (optional: left eye, right eye, nose, left and right mouth
  corner, as RetinaFace/SCRFD give them) switch the crop to a 5-point alignment.

into ``OUT/<video>/<track>/<frame>.jpg``, the layout ``seqface shards build
sequence-tree`` reads (one sequence label per ``video/track``).

Tracking (when no ``track`` column is given) is the plain IoU tracker: frames in order,
each detection joins the live track whose last box overlaps it most (IoU >= ``iou``,
greedy, best pair first); a track not continued for more than ``max_gap`` frames ends;
tracks shorter than ``min_len`` are dropped (a face seen for a moment is noise, not a
sequence). Crops: with landmarks, the similarity transform (Umeyama, least squares) that
maps them onto the standard 5-point template of arcface's 112x112 crop (scaled to the
requested size, and for 112x96 SphereFace's template: the same points 8 px further left);
without, the box enlarged to a square by ``margin`` and resized.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# insightface's arcface 112x112 template (eyes, nose, mouth corners), in pixels.
ARCFACE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


@dataclass
class Detection:
    frame: str  # the frame's file stem
    order: int  # its place in the video's frame order
    box: np.ndarray  # x1, y1, x2, y2
    landmarks: np.ndarray | None  # (5, 2) or None
    track: str | None = None  # a given track id


@dataclass
class TrackOptions:
    iou: float = 0.5  # link a box to the track whose last box overlaps it this much
    max_gap: int = 2  # frames a track may miss before it ends
    min_len: int = 5  # shorter tracks are dropped
    min_score: float = 0.0  # detections scored below this are ignored
    margin: float = 0.2  # share of the box added on every side (crops without landmarks)
    size: tuple[int, int] = (112, 112)  # height, width of the crops
    quality: int = 95


@dataclass
class TrackReport:
    videos: int = 0
    detections: int = 0
    tracks: int = 0
    frames_written: int = 0
    dropped_short: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.videos} videos, {self.detections} detections -> {self.tracks} tracks "
                f"({self.frames_written} crops; {self.dropped_short} tracks shorter than "
                f"min_len dropped; {len(self.problems)} problems)")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two x1, y1, x2, y2 boxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_tracks(dets: list[Detection], opts: TrackOptions) -> list[list[Detection]]:
    """One video's detections linked into tracks by IoU (see the module doc)."""
    by_frame: dict[int, list[Detection]] = defaultdict(list)
    for d in dets:
        by_frame[d.order].append(d)
    live: list[list[Detection]] = []
    done: list[list[Detection]] = []
    for order in sorted(by_frame):
        ended = [t for t in live if order - t[-1].order > opts.max_gap + 1]
        done += ended
        live = [t for t in live if order - t[-1].order <= opts.max_gap + 1]
        pairs = sorted(((iou(t[-1].box, d.box), ti, di) for ti, t in enumerate(live)
                        for di, d in enumerate(by_frame[order])), reverse=True)
        used_t, used_d = set(), set()
        for overlap, ti, di in pairs:
            if overlap < opts.iou:
                break
            if ti in used_t or di in used_d:
                continue
            live[ti].append(by_frame[order][di])
            used_t.add(ti)
            used_d.add(di)
        live += [[d] for di, d in enumerate(by_frame[order]) if di not in used_d]
    return done + live


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity (rotation, uniform scale, shift) that maps ``src`` points onto
    ``dst`` in the least-squares sense (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    sign = np.diag([1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])
    rot = u @ sign @ vt
    scale = float(np.trace(np.diag(sig) @ sign)) / float((s ** 2).sum() / len(src))
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def template(size: tuple[int, int]) -> np.ndarray:
    """The 5-point template for an ``(height, width)`` crop: arcface's 112x112 points,
    scaled with the height and centred in the width (112x96 gives SphereFace's)."""
    h, w = size
    pts = ARCFACE_112 * (h / 112.0)
    pts[:, 0] += (w - h) / 2.0  # the scaled square template, centred in the width
    return pts


def crop(image: Image.Image, det: Detection, opts: TrackOptions) -> Image.Image:
    """The face of ``det`` as an ``opts.size`` crop: aligned by landmarks when given."""
    h, w = opts.size
    if det.landmarks is not None:
        m = similarity_transform(det.landmarks, template(opts.size))
        inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]  # PIL maps output -> input
        return image.transform((w, h), Image.Transform.AFFINE, tuple(inv.ravel()),
                               resample=Image.Resampling.BILINEAR)
    x1, y1, x2, y2 = det.box
    side = max(x2 - x1, y2 - y1) * (1 + 2 * opts.margin)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box = (cx - side * w / max(h, w) / 2, cy - side * h / max(h, w) / 2,
           cx + side * w / max(h, w) / 2, cy + side * h / max(h, w) / 2)
    # EXTENT, not resize(box=): a box past the frame's edge is padded black, not refused.
    return image.transform((w, h), Image.Transform.EXTENT, box,
                           resample=Image.Resampling.BILINEAR)


def _frame_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file()}


def _frame_orders(folder: Path) -> dict[str, int]:
    """Frame name -> place in the video; a numbered frame also answers to its number
    (``12`` finds ``000012.jpg``)."""
    orders = {s: i for i, s in enumerate(_frame_files(folder))}
    orders.update({str(int(s)): i for s, i in list(orders.items())
                   if s.isdigit() and str(int(s)) not in orders})
    return orders


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip(".") or "_"


LANDMARK_COLUMNS = [f"l{a}{k}" for k in range(5) for a in "xy"]


def _face_of(row: dict, has_lm: bool, need_box: bool = True
             ) -> tuple[np.ndarray, np.ndarray | None, float]:
    """(box, landmarks or None, score) of one CSV row; ValueError naming what is wrong."""
    lms = (np.array([float(row[c]) for c in LANDMARK_COLUMNS]).reshape(5, 2)
           if has_lm else None)
    score = float(row["score"]) if row.get("score") not in (None, "") else 1.0
    if not need_box and lms is not None:
        box = np.concatenate([lms.min(0), lms.max(0)])
    else:
        box = np.array([float(row[k]) for k in ("x1", "y1", "x2", "y2")])
        if not (box[2] > box[0] and box[3] > box[1]):
            raise ValueError(f"empty box {box.tolist()}")
    if not np.isfinite(box).all() or (lms is not None and not np.isfinite(lms).all()):
        raise ValueError("a coordinate is not a finite number")
    return box, lms, score


def read_detections(path: str, opts: TrackOptions, frames_root: Path,
                    report: TrackReport) -> dict[str, list[Detection]]:
    """Video -> its detections, from the CSV; rows that cannot be used go to problems."""
    out: dict[str, list[Detection]] = defaultdict(list)
    orders: dict[str, dict[str, int]] = {}
    stems: dict[str, list[str]] = {}
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        need = {"video", "frame", "x1", "y1", "x2", "y2"}
        if rows.fieldnames is None or not need <= set(rows.fieldnames):
            raise ValueError(f"{path}: the header must name {sorted(need)} "
                             f"(got {rows.fieldnames})")
        has_lm = set(LANDMARK_COLUMNS) <= set(rows.fieldnames)
        for n, row in enumerate(rows, start=2):
            where = f"{path}:{n}"
            video, frame = row["video"], Path(row["frame"]).stem
            if video not in orders:
                folder = frames_root / video
                if not folder.is_dir():
                    report.problems.append(f"{where}: no frames folder {folder}")
                    orders[video] = {}
                else:
                    orders[video] = _frame_orders(folder)
                    stems[video] = list(_frame_files(folder))
            if frame not in orders[video]:
                if orders[video]:
                    report.problems.append(f"{where}: no frame {frame!r} in {video}/")
                continue
            try:
                box, lms, score = _face_of(row, has_lm)
            except ValueError as e:
                report.problems.append(f"{where}: {e}")
                continue
            if score < opts.min_score:
                continue
            track = row.get("track") or None
            order = orders[video][frame]
            out[video].append(Detection(stems[video][order], order, box, lms, track))
            report.detections += 1
    return out


def _given_tracks(dets: Iterable[Detection]) -> list[list[Detection]]:
    tracks: dict[str, list[Detection]] = defaultdict(list)
    for d in dets:
        tracks[str(d.track)].append(d)
    return [sorted(t, key=lambda d: d.order) for t in tracks.values()]


def extract_tracks(frames_root: str, detections_csv: str, out_dir: str,
                   opts: TrackOptions | None = None, progress: bool = False) -> TrackReport:
    """Write ``out_dir/<video>/<track>/<frame>.jpg`` crops; see the module doc."""
    from tqdm import tqdm

    opts = opts or TrackOptions()
    root, out = Path(frames_root), Path(out_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{frames_root}: not a folder")
    report = TrackReport()
    videos = read_detections(detections_csv, opts, root, report)
    report.videos = len(videos)
    for video, dets in tqdm(sorted(videos.items()), unit="video", desc="tracks",
                            disable=not progress):
        given = any(d.track is not None for d in dets)
        tracks = _given_tracks(dets) if given else link_tracks(dets, opts)
        files = _frame_files(root / video)
        kept = [t for t in tracks if len(t) >= opts.min_len]
        report.dropped_short += len(tracks) - len(kept)
        for k, track in enumerate(sorted(kept, key=lambda t: (t[0].order, t[0].box[0]))):
            name = _safe_name(str(track[0].track)) if given else f"t{k:04d}"
            folder = out / _safe_name(video) / name
            os.makedirs(folder, exist_ok=True)
            for det in track:
                try:
                    with Image.open(files[det.frame]) as im:
                        face = crop(im.convert("RGB"), det, opts)
                except OSError as e:
                    report.problems.append(f"{files[det.frame]}: {e}")
                    continue
                face.save(folder / f"{det.frame}.jpg", quality=opts.quality)
                report.frames_written += 1
            report.tracks += 1
    return report


@dataclass
class AlignReport:
    faces: int = 0
    written: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.faces} faces listed -> {self.written} crops written "
                f"({len(self.problems)} problems)")


def align_faces(root: str, faces_csv: str, out_dir: str, opts: TrackOptions | None = None,
                progress: bool = False) -> AlignReport:
    """Photos -> aligned crops: ``faces_csv`` rows ``image,[x1,y1,x2,y2,][score,]
    [lx0,ly0,...,lx4,ly4]`` (``image`` relative to ``root``; landmarks align, a box alone
    crops with a margin) become ``out_dir/<image path>.jpg`` (``_<k>`` for an image's k-th
    face after its first), so an identity tree stays an identity tree."""
    from tqdm import tqdm

    opts = opts or TrackOptions()
    base, out = Path(root), Path(out_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    report = AlignReport()
    with open(faces_csv, newline="") as f:
        rows = csv.DictReader(f)
        cols = set(rows.fieldnames or ())
        has_lm = set(LANDMARK_COLUMNS) <= cols
        if "image" not in cols or not (has_lm or {"x1", "y1", "x2", "y2"} <= cols):
            raise ValueError(f"{faces_csv}: the header must name image and the landmarks "
                             f"lx0..ly4 or a box x1,y1,x2,y2 (got {rows.fieldnames})")
        seen: dict[str, int] = defaultdict(int)
        for n, row in enumerate(tqdm(rows, unit="face", desc="aligning",
                                     disable=not progress), start=2):
            where = f"{faces_csv}:{n}"
            report.faces += 1
            rel = Path(row["image"])
            src = base / rel
            if rel.is_absolute() or ".." in rel.parts or not src.is_file():
                report.problems.append(f"{where}: no image {row['image']!r} under {root}")
                continue
            try:
                box, lms, score = _face_of(row, has_lm, need_box=not has_lm)
            except ValueError as e:
                report.problems.append(f"{where}: {e}")
                continue
            if score < opts.min_score:
                continue
            try:
                with Image.open(src) as im:
                    face = crop(im.convert("RGB"), Detection(rel.stem, 0, box, lms), opts)
            except OSError as e:
                report.problems.append(f"{where}: {src}: {e}")
                continue
            k = seen[row["image"]]
            seen[row["image"]] += 1
            dest = out / rel.parent / f"{rel.stem}{f'_{k}' if k else ''}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            face.save(dest, quality=opts.quality)
            report.written += 1
    return report

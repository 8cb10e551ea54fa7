"""IJB-B / IJB-C style 1:1 template verification: media pooling, TAR at FAR over a ROC.

The protocol, in insightface's IJB layout (``recognition/arcface_torch/eval_ijbc.py``):

    <root>/meta/<target>_face_tid_mid.txt          image template_id media_id   (a line each)
    <root>/meta/<target>_template_pair_label.txt   template1 template2 label(0/1)
    <root>/loose_crop/<image>                      the face crops

``target`` is ``ijbb`` or ``ijbc`` (the file names' prefix). The recipe, the field's
standard one:

1. embed every image (with ``flip``: the features of image and mirror summed) and
   L2-normalise each image's feature;
2. media pooling: average the features of a template's images of one media (a video's
   frames, or a still); then average those media features over the template; L2-normalise
   (a template of one video and one still weighs them equally, however many frames);
3. a pair's score is the cosine of its two template features;
4. TAR at each FAR in ``IJB_FARS`` (1e-6 .. 1e-1), the threshold set from the impostor
   scores alone (:func:`seqface_dist.eval.verification.tar_at_far`: at most FAR x
   impostors accepted, accept iff score > threshold), and the ROC with its AUC.

No landmark alignment is done: the crops must already be aligned to the model's input
(insightface aligns its loose crops with the 5 points of ``<target>_name_5pts_score.txt``
first; the faceness scores of that file are not used either). Pure numpy apart from
:func:`evaluate_ijb_model`, which embeds with :mod:`seqface_dist.eval.embed`.

    proto = read_protocol(*meta_paths("IJB_release/IJBB", "ijbb")[:2])
    tids, tfeats = template_features(image_feats, proto.templates, proto.medias)
    res = evaluate_ijb(template_scores(tids, tfeats, proto.t1, proto.t2), proto.label)
    print(res.table())
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqface_dist.eval.verification import (
    TarAtFar,
    auc,
    l2_normalize,
    roc_curve,
    tar_at_far,
)

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class IJBProtocol:
    """Images with their template and media, and template pairs to verify."""

    images: list[str]  # file names under the crops folder, one per row of tid_mid
    templates: np.ndarray  # (n_images,) int64 template id of each image
    medias: np.ndarray  # (n_images,) int64 media id of each image
    t1: np.ndarray  # (n_pairs,) int64
    t2: np.ndarray  # (n_pairs,) int64
    label: np.ndarray  # (n_pairs,) bool: same subject


def _rows(path: str | Path, ncols: int, what: str) -> list[list[str]]:
    path = Path(path)
    rows = []
    for lineno, ln in enumerate(path.read_text().splitlines(), start=1):
        f = ln.split()
        if not f:
            continue
        if len(f) != ncols:
            raise ValueError(f"{path}:{lineno}: expected '{what}', got {ln!r}")
        rows.append(f)
    if not rows:
        raise ValueError(f"{path}: empty")
    return rows


def _ints(values: list[str], path: str | Path, what: str) -> np.ndarray:
    try:
        return np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        bad = next(v for v in values if not v.lstrip("-").isdigit())
        raise ValueError(f"{path}: {what} must be integers, got {bad!r}") from None


def read_tid_mid(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<target>_face_tid_mid.txt``: (image names, template ids, media ids)."""
    rows = _rows(path, 3, "image template_id media_id")
    return ([r[0] for r in rows], _ints([r[1] for r in rows], path, "template ids"),
            _ints([r[2] for r in rows], path, "media ids"))


def read_template_pairs(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<target>_template_pair_label.txt``: (t1, t2, label as bool)."""
    rows = _rows(path, 3, "template1 template2 label")
    label = _ints([r[2] for r in rows], path, "labels")
    if not np.isin(label, (0, 1)).all():
        raise ValueError(f"{path}: labels must be 0 or 1")
    return (_ints([r[0] for r in rows], path, "template ids"),
            _ints([r[1] for r in rows], path, "template ids"), label.astype(bool))


def read_protocol(tid_mid: str | Path, pair_label: str | Path) -> IJBProtocol:
    """Both meta files; every template a pair names must have images."""
    names, templates, medias = read_tid_mid(tid_mid)
    t1, t2, label = read_template_pairs(pair_label)
    known = np.unique(templates)
    for t in (t1, t2):
        missing = t[~np.isin(t, known)]
        if missing.size:
            raise ValueError(f"{pair_label}: template {int(missing[0])} has no images in "
                             f"{tid_mid} ({np.unique(missing).size} such templates)")
    return IJBProtocol(names, templates, medias, t1, t2, label)


def meta_paths(root: str | Path, target: str | None = None) -> tuple[Path, Path, Path]:
    """(tid_mid file, pair file, crops folder) of insightface's layout under ``root``;
    ``target`` (ijbb / ijbc) defaults to the root folder's name, lower-cased."""
    root = Path(root)
    target = (target or root.name).lower()
    return (root / "meta" / f"{target}_face_tid_mid.txt",
            root / "meta" / f"{target}_template_pair_label.txt", root / "loose_crop")


def _group_mean(feats: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct groups, the mean of ``feats`` rows of each), by sorting once."""
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sums = np.add.reduceat(feats[order], starts, axis=0)
    counts = np.diff(np.r_[starts, g.size])
    return g[starts], sums / counts[:, None]


def template_features(image_features: np.ndarray, templates: np.ndarray,
                      medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Media pooling: (sorted template ids, (n_templates, D) L2-normalised features).

    Each image's feature is L2-normalised; a template's images of one media are averaged;
    the template's media features are averaged and the result L2-normalised.
    """
    f = np.asarray(image_features, dtype=np.float64)
    templates = np.asarray(templates, dtype=np.int64).reshape(-1)
    medias = np.asarray(medias, dtype=np.int64).reshape(-1)
    if f.ndim != 2 or f.shape[0] != templates.size or medias.size != templates.size:
        raise ValueError(f"template_features: {f.shape[0] if f.ndim else 0} features for "
                         f"{templates.size} template and {medias.size} media ids")
    f = l2_normalize(f, axis=1)
    # One group per (template, media): their rank in the sorted distinct pairs.
    pairs, tm = np.unique(np.stack([templates, medias], axis=1), axis=0, return_inverse=True)
    _, media_feats = _group_mean(f, tm.reshape(-1))
    tids, tfeats = _group_mean(media_feats, pairs[:, 0])
    return tids, l2_normalize(tfeats, axis=1)


def template_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray,
                    t2: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Cosine of each pair's template features (``template_ids`` sorted, as returned)."""
    template_ids = np.asarray(template_ids)
    out = np.empty(len(t1), dtype=np.float64)
    idx = []
    for t in (np.asarray(t1), np.asarray(t2)):
        i = np.searchsorted(template_ids, t)
        bad = (i >= template_ids.size) | (template_ids[np.minimum(i, template_ids.size - 1)]
                                          != t)
        if bad.any():
            raise KeyError(f"template {int(t[bad][0])} has no feature")
        idx.append(i)
    for s in range(0, len(out), chunk):
        a = template_feats[idx[0][s:s + chunk]]
        b = template_feats[idx[1][s:s + chunk]]
        out[s:s + chunk] = np.sum(a * b, axis=1)
    return out


@dataclass
class IJBResult:
    n_templates: int
    n_pairs: int
    n_genuine: int
    n_impostor: int
    tar_at_far: list[TarAtFar]
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    name: str = "ijb"

    def to_dict(self) -> dict:
        return {"name": self.name, "templates": self.n_templates, "pairs": self.n_pairs,
                "genuine": self.n_genuine, "impostor": self.n_impostor, "auc": self.auc,
                "tar_at_far": [{"far": t.far_target, "tar": t.tar, "far_reached": t.far,
                                "threshold": t.threshold, "resolvable": t.resolvable}
                               for t in self.tar_at_far]}

    def table(self) -> str:
        """The TAR@FAR table (percent, as the field reports IJB), with counts and AUC."""
        head = ["FAR"] + [f"{t.far_target:g}" for t in self.tar_at_far]
        row = [self.name] + [f"{100 * t.tar:.2f}" + ("" if t.resolvable else "*")
                             for t in self.tar_at_far]
        w = [max(len(a), len(b)) for a, b in zip(head, row, strict=True)]
        lines = [f"{self.name}: {self.n_templates} templates, {self.n_pairs} pairs "
                 f"({self.n_genuine} genuine, {self.n_impostor} impostor)",
                 "  ".join(h.rjust(n) for h, n in zip(head, w, strict=True)),
                 "  ".join(r.rjust(n) for r, n in zip(row, w, strict=True)),
                 f"TAR (%) at FAR; ROC AUC {self.auc:.4f}"]
        if not all(t.resolvable for t in self.tar_at_far):
            lines.append(f"* FAR below 1/{self.n_impostor} impostors: measured at FAR=0")
        return "\n".join(lines)


def evaluate_ijb(scores: np.ndarray, label: np.ndarray, far_targets: Sequence[float] = IJB_FARS,
                 *, n_templates: int = 0, name: str = "ijb") -> IJBResult:
    """TAR at each FAR, ROC and AUC of template-pair scores."""
    label = np.asarray(label, dtype=bool)
    fpr, tpr, _ = roc_curve(scores, label)
    return IJBResult(n_templates=n_templates, n_pairs=int(label.size),
                     n_genuine=int(label.sum()), n_impostor=int((~label).sum()),
                     tar_at_far=tar_at_far(scores, label, far_targets), fpr=fpr, tpr=tpr,
                     auc=auc(fpr, tpr), name=name)


def evaluate_ijb_model(model, protocol: IJBProtocol, images_dir: str | Path, *,
                       flip: bool = False, batch_size: int = 64,
                       input_size: Sequence[int] | None = None,
                       far_targets: Sequence[float] = IJB_FARS, progress: bool = True,
                       name: str = "ijb", **embed_kw: object) -> IJBResult:
    """Embed the protocol's crops (``images_dir/<image>``), pool, score, evaluate."""
    from seqface_dist.eval.embed import embed_images

    images_dir = Path(images_dir)
    paths = [images_dir / n for n in protocol.images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image {missing[0]} not found ({len(missing)} of "
                                f"{len(paths)} missing)")
    feats = embed_images(model, paths, flip=flip, batch_size=batch_size,
                         input_size=input_size, progress=progress, desc=name, **embed_kw)
    tids, tfeats = template_features(feats, protocol.templates, protocol.medias)
    scores = template_scores(tids, tfeats, protocol.t1, protocol.t2)
    return evaluate_ijb(scores, protocol.label, far_targets, n_templates=int(tids.size),
                        name=name)


def write_json(res: IJBResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    return path


def plot_ijb_roc(res: IJBResult, path: str | Path) -> Path:
    """The ROC (TAR against FAR, log FAR axis from 1e-6) as PNG, FAR targets marked."""
    from seqface_dist.eval.verification import roc_figure, save_roc

    fig, ax = roc_figure()
    keep = res.fpr > 0
    ax.plot(res.fpr[keep], res.tpr[keep], label=f"{res.name} (AUC {res.auc:.4f})")
    for t in res.tar_at_far:
        ax.axvline(t.far_target, color="0.8", lw=0.6)
    return save_roc(fig, ax, min([1e-6, *res.fpr[keep][:1]]),
                    f"ROC: {res.name} template verification", path)
